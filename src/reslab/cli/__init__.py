"""`reslab` command line: one module per subcommand, each with `add_arguments` and `run`.

The modules stay thin: they parse, call the library and print. Importing a subcommand's module is
deferred until it runs so that `reslab models` does not pay for the web server's imports.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from reslab.errors import ReslabError

# name -> (module under reslab.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("models", "list the registered models with parameters and MACs"),
    "summary": ("summary", "layer table of a model, residual adds included"),
    "train": ("train", "train a model (default: resnet20 on the embedded digits)"),
    "lr-find": ("lr_find", "learning-rate range test: lr_find.png and a suggested lr"),
    "evaluate": ("evaluate", "top-1/top-5, per-class precision/recall/F1, confusion matrix, sample grid, top losses"),
    "predict": ("predict", "top-k classes for images"),
    "export": ("export", "export to ONNX or OpenVINO, checked against PyTorch"),
    "bench": ("bench", "training or inference throughput"),
    "experiment": ("experiment", "degradation, gradients, responses, table6 (He et al.); inception (Szegedy et al.)"),
    "explain": ("explain", "Grad-CAM overlays as PNG files"),
    "serve": ("serve", "local HTTP API and web page"),
}


def _available() -> dict[str, tuple[str, str]]:
    """Commands whose module exists in this build (lets the tree grow one command at a time)."""
    found = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(f"reslab.cli.{module}") is not None:
            found[name] = (module, help_text)
    return found


def build_parser() -> argparse.ArgumentParser:
    from reslab import __version__

    parser = argparse.ArgumentParser(
        prog="reslab", description="Residual networks: build, inspect, train, evaluate, deploy."
    )
    parser.add_argument("--version", action="version", version=f"reslab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(f"reslab.cli.{module}")
        mod.add_arguments(cmd)
        cmd.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except ReslabError as err:
        print(f"reslab {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"reslab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def entry() -> None:
    """The `reslab` program: main(), then the exit; a torchrun rank leaves without the interpreter's
    finalization (reslab.train.distributed.end_process says why)."""
    code = main()
    distributed = sys.modules.get("reslab.train.distributed")
    if distributed is not None:
        distributed.finish(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
