"""What the three experiments share: which layers they look at, and models by name or by run.

The experiments compare a plain net with the residual net of the same depth (paper section 4.2),
so every measurement is keyed by model name and ordered from the input side to the output side.
"""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from reslab.errors import ReslabError
from reslab.models import ResidualAdd, get_model_spec

# The digits are 8x8 images: feeding them at their own size costs 16x less than upsampling to the
# CIFAR nets' native 32x32 and shows the same optimization difficulty (docs/experiments.md).
NATIVE_SIZES = {"digits": 8}


def default_image_size(data: str) -> int:
    """8 for the digits, else the CIFAR nets' native 32 (paper section 4.2)."""
    return NATIVE_SIZES.get(data, get_model_spec("resnet20").image_size)


def default_out(experiment: str) -> Path:
    return Path("runs") / f"experiment-{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_model_names(names: list[str]) -> None:
    """Registered names, each once (the experiments compare plain/residual pairs, paper section 4.2)."""
    if not names:
        raise ReslabError("give at least one model, e.g. plain20 resnet20")
    if len(set(names)) != len(names):
        raise ReslabError(f"each model may be given once, got {' '.join(names)}")
    for name in names:
        get_model_spec(name)  # unknown names fail here with the list of close matches


def model_depth(name: str) -> int:
    return get_model_spec(name).depth


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Convolutions and the classifier along the main path, input side first.

    These are the paper's counted layers (a 6n+2 net has 6n+2 of them); projection shortcuts
    (`downsample`) are left out so that plain and residual nets of one depth line up layer by layer.
    """
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and ".downsample" not in f".{name}":
            layers.append((name, module))
    return layers


def residual_branch_outputs(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Where each block's residual function ends: (block name, module to hook, how).

    Paper Figure 7 measures responses "after BN and before other nonlinearity (ReLU/addition)".
    A residual block's `ResidualAdd` receives that tensor as its first input ("pre": a forward
    pre-hook on the add); a plain block has no add, so its last BN's output is the same point
    ("post": a forward hook on the BN).
    """
    points = []
    for name, module in model.named_modules():
        if not hasattr(type(module), "residual"):  # blocks declare it; the net and its layers do not
            continue
        if getattr(module, "preact", False):
            raise ReslabError(
                f"layer responses are defined for post-activation blocks (paper Figure 7); {name} is a "
                "pre-activation block whose branch ends in a conv, not a BN"
            )
        add = getattr(module, "add", None)
        if isinstance(add, ResidualAdd):
            points.append((name, add, "pre"))
        else:
            last_bn = module.bn3 if hasattr(module, "bn3") else module.bn2
            points.append((name, last_bn, "post"))
    return points
