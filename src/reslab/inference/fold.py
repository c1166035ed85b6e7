"""BatchNorm folded into the convolution before it: the first thing every fast path does."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every BatchNorm that directly follows a convolution folded
    into that convolution's weight and bias, the BatchNorm replaced by `nn.Identity`.

    At inference BN is a fixed per-channel affine map (Ioffe & Szegedy 2015, section 3.1), so
    conv -> BN is one conv with w' = w * gamma / sigma and b' = beta + (b - mu) * gamma / sigma:
    a third of a ResNet's layers and a full read and write of each activation disappear. Which
    conv feeds which BN is read from a torch.fx trace, so pre-activation blocks (BN before the
    conv) keep the BNs that cannot be folded; a conv whose output is also used elsewhere is left
    alone. The module tree and its methods (forward_features, ...) stay as they were.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # a foreign model fx cannot trace: still correct, just not folded
        warnings.warn(f"fold_batchnorm: could not trace {type(model).__name__} ({err}); BatchNorm left unfolded",
                      stacklevel=2)
        return model
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or calls[node.target] != 1:
            continue
        source = node.args[0]
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        conv = modules.get(source.target)
        if not isinstance(conv, nn.Conv2d) or calls[source.target] != 1:
            continue
        _set_submodule(model, source.target, fuse_conv_bn_eval(conv, bn))
        _set_submodule(model, node.target, nn.Identity())
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
