"""Any model source to (model, metadata): what every command that takes a model accepts.

A source is a reslab run directory or weights file; a catalog name (`resnet50.tv2_in1k`); a foreign
checkpoint file or URL, recognised by its hash when it is a catalog file (then it brings its model,
class names and preprocessing, whatever its file name), otherwise described by `model` (the
architecture) and `classes` (a file of class names; else the classes are numbered).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.weights.catalog import (
    INCEPTION_MEAN,
    INCEPTION_STD,
    Preprocessing,
    WeightsEntry,
    is_weights_name,
    list_weights,
)


def _is_reslab(path: Path) -> bool:
    """A run directory, or a safetensors file with reslab's metadata."""
    if path.is_dir():
        return True
    if path.suffix.lower() != ".safetensors":
        return False
    from safetensors import SafetensorError, safe_open

    from reslab.checkpoint import FORMAT

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError, ValueError):
        return True  # let the reslab reader say what is wrong with it


def read_class_names(classes: str | os.PathLike | Sequence[str]) -> list[str]:
    """Class names from a list, a JSON list file, or a text file of one name per line."""
    if not isinstance(classes, (str, os.PathLike)):
        return [str(c) for c in classes]
    path = Path(classes)
    try:
        text = path.read_text()
    except OSError as err:
        raise ReslabError(f"--classes {path}: {err.strerror}; give a text file with one class name per line") from None
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except ValueError:
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ReslabError(f"--classes {path} is not a JSON list of names; give [\"cat\", \"dog\", ...] or one "
                              "name per line in a .txt file")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def default_preprocessing(model: str) -> dict:
    """What a foreign checkpoint of `model` most likely wants: the family's input size, resized as
    torchvision evaluates (crop 87.5% of the shorter side), ImageNet statistics (0.5 for Inception)."""
    from reslab.models import get_model_spec

    size = get_model_spec(model).image_size
    inception = get_model_spec(model).family == "inception"
    pre = Preprocessing(size, size if size <= 64 else round(size / 0.875),
                        mean=INCEPTION_MEAN if inception else Preprocessing.__dataclass_fields__["mean"].default,
                        std=INCEPTION_STD if inception else Preprocessing.__dataclass_fields__["std"].default)
    return pre.to_dict()


def _entry_for_url(url: str) -> WeightsEntry | None:
    return next((e for e in list_weights() if e.url == url), None)


def load_source(source: str | os.PathLike, *, model: str | None = None, classes=None, device="cpu",
                quiet: bool = True) -> tuple[nn.Module, object]:
    """(model in eval mode on `device`, CheckpointMeta) for any source (see the module docstring)."""
    from reslab.checkpoint import load_model
    from reslab.transfer.sources import fetch, is_url, split_url
    from reslab.weights import load_entry_state, load_pretrained_model, recognise_file

    text = os.fspath(source)
    path = Path(text).expanduser()
    if not path.exists() and is_weights_name(text):
        net, meta = load_pretrained_model(text, quiet=quiet)
        return _described(net, meta, classes).to(device).eval(), meta
    if is_url(text):
        entry = _entry_for_url(split_url(text)[0])
        if entry is not None:
            net, meta = load_pretrained_model(entry.name, quiet=quiet)
            return _described(net, meta, classes).to(device).eval(), meta
        path, _ = fetch(text, None, quiet)
    elif not path.exists():
        hint = "; for catalog weights see `reslab models --pretrained`" if "." in text and "/" not in text else ""
        raise ReslabError(f"no run directory or weights file at {text}; check the path{hint}")
    if _is_reslab(path):
        if model is not None or classes is not None:
            raise ReslabError(f"{path} is a reslab checkpoint: it names its own model and classes; drop "
                              "--model/--classes")
        return load_model(path, device=device)
    entry = recognise_file(path)
    if entry is not None:
        if model is not None and model != entry.model:
            raise ReslabError(f"{path} is the catalog file {entry.name} (a {entry.model}), not a {model}; drop --model")
        net, meta = _entry_model(entry, load_entry_state(entry, path), str(path))
        return _described(net, meta, classes).to(device).eval(), meta
    if model is None:
        raise ReslabError(f"{path} is not a reslab checkpoint nor a file of the weights catalog; say its architecture "
                          "with --model NAME (and its classes with --classes FILE)")
    net, meta = _foreign(path, model, classes)
    return net.to(device).eval(), meta


def _entry_model(entry: WeightsEntry, state: dict, label: str):
    from reslab.models import create_model
    from reslab.weights import entry_meta, load_into

    meta = entry_meta(entry)
    net = create_model(entry.model, num_classes=len(meta.classes), **entry.model_options)
    meta.extra["head"] = load_into(net, state, label, entry.model)
    return net, meta


def _described(net: nn.Module, meta, classes) -> nn.Module:
    """Class names given by the person override the catalog's (same count only)."""
    if classes is not None:
        names = read_class_names(classes)
        if len(names) != len(meta.classes):
            raise ReslabError(f"--classes gives {len(names)} names but the weights have {len(meta.classes)} classes")
        meta.classes = names
    return net


def _foreign(path: Path, model: str, classes):
    """A foreign checkpoint of architecture `model`, its class count read from its classifier."""
    from reslab.checkpoint import CheckpointMeta
    from reslab.models import create_model
    from reslab.transfer import classifier_name, map_keys
    from reslab.transfer.sources import read_source
    from reslab.weights import load_into

    probe = create_model(model, num_classes=1)
    head = classifier_name(probe) + ".weight"
    state, _ = map_keys(read_source(str(path), quiet=True).state, set(probe.state_dict()))
    weight = state.get(head)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ReslabError(f"{path} has no classifier ({head}) for {model}; it cannot predict classes. Check --model, "
                          "or fine-tune it with `reslab train --pretrained`")
    names = read_class_names(classes) if classes is not None else [str(i) for i in range(weight.shape[0])]
    if len(names) != weight.shape[0]:
        raise ReslabError(f"--classes gives {len(names)} names but {path} has {weight.shape[0]} classes")
    net = create_model(model, num_classes=len(names))
    head_fate = load_into(net, state, str(path), model)
    meta = CheckpointMeta(model=model, classes=names, preprocessing=default_preprocessing(model),
                          extra={"source": str(path), "head": head_fate, "preprocessing": "assumed"})
    return net, meta


@dataclass
class PretrainedPlan:
    """What `reslab train --pretrained SRC` needs before and after building the model."""

    source: str
    entry: WeightsEntry | None  # the catalog entry SRC is (by name, URL or file hash), if any
    model_options: dict  # create_model options the weights need (Keras: stride_in_1x1, ...)
    normalization: dict | None  # {"mean", "std"} the weights were trained with; None: unknown
    path: Path | None = None  # a local file recognised as `entry`

    def load(self, model: nn.Module, *, model_name: str, sha256: str | None = None, quiet: bool = False) -> dict:
        """Load the weights into `model` (strict but for the head); a JSON-able report for config.json."""
        from reslab.transfer import load_pretrained
        from reslab.weights import load_entry_state, load_into

        if self.entry is None:
            report = load_pretrained(model, self.source, model_name=model_name, sha256=sha256, quiet=quiet)
        else:
            head = load_into(model, load_entry_state(self.entry, self.path, quiet=quiet), self.entry.name, model_name)
            report = {"source": self.source, "kind": "catalog", "weights": self.entry.name, "url": self.entry.url,
                      "head": head}
            if not quiet:
                print(f"pretrained: {self.entry.name} ({self.entry.source}); head {head}")
        if self.normalization is not None:
            report["normalization"] = self.normalization
        return report


def pretrained_plan(source: str, model_name: str) -> PretrainedPlan:
    """Resolve `--pretrained SRC` for `--model model_name`: `imagenet` / `cifar10` (the best catalog
    weights of that model for those classes), a catalog name, a catalog URL or a file recognised by
    its hash; else a reslab checkpoint or a foreign file or URL (reslab.transfer)."""
    from reslab.transfer import model_options_for
    from reslab.transfer.sources import is_url, split_url
    from reslab.weights import default_weights, get_weights, recognise_file

    text = str(source)
    path = Path(text).expanduser()
    entry, local = None, None
    if text in ("imagenet", "cifar10"):
        entry = default_weights(model_name, "imagenet1k" if text == "imagenet" else "cifar10")
    elif not path.exists() and is_weights_name(text):
        entry = get_weights(text)
    elif is_url(text):
        entry = _entry_for_url(split_url(text)[0])
    elif path.is_file():
        entry, local = recognise_file(path), path
    if entry is not None:
        if entry.model != model_name:
            raise ReslabError(f"--pretrained {text} holds {entry.name} weights, a {entry.model}; use --model "
                              f"{entry.model}")
        pre = entry.preprocessing
        return PretrainedPlan(text, entry, dict(entry.model_options), {"mean": list(pre.mean), "std": list(pre.std)},
                              local if entry else None)
    options = model_options_for(text)
    normalization = None
    if path.exists() and _is_reslab(path):
        from reslab.checkpoint import read_weights

        pre = read_weights(path)[1].preprocessing
        if "mean" in pre and "std" in pre:
            normalization = {"mean": list(pre["mean"]), "std": list(pre["std"])}
    else:  # a foreign checkpoint: the statistics such weights are almost always trained with
        pre = default_preprocessing(model_name)
        normalization = {"mean": pre["mean"], "std": pre["std"]}
    return PretrainedPlan(text, None, options, normalization)
