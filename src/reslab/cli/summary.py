"""`reslab summary MODEL`: a Keras-style layer table in which every residual add and every branch
concatenation of an inception module is a row."""

from __future__ import annotations

import json

from rich.text import Text

from reslab.cli.tables import console, table
from reslab.errors import ReslabError


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a registered model name (see `reslab models`)")
    parser.add_argument("--input-size", nargs=3, type=int, metavar=("C", "H", "W"),
                        help="input shape without the batch (default: 3 x the model's native size)")
    parser.add_argument("--num-classes", type=int,
                        help="classifier outputs (default: 1000 ImageNet-sized nets, 10 for 32 px nets)")
    parser.add_argument("--shortcut", choices=["A", "B", "C"], help="shortcut option (paper section 3.3)")
    parser.add_argument("--stride-in-1x1", action="store_true",
                        help="original paper / Keras placement of the bottleneck stride")
    parser.add_argument("--json", action="store_true", help="print rows and totals as JSON")


def run(args) -> int:
    from reslab.models import complexity, get_model_spec, layer_table
    from reslab.models.summary import uninitialized

    spec = get_model_spec(args.model)
    options = {}
    for key in ("num_classes", "shortcut"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.stride_in_1x1:
        options["stride_in_1x1"] = True
    if args.input_size:
        c, h, w = args.input_size
        if min(args.input_size) < 1:
            raise ReslabError(f"--input-size must be three positive integers C H W, got {args.input_size}")
        options["in_channels"] = c
        input_size = (c, h, w)
    else:
        input_size = (3, spec.image_size, spec.image_size)
    model = uninitialized(args.model, **options)
    try:
        rows = layer_table(model, input_size)
    except RuntimeError as err:
        raise ReslabError(f"{args.model} cannot take input {input_size}: {str(err).splitlines()[0]}") from None
    totals = complexity(model, input_size)
    if args.json:
        print(json.dumps({"model": args.model, "input_size": list(input_size), "totals": totals,
                          "layers": [r.__dict__ | {"output_shape": list(r.output_shape)} for r in rows]},
                         indent=2))
        return 0
    cells = []
    for r in rows:
        shape = "x".join(map(str, r.output_shape))
        if r.kind == "ResidualAdd":
            # The add is the point of the whole architecture: make each one stand out.
            cells.append([Text(r.name, "bold green"), Text("(+) residual add", "bold green"), shape, "0", ""])
        elif r.kind == "Concat":
            # An inception module's parallel branches meet here (|| for "side by side").
            cells.append([Text(r.name, "bold cyan"), Text("(||) concat", "bold cyan"), shape, "0", ""])
        else:
            cells.append([r.name, r.kind, shape, f"{r.params:,}", f"{r.macs:,}" if r.macs else ""])
    columns = [("layer", "left"), ("type", "left"), ("output shape", "right"), ("params", "right"), ("MACs", "right")]
    out = console()
    out.print(table(f"{args.model}  input {'x'.join(map(str, input_size))}", columns, cells))
    frozen = totals["params"] - totals["trainable_params"]
    out.print(
        f"Total params: {totals['params']:,}   Trainable: {totals['trainable_params']:,}   "
        f"Non-trainable: {frozen:,}\nMACs: {totals['macs']:,} ({totals['macs'] / 1e9:.3f} G)   "
        f"Residual adds: {totals['residual_adds']}"
        + (f"   Concats: {totals['concats']}" if totals["concats"] else "")
    )
    return 0
