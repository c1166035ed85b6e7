"""Myrtle.ai's ResNet-9: the DAWNBench CIFAR-10 net of David C. Page, "How to Train Your ResNet"
(Myrtle.ai blog, 2018, parts 1-8; code: github.com/davidcpage/cifar10-fast, `dawn.py`'s `net()`).

It reached 94 % CIFAR-10 test accuracy in 24 epochs (79 s on one V100), a tenth of the paper's
ResNet-20 schedule, by being wide and shallow: few layers at high resolution, where a CIFAR
ResNet spends most of its arithmetic, and the width where the maps are small. The layers, as
`net()` builds them (channels prep 64, layer1 128, layer2 256, layer3 512):

    prep     conv 3x3 - BN - ReLU                                  32 x 32
    layer1   conv 3x3 - BN - ReLU - max pool 2, residual(res1, res2)  16 x 16
    layer2   conv 3x3 - BN - ReLU - max pool 2                        8 x 8
    layer3   conv 3x3 - BN - ReLU - max pool 2, residual(res1, res2)   4 x 4
    pool     max over the map (`MaxPool2d(4)` at 32 px; adaptive here, so other sizes work)
    linear   no bias, its output multiplied by 0.125

A residual branch is two conv-BN-ReLU layers added to the input with nothing after the add (the
ReLU sits *before* the add, unlike the paper's blocks). The 0.125 on the logits keeps the softmax
from saturating early at the high learning rates the net trains with (part 3 of the series).
Every convolution is 3x3 without bias (the BN shift is the bias). Key names are Page's
(`prep.conv`, `layer1.residual.res1.bn`, `linear`), so his state dicts map one to one.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from reslab.models.blocks import ResidualAdd
from reslab.models.inception_blocks import ConvBNReLU

# Page's `batch_norm` is torch's default BatchNorm2d (eps 1e-5); ConvBNReLU defaults to Inception's 1e-3.
BN_EPS = 1e-5


def conv_bn(in_channels: int, out_channels: int) -> ConvBNReLU:
    return ConvBNReLU(in_channels, out_channels, 3, padding=1, eps=BN_EPS)


class MyrtleResidual(nn.Module):
    """y = x + res2(res1(x)), each a conv-BN-ReLU at the stage's width; no activation after the add."""

    residual = True
    preact = False

    def __init__(self, channels: int):
        super().__init__()
        self.res1 = conv_bn(channels, channels)
        self.res2 = conv_bn(channels, channels)
        self.add = ResidualAdd()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.res2.bn.weight)  # res2 then outputs ReLU(0) = 0: the branch starts off

    def residual_function(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.res1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(self.residual_function(x), x)


def make_myrtle_stage(in_channels: int, out_channels: int, residual: bool) -> nn.Sequential:
    """conv-BN-ReLU to the new width, 2x2 max pool, and a residual branch where `residual`."""
    layers = conv_bn(in_channels, out_channels)
    parts = [("conv", layers.conv), ("bn", layers.bn), ("relu", layers.relu), ("pool", nn.MaxPool2d(2))]
    if residual:
        parts.append(("residual", MyrtleResidual(out_channels)))
    return nn.Sequential(OrderedDict(parts))


class MyrtleResNet9(nn.Module):
    """prep -> layer1..layerN -> global max pool -> `linear` (no bias) x `head_scale`.

    `widths` are the prep layer's and each stage's; `residual_stages` says which stages carry a
    residual branch. `num_classes=0` drops the classifier: `forward` returns pooled features.
    """

    classifier_name = "linear"
    stem_names = ("prep",)  # the stem, for reslab.transfer.body_parts (a ResNet's is conv1 and bn1)

    def __init__(self, widths=(64, 128, 256, 512), residual_stages=(True, False, True), *, num_classes: int = 10,
                 in_channels: int = 3, head_scale: float = 0.125, zero_init_residual: bool = False):
        super().__init__()
        self.head_scale = head_scale
        self.prep = conv_bn(in_channels, widths[0])
        self.stage_names = []
        for i, (width, residual) in enumerate(zip(widths[1:], residual_stages, strict=True)):
            name = f"layer{i + 1}"
            self.add_module(name, make_myrtle_stage(widths[i], width, residual))
            self.stage_names.append(name)
        self.num_features = widths[-1]
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes, bias=False) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            # He initialization, as the registry's other nets (Page's code keeps torch's default).
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, MyrtleResidual):
                    m.zero_init_last()

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, name) for name in self.stage_names]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (N, num_features, H', W'), before pooling."""
        x = self.prep(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)
        if pre_logits or self.num_classes == 0:
            return x
        return self.linear(x) * self.head_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialized head with `num_classes` outputs (0: no head)."""
        self.num_classes = num_classes
        device = next(self.parameters()).device
        self.linear = (nn.Linear(self.num_features, num_classes, bias=False).to(device) if num_classes > 0
                       else nn.Identity())
