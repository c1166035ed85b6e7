"""Vanishing gradients: the norm of the gradient reaching each layer, plain against residual.

Paper section 4.1 argues that the plain nets' trouble is *not* vanishing gradients, since BN
keeps forward signals and backward gradients at healthy norms; the shortcuts of section 3.2 give
the gradient an identity path to every layer. This experiment measures both sides: the L2 norm
of the loss gradient with respect to each weight layer, from the input side to the output side,
at initialization and again after a few SGD steps.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from reslab.data import BatchLoader, DataBundle, load_data
from reslab.errors import ReslabError
from reslab.experiments.common import (
    check_model_names,
    default_image_size,
    default_out,
    model_depth,
    weight_layers,
)
from reslab.io import write_json
from reslab.models import create_model, get_model_spec


@dataclass
class GradientsConfig:
    models: list[str] = field(default_factory=lambda: ["plain20", "resnet20", "plain56", "resnet56"])
    data: str = "digits"
    image_size: int | None = None  # None: 8 for digits, else the CIFAR nets' native 32
    batch_size: int = 64
    steps: int = 20  # SGD steps between the two measurements
    lr: float = 0.1
    seed: int = 0
    out: str | None = None
    quiet: bool = True

    def __post_init__(self):
        self.models = list(self.models)
        check_model_names(self.models)
        for key in ("batch_size", "steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "batch_size" else 0):
                raise ReslabError(f"--{key.replace('_', '-')} must be an integer >= "
                                  f"{1 if key == 'batch_size' else 0}, got {value!r}")
        if not self.lr > 0:
            raise ReslabError(f"--lr must be positive, got {self.lr!r}")


def gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], float]:
    """L2 norm of d loss / d weight for each weight layer (input side first), and the loss."""
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    norms = [float(layer.weight.grad.norm()) for _, layer in weight_layers(model)]
    model.zero_grad(set_to_none=True)
    return norms, loss.item()


def sgd_steps(model: nn.Module, loader: BatchLoader, steps: int, lr: float) -> None:
    """A few steps of the paper's optimizer (section 3.4: SGD, momentum 0.9, weight decay 1e-4),
    taken with the trainer's own step function.

    Only the opening of training is measured here, so the learning rate is constant.
    """
    from reslab.train import make_step

    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    step = make_step(model, optimizer, precision="fp32", grad_clip=None, loss_fn=nn.CrossEntropyLoss())
    done, epoch = 0, 0
    while done < steps:
        loader.set_epoch(epoch)
        for x, y in loader:
            step(x, y)
            done += 1
            if done == steps:
                return
        epoch += 1


def measure_model(name: str, bundle: DataBundle, config: GradientsConfig, probe: tuple) -> dict:
    torch.manual_seed(config.seed)  # the same initialization recipe for every net
    model = create_model(name, num_classes=len(bundle.classes), in_channels=bundle.in_channels).train()
    layers = [layer_name for layer_name, _ in weight_layers(model)]
    init, init_loss = gradient_norms(model, *probe)
    loader = BatchLoader(bundle.train, config.batch_size, seed=config.seed, augment=bundle.augment,
                         mean=bundle.mean, std=bundle.std, drop_last=len(bundle.train) >= config.batch_size)
    sgd_steps(model, loader, config.steps, config.lr)
    after, after_loss = gradient_norms(model, *probe)
    return {
        "depth": model_depth(name),
        "residual": get_model_spec(name).residual,
        "layers": layers,
        "init": init,
        "after": after,
        "loss_init": init_loss,
        "loss_after": after_loss,
    }


def run_gradients(config: GradientsConfig, progress=None) -> dict:
    """Measure every model of `config` on one fixed probe batch; write gradients.json and .png."""
    from reslab import plots

    out = Path(config.out) if config.out else default_out("gradients")
    image_size = config.image_size or default_image_size(config.data)
    bundle = load_data(config.data, image_size=image_size, seed=config.seed, quiet=config.quiet)
    # One probe batch, the same for every model and both measurements.
    probe_loader = BatchLoader(bundle.train, config.batch_size, seed=config.seed + 1, mean=bundle.mean,
                               std=bundle.std)
    probe = next(iter(probe_loader))
    results = {}
    for k, name in enumerate(config.models):
        if progress is not None:
            progress(k, len(config.models), name)
        results[name] = measure_model(name, bundle, config, probe)
    summary = {
        "experiment": "gradients",
        "settings": {**asdict(config), "out": os.fspath(out), "image_size": image_size,
                     "probe_batch": len(probe[1]),
                     "measure": "L2 norm of d(cross-entropy)/d(weight) per conv/fc layer, input side first, "
                                "one fixed train-mode batch"},
        "models": results,
    }
    write_json(out / "gradients.json", summary)
    plots.gradient_norms(summary, out / "gradients.png")
    return summary
