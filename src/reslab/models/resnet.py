"""One ResNet builder: stem, stages of blocks, head.

A depth or a family member is a line of data (block, stage depths, widths, groups) in
`registry.py`; this module only knows how to assemble it. ImageNet nets follow torchvision's
layout and key names exactly; CIFAR nets follow the paper's section 4.2 (3x3 stem with 16
filters, three stages of 2n layers with 16/32/64 filters, global pooling, fc).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from reslab.models.blocks import ZeroPadShortcut, conv1x1

SHORTCUTS = ("A", "B", "C")


@dataclass(frozen=True)
class Stem:
    """What comes before the first stage: convolutions (the first one strided), then an optional
    3x3/2 max pool. A width of 0 means the first stage's width."""

    kernel: int
    widths: tuple[int, ...]
    stride: int
    maxpool: bool


STEMS = {
    # Paper Table 1: 7x7/2 conv and 3x3/2 max pool (the start of conv2_x): 224 px becomes 56.
    "imagenet": Stem(7, (64,), 2, True),
    # Section 4.2: "The first layer is 3x3 convolutions", stride 1, no pool: 32 px stays 32.
    "cifar": Stem(3, (0,), 1, False),
    # The deep stem of He et al. 2019 ("Bag of Tricks", ResNet-C) and timm's resnet*d: three 3x3
    # convolutions (32, 32, 64) see the same 7x7 window with more nonlinearity, then the max pool.
    "deep": Stem(3, (32, 32, 64), 2, True),
}
# The stem each family's nets have unless `stem=` says otherwise (torchvision / the paper exactly).
FAMILY_STEMS = {"imagenet": "imagenet", "cifar": "cifar"}


def make_shortcut(block, inplanes: int, outplanes: int, stride: int, shortcut: str) -> nn.Module | None:
    """The shortcut of one block, or None for the plain identity.

    Paper section 3.3: (A) zero-padding identity where the shape changes, no parameters;
    (B) projection where the shape changes, identity elsewhere; (C) projection everywhere.
    """
    if not block.residual:
        return None
    changes = stride != 1 or inplanes != outplanes
    if shortcut == "A":
        return ZeroPadShortcut(inplanes, outplanes, stride) if changes else None
    if shortcut == "B" and not changes:
        return None
    if block.preact:
        # The input is already pre-activated by the block's own BN-ReLU: a bare projection.
        return nn.Sequential(conv1x1(inplanes, outplanes, stride))
    return nn.Sequential(conv1x1(inplanes, outplanes, stride), nn.BatchNorm2d(outplanes))


def make_stage(
    block,
    inplanes: int,
    planes: int,
    depth: int,
    stride: int,
    *,
    shortcut: str = "B",
    groups: int = 1,
    base_width: int = 64,
    stride_in_1x1: bool = False,
) -> nn.Sequential:
    """`depth` blocks; the first one changes resolution and width (torchvision's `_make_layer`)."""
    layers = []
    for i in range(depth):
        block_in = inplanes if i == 0 else planes * block.expansion
        block_stride = stride if i == 0 else 1
        layers.append(
            block(
                block_in,
                planes,
                block_stride,
                make_shortcut(block, block_in, planes * block.expansion, block_stride, shortcut),
                groups=groups,
                base_width=base_width,
                stride_in_1x1=stride_in_1x1,
            )
        )
    return nn.Sequential(*layers)


def _stem_convs(in_channels: int, widths: list[int], kernel: int, stride: int) -> nn.Module:
    """One conv (key `conv1`, as torchvision), or a conv-BN-ReLU chain whose last conv is followed by
    the net's `bn1` (keys `conv1.0` ... `conv1.6`, as timm's deep stem)."""
    if len(widths) == 1:
        return nn.Conv2d(in_channels, widths[0], kernel, stride=stride, padding=kernel // 2, bias=False)
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        layers.append(nn.Conv2d(in_channels, width, kernel, stride=stride if i == 0 else 1, padding=kernel // 2,
                                bias=False))
        if i < len(widths) - 1:
            layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """Stem -> stages (`layer1`..`layerN`) -> global average pool -> `fc`.

    `num_classes=0` drops the classifier: `forward` then returns pooled features, as Keras's
    `include_top=False, pooling="avg"`.
    """

    classifier_name = "fc"  # as InceptionNet's, whose sources name it otherwise (last_linear, classif)

    def __init__(
        self,
        block,
        depths: list[int],
        widths: list[int],
        *,
        stem: str | Stem = "imagenet",
        num_classes: int = 1000,
        in_channels: int = 3,
        groups: int = 1,
        width_per_group: int = 64,
        shortcut: str = "B",
        stride_in_1x1: bool = False,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.block = block
        self.stem_type = stem
        self.preact = block.preact
        spec = STEMS[stem] if isinstance(stem, str) else stem
        stem_widths = [w or widths[0] for w in spec.widths]
        stem_width = stem_widths[-1]
        self.conv1 = _stem_convs(in_channels, stem_widths, spec.kernel, spec.stride)
        if not self.preact:
            # A pre-activation net leaves the stem's BN-ReLU to the first block (He et al., 2016).
            self.bn1 = nn.BatchNorm2d(stem_width)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if spec.maxpool else None

        inplanes = stem_width
        self.stage_names = []
        for i, (depth, planes) in enumerate(zip(depths, widths)):
            stage = make_stage(
                block,
                inplanes,
                planes,
                depth,
                stride=1 if i == 0 else 2,
                shortcut=shortcut,
                groups=groups,
                base_width=width_per_group,
                stride_in_1x1=stride_in_1x1,
            )
            name = f"layer{i + 1}"
            self.add_module(name, stage)
            self.stage_names.append(name)
            inplanes = planes * block.expansion
        self.num_features = inplanes
        if self.preact:
            # The last block's add has no activation after it; the head needs one BN-ReLU.
            self.bn_final = nn.BatchNorm2d(inplanes)
            self.relu_final = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_classes = num_classes
        self.fc = nn.Linear(inplanes, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # He initialization (He et al., 2015b), as the paper and torchvision use.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts at zero, so each block starts as the identity
            # (Goyal et al., 2017): the deep net begins as a shallow one.
            for m in self.modules():
                if hasattr(m, "zero_init_last") and getattr(m, "residual", False):
                    m.zero_init_last()

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, name) for name in self.stage_names]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if not self.preact:
            x = self.relu(self.bn1(x))
        if self.maxpool is not None:
            x = self.maxpool(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (N, num_features, H', W'), before pooling."""
        x = self.forward_stem(x)
        for stage in self.stages:
            x = stage(x)
        if self.preact:
            x = self.relu_final(self.bn_final(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialized head with `num_classes` outputs (0: no head)."""
        self.num_classes = num_classes
        device = next(self.parameters()).device
        self.fc = nn.Linear(self.num_features, num_classes).to(device) if num_classes > 0 else nn.Identity()
