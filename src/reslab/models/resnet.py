"""One ResNet builder: stem, stages of blocks, head.

A depth or a family member is a line of data (block, stage depths, widths, groups) in
`registry.py`; this module only knows how to assemble it. ImageNet nets follow torchvision's
layout and key names exactly; CIFAR nets follow the paper's section 4.2 (3x3 stem with 16
filters, three stages of 2n layers with 16/32/64 filters, global pooling, fc).
"""

from __future__ import annotations

import torch
from torch import nn

from reslab.models.blocks import ZeroPadShortcut, conv1x1

SHORTCUTS = ("A", "B", "C")


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
        stem: str = "imagenet",
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
        stem_width = 64 if stem == "imagenet" else widths[0]
        if stem == "imagenet":
            # 7x7/2 conv and 3x3/2 max pool (paper Table 1, conv1 and the start of conv2_x).
            self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
        else:
            # CIFAR (section 4.2): "The first layer is 3x3 convolutions" with 16 filters.
            self.conv1 = nn.Conv2d(in_channels, stem_width, 3, stride=1, padding=1, bias=False)
        if not self.preact:
            # A pre-activation net leaves the stem's BN-ReLU to the first block (He et al., 2016).
            self.bn1 = nn.BatchNorm2d(stem_width)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else None

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
