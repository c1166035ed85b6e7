"""What a model is made of, measured from a real forward pass (pycls-style complexity).

`layer_table` lists every leaf layer, every residual add and every branch concatenation (an
inception module's output) with its output shape and parameters; `complexity` gives the totals.
Both run one batch-of-one forward pass in eval mode under `no_grad`, so a model's weights and
BatchNorm statistics are left as they were.
`measure(name)` builds a registered model without initializing its weights (the numbers do not
depend on them) and measures it: the whole registry takes seconds, not minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from reslab.models.blocks import Concat, ResidualAdd


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    # Multiply-accumulates of the layers that do arithmetic worth counting (convs and fc); the
    # convention of the paper's "FLOPs" in Table 1 (3.6e9 for ResNet-34 counts multiply-adds).
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def _is_row(module: nn.Module) -> bool:
    return isinstance(module, (ResidualAdd, Concat)) or (
        len(list(module.children())) == 0 and not isinstance(module, nn.Identity)
    )


def layer_table(model: nn.Module, input_size: tuple[int, int, int]) -> list[LayerRow]:
    """One row per leaf layer, residual add and concatenation, in execution order.

    A residual add's kind reads "ResidualAdd" (Inception-ResNet's scaled add too), a
    concatenation's "Concat".
    """
    probe = model
    param = next(model.parameters())
    rows: list[LayerRow] = []
    names = {m: n for n, m in probe.named_modules()}
    handles = []

    def hook(module, _inputs, output):
        rows.append(
            LayerRow(
                name=names[module],
                kind="ResidualAdd" if isinstance(module, ResidualAdd) else type(module).__name__,
                output_shape=tuple(output.shape[1:]),
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                macs=_macs(module, output),
            )
        )

    for module in probe.modules():
        if _is_row(module):
            handles.append(module.register_forward_hook(hook))
    was_training = probe.training
    probe.eval()
    try:
        with torch.no_grad():
            probe(torch.zeros((1, *input_size), device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
        probe.train(was_training)
    return rows


def complexity(model: nn.Module, input_size: tuple[int, int, int]) -> dict:
    """Totals: parameters, trainable parameters, MACs and activations (elements) at `input_size`."""
    rows = layer_table(model, input_size)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "macs": sum(r.macs for r in rows),
        "activations": sum(int(torch.Size(r.output_shape).numel()) for r in rows if r.kind.startswith("Conv")),
        "residual_adds": sum(r.kind == "ResidualAdd" for r in rows),
        "concats": sum(r.kind == "Concat" for r in rows),
        "input_size": list(input_size),
    }


def uninitialized(name: str, **options) -> nn.Module:
    """A registered model with allocated but uninitialized weights: for shapes and counts only.

    Building on the meta device skips the He initialization, the slow part for the big nets.
    """
    from reslab.models.registry import create_model

    with torch.device("meta"):
        model = create_model(name, **options)
    return model.to_empty(device="cpu")


def measure(name: str, input_size: tuple[int, int, int] | None = None, **options) -> dict:
    """`complexity` of a registered model at `input_size` (default: its family's native input)."""
    from reslab.models.registry import get_model_spec

    if input_size is None:
        size = get_model_spec(name).image_size
        input_size = (options.get("in_channels", 3), size, size)
    return complexity(uninitialized(name, **options), input_size)
