"""reslab's own weight files: safetensors with everything needed to use them in the metadata.

A `.safetensors` file holds only tensors and a flat str->str metadata map; no code can run when it
is loaded. reslab stores there the model name and options, the class names and the
preprocessing, so `reslab predict best.safetensors cat.jpg` needs nothing else.

Foreign checkpoints (torchvision, timm, Keras, the wild) are the business of `reslab.transfer`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.io import atomic_path

FORMAT = "reslab"
FORMAT_VERSION = 1
BEST, LAST = "best.safetensors", "last.safetensors"


@dataclass
class CheckpointMeta:
    """What a reslab weights file says about itself."""

    model: str
    model_options: dict = field(default_factory=dict)  # create_model options, num_classes excluded
    classes: list[str] = field(default_factory=list)
    preprocessing: dict = field(default_factory=dict)  # see reslab.data.DataBundle.preprocessing()
    extra: dict = field(default_factory=dict)  # epoch, val_acc, data, source of pretrained weights...

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "model": self.model,
            "model_options": json.dumps(self.model_options),
            "classes": json.dumps(self.classes),
            "preprocessing": json.dumps(self.preprocessing),
            "extra": json.dumps(self.extra),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path) -> CheckpointMeta:
        if meta.get("format") != FORMAT:
            raise ReslabError(
                f"{path} is a safetensors file but not a reslab checkpoint (no reslab metadata); "
                "to start from foreign weights use `reslab train --pretrained`"
            )
        try:
            values = {"model": meta["model"]}
            for name, empty in (("model_options", "{}"), ("classes", "[]"), ("preprocessing", "{}"), ("extra", "{}")):
                values[name] = json.loads(meta.get(name, empty))
        except (KeyError, ValueError) as err:
            raise ReslabError(f"{path}: damaged reslab metadata ({err}); use another checkpoint") from None
        problem = _metadata_problem(values)
        if problem:
            raise ReslabError(f"{path}: bad reslab metadata: {problem}; the file was edited or not written by "
                              "reslab: use another checkpoint")
        return cls(**values)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _metadata_problem(values: dict) -> str | None:
    """What is wrong with the decoded metadata fields, or None: checked once, where a file is read,
    so everything that builds a model or preprocesses an image from it can trust it."""
    from reslab.data.bundle import RESIZE_MODES

    model, options, classes = values["model"], values["model_options"], values["classes"]
    pre, extra = values["preprocessing"], values["extra"]
    if not model:
        return "model is empty"
    if not isinstance(options, dict):
        return f"model_options must be a JSON object, got {options!r:.80}"
    if "num_classes" in options:
        return f"model_options holds num_classes ({options['num_classes']!r}), which the class list decides"
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return f"classes must be a list of names, got {classes!r:.80}"
    if not isinstance(pre, dict):
        return f"preprocessing must be a JSON object, got {pre!r:.80}"
    if not isinstance(extra, dict):
        return f"extra must be a JSON object, got {extra!r:.80}"
    size, channels = pre.get("image_size", 1), pre.get("in_channels", 3)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return f"preprocessing image_size must be a positive integer, got {size!r:.80}"
    if channels not in (1, 3) or isinstance(channels, bool):
        return f"preprocessing in_channels must be 1 or 3, got {channels!r:.80}"
    for key in ("mean", "std"):
        value = pre.get(key, [1.0])
        if (not isinstance(value, list) or len(value) not in (1, channels) or not all(map(_is_number, value))
                or (key == "std" and min(value) <= 0)):
            return (f"preprocessing {key} must be a list of 1 or {channels} finite numbers"
                    f"{' above 0' if key == 'std' else ''}, got {value!r:.80}")
    if pre.get("resize", RESIZE_MODES[0]) not in RESIZE_MODES:
        return f"preprocessing resize must be one of {', '.join(RESIZE_MODES)}, got {pre['resize']!r:.80}"
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DistributedDataParallel and torch.compile wrappers: what weights belong to."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def save_weights(path: str | os.PathLike, model: nn.Module, meta: CheckpointMeta) -> Path:
    """Write the model's state dict and `meta` atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta.to_metadata())
    return Path(path)


def resolve(path_or_run: str | os.PathLike, prefer: str = BEST) -> Path:
    """A weights file from a run directory (its best weights) or a file path; errors name the thing."""
    path = Path(path_or_run)
    if not path.exists():
        raise ReslabError(f"no run directory or weights file at {path}; check the path")
    if path.is_dir():
        for name in (prefer, LAST):
            if (path / name).is_file():
                return path / name
        raise ReslabError(f"{path} holds no run (no {BEST} or {LAST}); give a run directory made by `reslab train`")
    return path


def read_weights(path_or_run: str | os.PathLike) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """State dict and metadata of a reslab weights file or run directory. Never executes code."""
    from safetensors import SafetensorError, safe_open

    path = resolve(path_or_run)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = CheckpointMeta.from_metadata(f.metadata() or {}, path)
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ReslabError(f"{path} is not a readable safetensors checkpoint ({err}); give a reslab run or "
                          "weights file") from None
    return state, meta


def build_model(meta: CheckpointMeta) -> nn.Module:
    from reslab.models import create_model

    return create_model(meta.model, num_classes=meta.num_classes, **meta.model_options)


def load_model(path_or_run: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the model a reslab checkpoint describes and load its weights (strict), in eval mode."""
    state, meta = read_weights(path_or_run)
    model = build_model(meta)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        where = resolve(path_or_run)
        raise ReslabError(f"{where} does not match its own description ({meta.model}): {first}") from None
    return model.to(device).eval(), meta
