"""`reslab explain`: Grad-CAM overlays, each beside the image's top-k probabilities, as PNG files."""

from __future__ import annotations

from pathlib import Path

from reslab.cli.options import add_inference_options


def add_arguments(parser) -> None:
    add_inference_options(parser, "checkpoint", "model", "classes")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    parser.add_argument("--layer", default=None,
                        help="module whose feature maps are explained (default: the last stage)")
    parser.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                        help="explain this class instead of the predicted one")
    add_inference_options(parser, "top_k", "device", top_k="probabilities shown beside the overlay (default 5)")
    parser.add_argument("--out", default="explain", help="folder for the PNG files (default ./explain)")


def run(args) -> int:
    from reslab import plots
    from reslab.cli.tables import console, table
    from reslab.errors import ReslabError
    from reslab.explain import Explainer
    from reslab.inference.predictor import Predictor

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise ReslabError(f"image not found: {missing[0]}; give the path of an existing image file")
    explainer = Explainer(Predictor(args.source, device=args.device, top_k=args.top_k, model=args.model,
                                     classes=args.classes), args.layer)
    explainer.class_index(args.class_name)  # an unknown --class fails before any work
    out = Path(args.out)
    rows = []
    used: set[str] = set()
    for image in args.images:
        result = explainer.explain(image, args.class_name)
        stem, n = Path(image).stem, 1
        name = f"{stem}-gradcam.png"
        while name in used:  # two images called cat.jpg in different folders
            n += 1
            name = f"{stem}-{n}-gradcam.png"
        used.add(name)
        path = plots.gradcam(out / name, result.image, result.overlay(), result.top_k,
                             explained=result.class_name, layer=result.layer, title=Path(image).name)
        rows.append([Path(image).name, result.class_name, f"{result.probability:.1%}",
                     f"{result.top_k[0][0]} ({result.top_k[0][1]:.1%})", str(path)])
    columns = [("image", "left"), ("explained class", "left"), ("probability", "left"), ("top class", "left"),
               ("figure", "left")]
    console().print(table(f"Grad-CAM of {explainer.predictor.meta.model}, layer {explainer.layer}", columns, rows))
    return 0
