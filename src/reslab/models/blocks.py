"""Residual blocks (He et al., 2015, section 3; He et al., 2016, "Identity Mappings").

Every block has one constructor signature so that one stage builder (`resnet.make_stage`) works
with all of them, the plain (no-shortcut) blocks included. Key names follow torchvision
(`conv1`, `bn1`, ..., `downsample`) so checkpoints interchange.

The residual add is a module of its own (`ResidualAdd`): it has no parameters, so state dicts
are unchanged, but it gives the layer table a row per add and lets the experiments hook the
residual function's output right before the add (the paper's Figure 7). An inception module's
concatenation (`Concat`) is one too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ResidualAdd(nn.Module):
    """y = F(x) + shortcut(x), the paper's equation (1) and (2)."""

    def forward(self, residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return residual + shortcut


class ScaledResidualAdd(ResidualAdd):
    """y = x + scale * F(x): Inception-ResNet's add (Szegedy et al., 2016, section 3.3).

    Scaling the residual down (0.1 to 0.3) before the add is what kept their widest nets from
    "dying" early in training; a subclass, so the layer table counts it as a residual add.
    """

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return residual * self.scale + shortcut

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class Concat(nn.Module):
    """Parallel branches joined along the channels: the output of an inception module.

    A module of its own for the same reason as `ResidualAdd`: no parameters, but a row per
    concatenation in the layer table and a place to hook the joined feature maps.
    """

    def forward(self, *branches: torch.Tensor) -> torch.Tensor:
        return torch.cat(branches, 1)


class ZeroPadShortcut(nn.Module):
    """Shortcut option A (paper section 4.2): identity with zero-padded extra channels.

    Done as the common PyTorch CIFAR code does it, so its checkpoints give the same logits:
    subsample by taking every `stride`-th pixel, then pad the new channels with zeros equally on
    both sides. No parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = (out_channels - in_channels) // 2
        self.extra = out_channels - in_channels - self.pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.extra))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad}, {self.extra})"


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class _PostActivationBlock(nn.Module):
    """Shared forward of the original (post-activation) blocks: y = ReLU(F(x) + shortcut(x))."""

    residual = True
    preact = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual_function(x)
        if self.residual:
            shortcut = x if self.downsample is None else self.downsample(x)
            out = self.add(out, shortcut)
        return self.relu_out(out)


class BasicBlock(_PostActivationBlock):
    """Two 3x3 convolutions (paper Figure 5, left). The stride sits in the first conv."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        stride_in_1x1: bool = False,
    ):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("basic blocks support only groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        if self.residual:
            self.add = ResidualAdd()
        self.relu_out = nn.ReLU(inplace=True)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def residual_function(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class Bottleneck(_PostActivationBlock):
    """1x1 reduce, 3x3, 1x1 expand (paper Figure 5, right).

    torchvision ("v1.5") puts the downsampling stride in the 3x3; the original paper and Keras put
    it in the first 1x1 (`stride_in_1x1=True`), which skips three quarters of the 3x3's input.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        stride_in_1x1: bool = False,
    ):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, width, stride_1x1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width, stride_3x3, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample
        if self.residual:
            self.add = ResidualAdd()
        self.relu_out = nn.ReLU(inplace=True)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def residual_function(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class PlainBlock(BasicBlock):
    """The paper's plain counterpart (section 4.1): the same two convolutions, no shortcut."""

    residual = False


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block (He et al., 2016, Figure 1b): BN-ReLU-conv, twice, then add.

    Nothing follows the add, so the identity path is clean from block to block. A projection
    shortcut takes the pre-activated input, as in the authors' code.
    """

    expansion = 1
    residual = True
    preact = True

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        stride_in_1x1: bool = False,
    ):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("basic blocks support only groups=1 and base_width=64")
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample
        self.add = ResidualAdd()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)  # no norm follows the last conv in a pre-activation block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu2(self.bn2(out)))
        return self.add(out, shortcut)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (He et al., 2016): (BN-ReLU-conv) x 3 with 1x1, 3x3, 1x1."""

    expansion = 4
    residual = True
    preact = True

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        stride_in_1x1: bool = False,
    ):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv1x1(inplanes, width, stride_1x1)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width, stride_3x3, groups)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.downsample = downsample
        self.add = ResidualAdd()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return self.add(out, shortcut)


BLOCKS = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "plain": PlainBlock,
    "preact_basic": PreActBasicBlock,
    "preact_bottleneck": PreActBottleneck,
}
