"""Layer responses: the standard deviation of each residual function's output (paper Figure 7).

Paper section 4.2, "Analysis of Layer Responses": the responses are the outputs of each layer
after BN and before the nonlinearity or the addition. ResNets show generally smaller responses
than their plain counterparts, and deeper ResNets smaller ones still, supporting the motivation
of section 3.1 that residual functions are generally closer to zero than non-residual ones.
Here the response of each block's function F(x) is measured where it ends: the input of the
block's `ResidualAdd`, or, in a plain block, the output of its last BN.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from reslab.checkpoint import load_model
from reslab.data import DataBundle, load_data
from reslab.errors import ReslabError
from reslab.experiments.common import default_image_size, default_out, model_depth, residual_branch_outputs
from reslab.infer import normalizer
from reslab.io import write_json
from reslab.models import create_model, get_model_spec

SPLITS = ("test", "val", "train")


@dataclass
class ResponsesConfig:
    sources: list[str] = field(default_factory=lambda: ["plain20", "resnet20", "plain56", "resnet56"])
    data: str | None = None  # None: a run's own data, else digits for model names
    image_size: int | None = None  # model names only; None: 8 for digits, else the native input
    split: str = "test"  # the first of test, val, train that the data has, from this one on
    max_images: int = 1000
    batch_size: int = 256
    seed: int = 0
    out: str | None = None
    quiet: bool = True

    def __post_init__(self):
        self.sources = list(self.sources)
        if not self.sources:
            raise ReslabError("give at least one trained run directory, weights file or model name")
        if self.split not in SPLITS:
            raise ReslabError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        for key in ("max_images", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ReslabError(f"--{key.replace('_', '-')} must be an integer >= 1, got {value!r}")


@dataclass
class Subject:
    """One network to measure: its weights (trained or initialized) and the images it expects."""

    label: str
    name: str
    model: nn.Module
    trained: bool
    source: str
    data: str
    image_size: int
    seed: int = 0
    val_split: float | None = None
    mean: tuple = (0.0,)
    std: tuple = (1.0,)


def _run_config(path: Path) -> dict:
    """The run's config.json (data, seed, val split) when the weights sit in a run directory."""
    run_dir = path if path.is_dir() else path.parent
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    config = saved.get("config") if isinstance(saved, dict) else None
    return config if isinstance(config, dict) else {}


def load_subject(source: str, config: ResponsesConfig) -> Subject:
    path = Path(source)
    if path.exists():
        model, meta = load_model(path)
        run = _run_config(path)
        data = config.data or run.get("data") or meta.extra.get("data")
        if not data:
            raise ReslabError(f"{source}: the checkpoint does not say which data it was trained on; "
                              "give --data")
        pre = meta.preprocessing
        return Subject(
            label=meta.model, name=meta.model, model=model, trained=True, source=os.fspath(path), data=data,
            image_size=int(pre.get("image_size") or get_model_spec(meta.model).image_size),
            seed=int(run.get("seed", config.seed)), val_split=run.get("val_split"),
            mean=tuple(pre.get("mean", (0.0,))), std=tuple(pre.get("std", (1.0,))),
        )
    try:
        spec = get_model_spec(source)
    except ReslabError:
        raise ReslabError(f"{source!r} is neither a run directory or weights file nor a model name; "
                          "give a path made by `reslab train` or a name such as plain20") from None
    data = config.data or "digits"
    image_size = config.image_size or (default_image_size(data) if spec.family == "cifar" else spec.image_size)
    return Subject(label=source, name=source, model=None, trained=False, source=source, data=data,
                   image_size=image_size, seed=config.seed)


def pick_split(bundle: DataBundle, wanted: str) -> tuple[str, object]:
    for name in SPLITS[SPLITS.index(wanted):]:
        split = getattr(bundle, name)
        if split is not None and len(split):
            return name, split
    raise ReslabError(f"data {bundle.name!r} has no {wanted} split or later one to measure responses on")


@torch.inference_mode()
def response_std(model: nn.Module, images: torch.Tensor, normalize, batch_size: int) -> tuple[list[str], list[float]]:
    """Per block: std over images and positions of each channel of F(x), averaged over channels.

    Each channel is one filter's response; its spread over the data is what Figure 7 compares.
    Sums are kept in float64 so thousands of images add up exactly enough.
    """
    points = residual_branch_outputs(model)
    sums = [None] * len(points)

    def accumulate(i, t):
        t = t.detach().double()
        count = t.shape[0] * t.shape[2] * t.shape[3]
        stats = torch.stack([t.sum((0, 2, 3)), (t * t).sum((0, 2, 3))])
        sums[i] = (stats, count) if sums[i] is None else (sums[i][0] + stats, sums[i][1] + count)

    handles = []
    for i, (_, module, how) in enumerate(points):
        if how == "pre":
            handles.append(module.register_forward_pre_hook(lambda _m, inputs, i=i: accumulate(i, inputs[0])))
        else:
            # Read in the hook itself: the ReLU after a plain block's BN runs in place.
            handles.append(module.register_forward_hook(lambda _m, _inp, out, i=i: accumulate(i, out)))
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model(normalize(images[start : start + batch_size]))
    finally:
        for h in handles:
            h.remove()
    stds = []
    for stats, count in sums:
        mean = stats[0] / count
        var = (stats[1] / count - mean * mean).clamp_min(0)
        stds.append(float(var.sqrt().mean()))
    return [name for name, _, _ in points], stds


def run_responses(config: ResponsesConfig, progress=None) -> dict:
    """Measure every source of `config`; write responses.json and responses.png."""
    from reslab import plots

    out = Path(config.out) if config.out else default_out("responses")
    subjects = [load_subject(s, config) for s in config.sources]
    labels = [s.label for s in subjects]
    for s in subjects:
        if labels.count(s.label) > 1:
            s.label = f"{s.label} ({s.source})"
    bundles: dict[tuple, DataBundle] = {}
    results = {}
    for k, s in enumerate(subjects):
        if progress is not None:
            progress(k, len(subjects), s.label)
        key = (s.data, s.image_size, s.seed, s.val_split)
        if key not in bundles:
            bundles[key] = load_data(s.data, image_size=s.image_size, val_split=s.val_split, seed=s.seed,
                                     quiet=config.quiet)
        bundle = bundles[key]
        if s.model is None:
            torch.manual_seed(config.seed)
            s.model = create_model(s.name, num_classes=len(bundle.classes), in_channels=bundle.in_channels)
            s.mean, s.std = bundle.mean, bundle.std
        split_name, split = pick_split(bundle, config.split)
        images = split.images[: config.max_images]
        normalize = normalizer(s.mean, s.std, bundle.in_channels)
        blocks, stds = response_std(s.model, images, normalize, config.batch_size)
        results[s.label] = {
            "model": s.name,
            "depth": model_depth(s.name),
            "residual": get_model_spec(s.name).residual,
            "trained": s.trained,
            "source": s.source,
            "data": s.data,
            "split": split_name,
            "images": len(images),
            "blocks": blocks,
            "std": stds,
        }
    summary = {
        "experiment": "responses",
        "settings": {**asdict(config), "out": os.fspath(out),
                     "measure": "per block: std over images and positions of each channel of the residual "
                                "function's output (after its last BN, before the add), averaged over "
                                "channels; eval mode. Initialized nets keep BN's initial statistics."},
        "models": results,
    }
    write_json(out / "responses.json", summary)
    plots.layer_responses(summary, out / "responses.png")
    return summary
