"""The inception vocabulary: layers written as the papers draw them, and one module of parallel branches.

An inception module (Szegedy et al. 2014, "Going deeper with convolutions", Figure 2) runs
several branches on the same input and concatenates their outputs along the channels. Every
module of GoogLeNet, Inception-v3, Inception-v4 and Inception-ResNet-v2 is that one idea with other
branches, so a module here is data (`Mixed`: one short string per branch) and `InceptionModule`
is the only class that runs one.

A layer is written as in the papers' figures:

    "3x3:96"      3x3 conv with 96 filters, BatchNorm, ReLU; stride 1, zero padding that keeps the size
    "1x7:128"     an asymmetric conv (Inception-v3 section 3.2: a 7x7 factorized into 1x7 and 7x1)
    "3x3/2V:384"  stride 2 and no padding: the papers' "V" (valid) marks
    "max3/2V"     3x3 max pool, stride 2, no padding; "avg3" is a 3x3 average pool, stride 1, padded

A branch is a chain of named links, `name=layer[,layer...]` (several layers under one name make an
nn.Sequential, as torchvision's GoogLeNet and timm nest them; torchvision's Inception-v3 gives every
layer its own name), and may end in a fork, `(name=layer | name=layer)`, whose outputs are
concatenated: Inception-v3's "expanded filter bank" (its Figure 7). The names are the checkpoints'
state-dict keys, so torchvision and timm weights load with strict=True.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from reslab.models.blocks import Concat, ScaledResidualAdd

_CONV = re.compile(r"^(\d+)x(\d+)(?:/(\d+))?(V?):(\d+)$")
_POOL = re.compile(r"^(max|avg)(\d+)(?:/(\d+))?(V?)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Style:
    """How a source implements the shared layers; one per net, so the modules stay plain data."""

    bn_eps: float = 1e-3  # every source ported TensorFlow weights, whose BatchNorm epsilon is 0.001
    ceil_mode: bool = False  # GoogLeNet (from Caffe) rounds pooled sizes up: 112 -> 56, not 55
    # torchvision's Inception-v3 averages over the zero padding too (F.avg_pool2d's default);
    # timm's ports of TensorFlow's Inception-v4 and Inception-ResNet-v2 count real pixels only.
    avg_count_pad: bool = True


class ConvBNReLU(nn.Module):
    """Conv (no bias: the BN shift is the bias), BatchNorm, ReLU: torchvision's `BasicConv2d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1, padding=0,
                 eps: float = 1e-3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def is_conv(text: str) -> bool:
    return _CONV.match(text) is not None


def make_layer(text: str, in_channels: int, style: Style) -> tuple[nn.Module, int]:
    """The layer a short form names (see the module docstring), and its output channels."""
    m = _CONV.match(text)
    if m:
        kh, kw, stride, valid, out = m.groups()
        kh, kw = int(kh), int(kw)
        padding = (0, 0) if valid else (kh // 2, kw // 2)
        kernel = kh if kh == kw else (kh, kw)
        padding = padding[0] if padding[0] == padding[1] else padding
        return ConvBNReLU(in_channels, int(out), kernel, int(stride or 1), padding, style.bn_eps), int(out)
    m = _POOL.match(text)
    if m:
        kind, k, stride, valid = m.groups()
        k, stride = int(k), int(stride or 1)
        padding = 0 if valid else k // 2
        if kind == "max":
            return nn.MaxPool2d(k, stride, padding, ceil_mode=style.ceil_mode), in_channels
        return nn.AvgPool2d(k, stride, padding, ceil_mode=style.ceil_mode,
                            count_include_pad=style.avg_count_pad), in_channels
    raise ValueError(f"not a layer: {text!r} (expected e.g. '3x3:96', '3x3/2V:384', 'max3/2V', 'avg3')")


@dataclass(frozen=True)
class Link:
    """Consecutive layers registered under one name: one layer itself, several an nn.Sequential."""

    name: str
    layers: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Link:
        name, sep, layers = text.strip().partition("=")
        if not sep or not _NAME.match(name) or not layers:
            raise ValueError(f"not a link: {text!r} (expected 'name=layer[,layer...]')")
        return cls(name, tuple(layers.split(",")))

    @property
    def convs(self) -> int:
        return sum(is_conv(layer) for layer in self.layers)

    def build(self, in_channels: int, style: Style) -> tuple[nn.Module, int]:
        modules = []
        for layer in self.layers:
            module, in_channels = make_layer(layer, in_channels, style)
            modules.append(module)
        return (modules[0] if len(modules) == 1 else nn.Sequential(*modules)), in_channels


@dataclass(frozen=True)
class Branch:
    links: tuple[Link, ...]
    fork: tuple[Link, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Branch:
        chain, _, fork = text.partition("(")
        if fork and not fork.rstrip().endswith(")"):
            raise ValueError(f"unclosed fork in branch {text!r}")
        links = tuple(Link.parse(t) for t in chain.split())
        forked = tuple(Link.parse(t) for t in fork.rstrip()[:-1].split("|")) if fork else ()
        if not links and not forked:
            raise ValueError(f"empty branch {text!r}")
        return cls(links, forked)

    @property
    def depth(self) -> int:
        """Weight layers on the branch's longest path."""
        return sum(link.convs for link in self.links) + max((link.convs for link in self.fork), default=0)


@dataclass(frozen=True)
class Mixed:
    """One inception module as data: a branch string per branch (see the module docstring).

    `residual_scale` makes it an Inception-ResNet module (Szegedy et al. 2016, Figures 16-19): the
    concatenation goes through a linear 1x1 conv back to the input's width, is scaled and added to
    the input, then a ReLU follows unless `relu` is False (Inception-ResNet-v2's last block).
    """

    branches: tuple[str, ...]
    residual_scale: float | None = None
    relu: bool = True

    @property
    def depth(self) -> int:
        deepest = max(Branch.parse(b).depth for b in self.branches)
        return deepest + (self.residual_scale is not None)


class InceptionModule(nn.Module):
    """Runs a `Mixed`: its branches on the same input, concatenated (and, if residual, added back).

    Links are registered on the module itself in the order the data lists them, which is the
    sources' order, so the state-dict keys and their order are the sources'.
    """

    def __init__(self, spec: Mixed, in_channels: int, style: Style):
        super().__init__()
        self.plan: list[tuple[list[str], list[str], str | None]] = []
        out_channels = 0
        for i, text in enumerate(spec.branches):
            branch = Branch.parse(text)
            channels, chain, fork = in_channels, [], []
            for link in branch.links:
                module, channels = link.build(channels, style)
                self.add_module(link.name, module)
                chain.append(link.name)
            join = None
            if branch.fork:
                widths = 0
                for link in branch.fork:
                    module, width = link.build(channels, style)
                    self.add_module(link.name, module)
                    fork.append(link.name)
                    widths += width
                join, channels = f"concat{i}", widths
                self.add_module(join, Concat())
            self.plan.append((chain, fork, join))
            out_channels += channels
        self.concat = Concat()
        self.residual = spec.residual_scale is not None
        if self.residual:
            # A linear 1x1 conv (bias, no BN, no ReLU; the TensorFlow original and timm's `conv2d`)
            # brings the concatenation back to the input's width so that the add is possible.
            self.conv2d = nn.Conv2d(out_channels, in_channels, 1)
            self.add = ScaledResidualAdd(spec.residual_scale)
            self.relu = nn.ReLU(inplace=True) if spec.relu else None
            out_channels = in_channels
        self.out_channels = out_channels

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2d.weight)
        nn.init.zeros_(self.conv2d.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for chain, fork, join in self.plan:
            y = x
            for name in chain:
                y = getattr(self, name)(y)
            if join is not None:
                y = getattr(self, join)(*[getattr(self, name)(y) for name in fork])
            outputs.append(y)
        out = self.concat(*outputs)
        if self.residual:
            out = self.add(self.conv2d(out), x)
            if self.relu is not None:
                out = self.relu(out)
        return out


class GoogLeNetAux(nn.Module):
    """GoogLeNet's auxiliary classifier (section 5), on inception 4a and 4d, as torchvision builds it.

    The paper pools 5x5 with stride 3 to 4x4; torchvision pools adaptively to 4x4 (the same size at
    224 px, slightly different windows), then 1x1 conv to 128, fc 1024 + ReLU, 70% dropout, fc.
    """

    def __init__(self, in_channels: int, num_classes: int, style: Style, dropout: float = 0.7):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv = ConvBNReLU(in_channels, 128, 1, eps=style.bn_eps)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        self.fc2 = nn.Linear(1024, num_classes).to(self.fc1.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(self.pool(x)), 1)
        return self.fc2(self.dropout(self.relu(self.fc1(x))))


class InceptionV3Aux(nn.Module):
    """Inception-v3's auxiliary classifier on the 17x17 grid (section 4; torchvision's `InceptionAux`).

    5x5/3 average pool, 1x1 conv to 128, 5x5 conv to 768, global pool, fc. The 5x5 conv needs the
    pooled grid to be at least 5x5, which takes the full 299 px input.
    """

    def __init__(self, in_channels: int, num_classes: int, style: Style):
        super().__init__()
        self.pool = nn.AvgPool2d(5, stride=3)
        self.conv0 = ConvBNReLU(in_channels, 128, 1, eps=style.bn_eps)
        self.conv1 = ConvBNReLU(128, 768, 5, eps=style.bn_eps)
        self.conv1.conv.init_std = 0.01  # torchvision's initialization of these two layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(768, num_classes)
        self.fc.init_std = 0.001

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(768, num_classes).to(self.conv0.conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.conv0(self.pool(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


AUX_HEADS = {"googlenet": GoogLeNetAux, "inception_v3": InceptionV3Aux}
