"""`reslab models`: the registry as a table (or JSON), with parameters and MACs measured."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table


def add_arguments(parser) -> None:
    # Spelled out, not imported from the registry: parsing must not import torch.
    parser.add_argument("--family", choices=["imagenet", "cifar", "inception"], help="only one family")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def run(args) -> int:
    from reslab.models.catalog import catalog

    rows = catalog(family=args.family, quiet=args.json)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="reslab models (MACs at each model's native input)")
    for col, justify in (("name", "left"), ("family", "left"), ("block", "left"), ("depth", "right"),
                         ("input", "right"), ("params", "right"), ("MACs", "right"), ("residual adds", "right")):
        table.add_column(col, justify=justify)
    for r in rows:
        size = r["image_size"]
        table.add_row(r["name"], r["family"], r["block"], str(r["depth"]), f"{size}x{size}",
                      f"{r['params'] / 1e6:.2f}M", f"{r['macs'] / 1e9:.3f}G", str(r["residual_adds"]))
    Console().print(table)
    return 0
