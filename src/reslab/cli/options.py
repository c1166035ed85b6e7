"""The options of every command that runs a model, declared once and checked as they are parsed.

`add_inference_options(parser, "source", "device", "backend", "precision", "top_k")` adds the
ones a command takes. Each is checked here, at the door, with the received value echoed (argparse
`choices=` or a `type=` that calls the library's own check); the library below trusts it.

The parser is built for every command, `reslab --version` included, so nothing here imports
torch until a value is checked: the choices are read from their modules on first use.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from reslab.errors import ReslabError


def _load(where: str):
    """The object named `module:attribute`, imported now."""
    module, _, attribute = where.partition(":")
    return getattr(importlib.import_module(module), attribute)


class _Names(Sequence):
    """argparse `choices=` kept in another module (`module:ATTRIBUTE`), imported when first read."""

    def __init__(self, where: str):
        self.where = where

    def __getitem__(self, index):
        return tuple(_load(self.where))[index]

    def __len__(self) -> int:
        return len(_load(self.where))


def _checked(where: str, convert=str):
    """An argparse `type=`: the value converted, then passed to the library's check `module:function`,
    whose ReslabError becomes argparse's error line."""

    def parse(text: str):
        value = convert(text)
        try:
            _load(where)(value)
        except ReslabError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    parse.__name__ = convert.__name__  # argparse's "invalid int value: 'x'" when `convert` fails
    return parse


# name -> (flags, argparse keywords). A variant of an option is a line here, not a copy in a command.
OPTIONS: dict[str, tuple[tuple[str, ...], dict]] = {
    "source": (("source",), {"metavar": "RUN_OR_CKPT",
                             "help": "a run directory (its best weights), a reslab weights file, catalog weights "
                                     "(MODEL.TAG, see `reslab models --pretrained`), a foreign checkpoint file or "
                                     "URL, or an exported .onnx / OpenVINO .xml file"}),
    "checkpoint": (("source",), {"metavar": "RUN_OR_CKPT",
                                 "help": "a run directory (its best weights), a reslab weights file, catalog weights "
                                         "(MODEL.TAG), or a foreign checkpoint file or URL"}),
    "model": (("--model",), {"default": None, "metavar": "NAME",
                             "help": "the architecture of a foreign checkpoint that is not in the catalog"}),
    "classes": (("--classes",), {"default": None, "metavar": "FILE",
                                 "help": "class names of a foreign checkpoint: one per line (or a JSON list); "
                                         "default: numbered"}),
    "device": (("--device",), {"default": "cpu", "type": _checked("reslab.hardware:check_device"),
                               "help": "cpu (default), cuda, cuda:1 ..."}),
    "backend": (("--backend",), {"default": "auto", "choices": _Names("reslab.inference.backends:BACKENDS"),
                                 "metavar": "NAME", "help": "%(choices)s (default auto: the fastest installed)"}),
    # Inference precisions: training's list (reslab.hardware.PRECISIONS) has no int8.
    "precision": (("--precision",), {"default": "auto",
                                     "choices": _Names("reslab.inference.backends:INFERENCE_PRECISIONS"),
                                     "metavar": "NAME", "help": "%(choices)s (default auto: bf16 only where the "
                                                                "hardware runs it natively; int8: quantized on "
                                                                "images of --calibration, cached beside the run)"}),
    "calibration": (("--calibration",), {"default": None, "metavar": "DATA",
                                         "help": "with --precision int8: the data whose training images calibrate "
                                                 "the quantization (default: the data the model was trained on)"}),
    # None: reslab.inference.quantize.DEFAULT_CALIBRATION_IMAGES (tests/test_int8.py holds the help's figure to it).
    "calibration_images": (("--calibration-images",),
                           {"default": None, "metavar": "N",
                            "type": _checked("reslab.inference.quantize:check_calibration_images", int),
                            "help": "with int8: how many calibration images (default 128)"}),
    "max_drop": (("--max-drop",), {"default": None, "metavar": "FRACTION",
                                   "type": _checked("reslab.inference.quantize:check_max_drop", float),
                                   "help": "largest accepted int8 top-1 drop against fp32 (default 0.01); a larger "
                                           "one writes nothing"}),
    "top_k": (("--top-k",), {"default": 5, "type": _checked("reslab.inference.predictor:check_top_k", int),
                             "help": "classes shown per image (default 5)"}),
    "tta": (("--tta",), {"default": None, "choices": _Names("reslab.inference.predictor:TTA_MODES"),
                         "metavar": "MODE", "help": "test-time augmentation: %(choices)s (flip: mean of the image "
                                                    "and its mirror; default: what the run's training found "
                                                    "paying on its validation split, else none; never flip for "
                                                    "a model trained with --no-flip)"}),
}


def add_inference_options(parser: argparse.ArgumentParser, *names: str, **helps: str) -> None:
    """Add the named options of OPTIONS, in that order; `helps` overrides an option's help text."""
    for name in names:
        flags, keywords = OPTIONS[name]
        parser.add_argument(*flags, **{**keywords, **({"help": helps[name]} if name in helps else {})})
