"""`reslab models`: the registry as a table (or JSON), with parameters and MACs measured."""

from __future__ import annotations

import json

from reslab.cli.tables import console, table


def add_arguments(parser) -> None:
    # Spelled out, not imported from the registry: parsing must not import torch.
    parser.add_argument("--family", choices=["imagenet", "cifar", "inception"], help="only one family")
    parser.add_argument("--pretrained", action="store_true",
                        help="list the weights catalog (MODEL.TAG names usable wherever a model is taken)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def run(args) -> int:
    if args.pretrained:
        return _pretrained(args)
    from reslab.models.catalog import catalog

    rows = catalog(family=args.family, quiet=args.json)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = [("name", "left"), ("family", "left"), ("block", "left"), ("depth", "right"), ("input", "right"),
               ("params", "right"), ("MACs", "right"), ("residual adds", "right")]
    cells = [[r["name"], r["family"], r["block"], str(r["depth"]), f"{r['image_size']}x{r['image_size']}",
              f"{r['params'] / 1e6:.2f}M", f"{r['macs'] / 1e9:.3f}G", str(r["residual_adds"])] for r in rows]
    console().print(table("reslab models (MACs at each model's native input)", columns, cells))
    return 0


def _pretrained(args) -> int:
    from reslab.weights import checkpoints_dir, get_weights, list_models

    entries = [get_weights(name) for name in list_models(args.family, pretrained=True)]
    rows = [{"name": e.name, "model": e.model, "params": _params(e.model), "top1": e.top1, "top5": e.top5,
             "classes": e.classes if isinstance(e.classes, str) else "custom",
             "image_size": e.preprocessing.image_size, "resize_size": e.preprocessing.resize_size,
             "interpolation": e.preprocessing.interpolation, "source": e.source, "licence": e.licence, "url": e.url,
             "file": str(checkpoints_dir() / e.local_name),
             "downloaded": (checkpoints_dir() / e.local_name).is_file()} for e in entries]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = [("name", "left"), ("top-1", "right"), ("params", "right"), ("classes", "left"), ("input", "right"),
               ("resize", "right"), ("source", "left"), ("licence", "left"), ("here", "center")]
    cells = [[r["name"], "-" if r["top1"] is None else f"{r['top1']:.2%}",
              "-" if r["params"] is None else f"{r['params'] / 1e6:.2f}M", r["classes"], str(r["image_size"]),
              str(r["resize_size"]), r["source"], r["licence"].split(" (")[0], "yes" if r["downloaded"] else ""]
             for r in rows]
    console().print(table(f"reslab pretrained weights (files in {checkpoints_dir()})", columns, cells))
    return 0


def _params(model: str) -> int:
    """Parameters of `model` as built for inference (no auxiliary heads), counted on the meta device:
    no memory is allocated and nothing is initialized."""
    import torch

    from reslab.models import create_model

    with torch.device("meta"):
        return sum(p.numel() for p in create_model(model).parameters())
