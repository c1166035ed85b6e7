"""Google's Inception family as lines of data, assembled by one builder (`InceptionNet`).

- GoogLeNet (Szegedy et al. 2014, "Going deeper with convolutions"): torchvision's `googlenet`.
- Inception-v3 (Szegedy et al. 2015, "Rethinking the Inception Architecture for Computer
  Vision"): torchvision's `inception_v3`.
- Inception-v4 and Inception-ResNet-v2 (Szegedy et al. 2016, "Inception-v4, Inception-ResNet and
  the Impact of Residual Connections on Learning"): timm's `inception_v4` and `inception_resnet_v2`.
- `inception_small` and `inception_resnet_small`: the same modules, narrow and shallow, for 32 px;
  `inception_resnet_small_plain`: the latter without its residual adds.

A net is a list of (name, item) lines: an item is a layer string ("3x3/2V:32"), an inception
module (`Mixed`), a tuple of items (an nn.Sequential, as timm nests `features` and `repeat`), or an
auxiliary classifier (`Aux`). Module recipes below are functions of their widths; each names the
paper figure it draws. Line names and link names are the sources' state-dict keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.models.inception_blocks import AUX_HEADS, InceptionModule, Mixed, Style, is_conv, make_layer


@dataclass(frozen=True)
class Aux:
    """An auxiliary classifier fed by the output of body line `tap` (used in training only)."""

    tap: str
    head: str  # a key of inception_blocks.AUX_HEADS


Item = str | Mixed | Aux | tuple


@dataclass(frozen=True)
class Head:
    """Names and dropout of the classifier head: global average pool, dropout, linear."""

    pool: str = "avgpool"
    drop: str | None = "dropout"
    fc: str = "fc"
    dropout: float = 0.0


class GoogLeNetOutputs(NamedTuple):
    """What torchvision's GoogLeNet returns in training mode with aux_logits=True.

    In torchvision the field names come out swapped against its heads: `aux_logits2` holds `aux1`'s
    logits (the head on inception4a) and `aux_logits1` holds `aux2`'s (on inception4d). Kept as is,
    so code written for torchvision reads the same numbers from the same fields.
    """

    logits: torch.Tensor
    aux_logits2: torch.Tensor
    aux_logits1: torch.Tensor


class InceptionOutputs(NamedTuple):
    """What torchvision's Inception-v3 returns in training mode with aux_logits=True."""

    logits: torch.Tensor
    aux_logits: torch.Tensor


@dataclass(frozen=True)
class Arch:
    """Everything that makes one net, as data."""

    body: tuple[tuple[str, Item], ...]
    block: str  # the kind of inception module, for `reslab models`
    image_size: int
    head: Head = Head()
    style: Style = Style()
    num_classes: int = 1000
    init_std: float | None = None  # truncated normal as torchvision initializes; None: He init
    outputs: type | None = None  # the NamedTuple of (logits, *aux logits) returned in training mode
    # Weights of the auxiliary losses, in the order of `outputs[1:]`:
    # loss = main + sum(w * aux_loss). GoogLeNet section 5: "weighted by 0.3". Inception-v3's paper
    # gives none; its authors' training code (TF-Slim train_image_classifier.py, and the
    # inception_model.py of tensorflow/models' inception) weights the aux loss 0.4.
    aux_loss_weights: tuple[float, ...] = ()
    transform_input: bool = False  # whether the source offers the option (torchvision's nets do)
    source: str = ""

    @property
    def has_aux(self) -> bool:
        return any(isinstance(item, Aux) for _, item in self.body)

    @property
    def residual(self) -> bool:
        return any(_residual(item) for _, item in self.body)

    @property
    def depth(self) -> int:
        """Weight layers on the longest path from input to logits (GoogLeNet: 22, as its paper counts)."""
        return sum(_depth(item) for _, item in self.body) + 1

    @property
    def feature_layer(self) -> str:
        """The module whose output `forward_features` returns: the last block, for Grad-CAM."""
        name, item = [(n, i) for n, i in self.body if not isinstance(i, Aux)][-1]
        return f"{name}.{len(item) - 1}" if isinstance(item, tuple) else name


def _depth(item: Item) -> int:
    if isinstance(item, str):
        return int(is_conv(item))
    if isinstance(item, Mixed):
        return item.depth
    if isinstance(item, tuple):
        return sum(_depth(i) for i in item)
    return 0  # an auxiliary head is a side path


def _residual(item: Item) -> bool:
    if isinstance(item, tuple):
        return any(_residual(i) for i in item)
    return isinstance(item, Mixed) and item.residual_scale is not None


# ---- GoogLeNet (2014) ----------------------------------------------------------------------------

def googlenet_module(c1: int, c3_reduce: int, c3: int, c5_reduce: int, c5: int, pool_proj: int) -> Mixed:
    """Figure 2(b): 1x1; 1x1 then 3x3; 1x1 then "5x5"; 3x3 max pool then 1x1 (Table 1's six widths).

    The "5x5" branch is a 3x3 in torchvision (pytorch/vision#906), which its weights were ported
    with; kept so that they load and give torchvision's outputs.
    """
    return Mixed((
        f"branch1=1x1:{c1}",
        f"branch2=1x1:{c3_reduce},3x3:{c3}",
        f"branch3=1x1:{c5_reduce},3x3:{c5}",
        f"branch4=max3,1x1:{pool_proj}",
    ))


def googlenet_stages(divisor: int = 1) -> tuple:
    """Inception 3a to 5b with the max pools between them: the paper's Table 1 (widths / divisor)."""

    def module(*widths):
        return googlenet_module(*(w // divisor for w in widths))

    return (
        ("inception3a", module(64, 96, 128, 16, 32, 32)),
        ("inception3b", module(128, 128, 192, 32, 96, 64)),
        ("maxpool3", "max3/2V"),
        ("inception4a", module(192, 96, 208, 16, 48, 64)),
        ("inception4b", module(160, 112, 224, 24, 64, 64)),
        ("inception4c", module(128, 128, 256, 24, 64, 64)),
        ("inception4d", module(112, 144, 288, 32, 64, 64)),
        ("inception4e", module(256, 160, 320, 32, 128, 128)),
        ("maxpool4", "max2/2V"),
        ("inception5a", module(256, 160, 320, 32, 128, 128)),
        ("inception5b", module(384, 192, 384, 48, 128, 128)),
    )


GOOGLENET = Arch(
    body=(
        ("conv1", "7x7/2:64"),
        ("maxpool1", "max3/2V"),
        ("conv2", "1x1:64"),
        ("conv3", "3x3:192"),
        ("maxpool2", "max3/2V"),
        *googlenet_stages(),
        ("aux1", Aux("inception4a", "googlenet")),
        ("aux2", Aux("inception4d", "googlenet")),
    ),
    block="inception_v1",
    image_size=224,
    head=Head(dropout=0.2),
    style=Style(ceil_mode=True),
    init_std=0.01,
    outputs=GoogLeNetOutputs,
    aux_loss_weights=(0.3, 0.3),
    transform_input=True,
    source="torchvision.models.googlenet",
)


# ---- Inception-v3 (2015) -------------------------------------------------------------------------

def inception_v3_a(pool_proj: int) -> Mixed:
    """Figure 5: the 5x5 replaced by two 3x3 (torchvision keeps a 5x5 branch too, as TF does)."""
    return Mixed((
        "branch1x1=1x1:64",
        "branch5x5_1=1x1:48 branch5x5_2=5x5:64",
        "branch3x3dbl_1=1x1:64 branch3x3dbl_2=3x3:96 branch3x3dbl_3=3x3:96",
        f"pool=avg3 branch_pool=1x1:{pool_proj}",
    ))


def inception_v3_b() -> Mixed:
    """Grid reduction 35 -> 17 (Figure 10): strided convs beside a max pool, concatenated."""
    return Mixed((
        "branch3x3=3x3/2V:384",
        "branch3x3dbl_1=1x1:64 branch3x3dbl_2=3x3:96 branch3x3dbl_3=3x3/2V:96",
        "pool=max3/2V",
    ))


def inception_v3_c(c7: int) -> Mixed:
    """Figure 6 with n=7: each 7x7 factorized into 1x7 and 7x1 (section 3.2)."""
    return Mixed((
        "branch1x1=1x1:192",
        f"branch7x7_1=1x1:{c7} branch7x7_2=1x7:{c7} branch7x7_3=7x1:192",
        f"branch7x7dbl_1=1x1:{c7} branch7x7dbl_2=7x1:{c7} branch7x7dbl_3=1x7:{c7} "
        f"branch7x7dbl_4=7x1:{c7} branch7x7dbl_5=1x7:192",
        "pool=avg3 branch_pool=1x1:192",
    ))


def inception_v3_d() -> Mixed:
    """Grid reduction 17 -> 8."""
    return Mixed((
        "branch3x3_1=1x1:192 branch3x3_2=3x3/2V:320",
        "branch7x7x3_1=1x1:192 branch7x7x3_2=1x7:192 branch7x7x3_3=7x1:192 branch7x7x3_4=3x3/2V:192",
        "pool=max3/2V",
    ))


def inception_v3_e() -> Mixed:
    """Figure 7: the 8x8 grid's expanded filter banks (1x3 and 3x1 side by side, concatenated)."""
    return Mixed((
        "branch1x1=1x1:320",
        "branch3x3_1=1x1:384 (branch3x3_2a=1x3:384 | branch3x3_2b=3x1:384)",
        "branch3x3dbl_1=1x1:448 branch3x3dbl_2=3x3:384 (branch3x3dbl_3a=1x3:384 | branch3x3dbl_3b=3x1:384)",
        "pool=avg3 branch_pool=1x1:192",
    ))


INCEPTION_V3 = Arch(
    body=(
        ("Conv2d_1a_3x3", "3x3/2V:32"),
        ("Conv2d_2a_3x3", "3x3V:32"),
        ("Conv2d_2b_3x3", "3x3:64"),
        ("maxpool1", "max3/2V"),
        ("Conv2d_3b_1x1", "1x1:80"),
        ("Conv2d_4a_3x3", "3x3V:192"),
        ("maxpool2", "max3/2V"),
        ("Mixed_5b", inception_v3_a(32)),
        ("Mixed_5c", inception_v3_a(64)),
        ("Mixed_5d", inception_v3_a(64)),
        ("Mixed_6a", inception_v3_b()),
        ("Mixed_6b", inception_v3_c(128)),
        ("Mixed_6c", inception_v3_c(160)),
        ("Mixed_6d", inception_v3_c(160)),
        ("Mixed_6e", inception_v3_c(192)),
        ("AuxLogits", Aux("Mixed_6e", "inception_v3")),
        ("Mixed_7a", inception_v3_d()),
        ("Mixed_7b", inception_v3_e()),
        ("Mixed_7c", inception_v3_e()),
    ),
    block="inception_v3",
    image_size=299,
    head=Head(dropout=0.5),
    init_std=0.1,
    outputs=InceptionOutputs,
    aux_loss_weights=(0.4,),
    transform_input=True,
    source="torchvision.models.inception_v3",
)


# ---- Inception-v4 (2016) -------------------------------------------------------------------------
# Figure 3's stem is three convs and three two-branch modules; timm keeps it all in `features`.

TIMM = Style(avg_count_pad=False)


def reduction_a(k: int, l: int, m: int, n: int) -> Mixed:  # noqa: E741 - the paper's Table 1 letters
    """Figure 7: 35 -> 17 grid reduction, shared by Inception-v4 and Inception-ResNet (Table 1's k, l, m, n)."""
    return Mixed((f"branch0=3x3/2V:{n}", f"branch1=1x1:{k},3x3:{l},3x3/2V:{m}", "branch2=max3/2V"))


def inception_v4_a() -> Mixed:
    """Figure 4: the 35x35 module."""
    return Mixed((
        "branch0=1x1:96",
        "branch1=1x1:64,3x3:96",
        "branch2=1x1:64,3x3:96,3x3:96",
        "branch3=avg3,1x1:96",
    ))


def inception_v4_b() -> Mixed:
    """Figure 5: the 17x17 module, 7x7s factorized."""
    return Mixed((
        "branch0=1x1:384",
        "branch1=1x1:192,1x7:224,7x1:256",
        "branch2=1x1:192,7x1:192,1x7:224,7x1:224,1x7:256",
        "branch3=avg3,1x1:128",
    ))


def inception_v4_reduction_b() -> Mixed:
    """Figure 8: 17 -> 8 grid reduction."""
    return Mixed((
        "branch0=1x1:192,3x3/2V:192",
        "branch1=1x1:256,1x7:256,7x1:320,3x3/2V:320",
        "branch2=max3/2V",
    ))


def inception_v4_c() -> Mixed:
    """Figure 6: the 8x8 module with expanded filter banks."""
    return Mixed((
        "branch0=1x1:256",
        "branch1_0=1x1:384 (branch1_1a=1x3:256 | branch1_1b=3x1:256)",
        "branch2_0=1x1:384 branch2_1=3x1:448 branch2_2=1x3:512 (branch2_3a=1x3:256 | branch2_3b=3x1:256)",
        "branch3=avg3,1x1:256",
    ))


INCEPTION_V4 = Arch(
    body=(
        ("features", (
            "3x3/2V:32",
            "3x3V:32",
            "3x3:64",
            Mixed(("maxpool=max3/2V", "conv=3x3/2V:96")),
            Mixed(("branch0=1x1:64,3x3V:96", "branch1=1x1:64,1x7:64,7x1:64,3x3V:96")),
            Mixed(("conv=3x3/2V:192", "maxpool=max3/2V")),
            *(inception_v4_a() for _ in range(4)),
            reduction_a(192, 224, 256, 384),
            *(inception_v4_b() for _ in range(7)),
            inception_v4_reduction_b(),
            *(inception_v4_c() for _ in range(3)),
        )),
    ),
    block="inception_v4",
    image_size=299,
    head=Head(pool="global_pool", drop="head_drop", fc="last_linear"),
    style=TIMM,
    source="timm inception_v4",
)


# ---- Inception-ResNet-v2 (2016) ------------------------------------------------------------------

def inception_resnet_v2_5b(c1: int = 96, c5: tuple = (48, 64), c3: tuple = (64, 96, 96), pool_proj: int = 64) -> Mixed:
    """The TensorFlow model's Mixed_5b, which ends its stem (the paper's Figure 3 ends differently)."""
    return Mixed((
        f"branch0=1x1:{c1}",
        "branch1=1x1:{},5x5:{}".format(*c5),
        "branch2=1x1:{},3x3:{},3x3:{}".format(*c3),
        f"branch3=avg3,1x1:{pool_proj}",
    ))


def block35(c1: int = 32, c3: tuple = (32, 32), c3dbl: tuple = (32, 48, 64), scale: float = 0.17) -> Mixed:
    """Figure 16: Inception-ResNet-A on the 35x35 grid."""
    return Mixed((
        f"branch0=1x1:{c1}",
        "branch1=1x1:{},3x3:{}".format(*c3),
        "branch2=1x1:{},3x3:{},3x3:{}".format(*c3dbl),
    ), residual_scale=scale)


def block17(c1: int = 192, c7: tuple = (128, 160, 192), scale: float = 0.1) -> Mixed:
    """Figure 17: Inception-ResNet-B on the 17x17 grid."""
    return Mixed((f"branch0=1x1:{c1}", "branch1=1x1:{},1x7:{},7x1:{}".format(*c7)), residual_scale=scale)


def block8(c1: int = 192, c3: tuple = (192, 224, 256), scale: float = 0.2, relu: bool = True) -> Mixed:
    """Figure 19: Inception-ResNet-C on the 8x8 grid."""
    return Mixed((f"branch0=1x1:{c1}", "branch1=1x1:{},1x3:{},3x1:{}".format(*c3)), residual_scale=scale,
                 relu=relu)


def inception_resnet_reduction_b(c3: tuple = (256, 384), c3b: tuple = (256, 288),
                                 c3dbl: tuple = (256, 288, 320)) -> Mixed:
    """Figure 18: 17 -> 8 grid reduction of Inception-ResNet-v2 (TensorFlow's Mixed_7a)."""
    return Mixed((
        "branch0=1x1:{},3x3/2V:{}".format(*c3),
        "branch1=1x1:{},3x3/2V:{}".format(*c3b),
        "branch2=1x1:{},3x3:{},3x3/2V:{}".format(*c3dbl),
        "branch3=max3/2V",
    ))


INCEPTION_RESNET_V2 = Arch(
    body=(
        ("conv2d_1a", "3x3/2V:32"),
        ("conv2d_2a", "3x3V:32"),
        ("conv2d_2b", "3x3:64"),
        ("maxpool_3a", "max3/2V"),
        ("conv2d_3b", "1x1:80"),
        ("conv2d_4a", "3x3V:192"),
        ("maxpool_5a", "max3/2V"),
        ("mixed_5b", inception_resnet_v2_5b()),
        # Section 3.3 scales residuals by 0.1 to 0.3 before the add; the TensorFlow release that timm
        # ported uses 0.17, 0.1 and 0.2.
        ("repeat", (block35(),) * 10),
        ("mixed_6a", reduction_a(256, 256, 384, 384)),
        ("repeat_1", (block17(),) * 20),
        ("mixed_7a", inception_resnet_reduction_b()),
        ("repeat_2", (block8(),) * 9),
        ("block8", block8(scale=1.0, relu=False)),
        ("conv2d_7b", "1x1:1536"),
    ),
    block="inception_resnet_v2",
    image_size=299,
    head=Head(pool="global_pool", drop=None, fc="classif"),
    style=TIMM,
    source="timm inception_resnet_v2",
)


# ---- Small members for 32 px inputs ----------------------------------------------------------------

# GoogLeNet's nine modules at a quarter of their widths, behind a 3x3 stem that keeps the 32x32
# grid (as the CIFAR ResNets' stem does, paper section 4.2; GoogLeNet's conv3 has 192 = 4 x 48).
INCEPTION_SMALL = Arch(
    body=(("conv1", "3x3:48"), *googlenet_stages(divisor=4)),
    block="inception_v1",
    image_size=32,
    head=Head(drop=None),
    style=Style(ceil_mode=True),
    num_classes=10,
    source="reslab: GoogLeNet at 1/4 width for 32 px",
)


def inception_resnet_small_body(shortcuts: bool = True) -> tuple:
    """Inception-ResNet-v2's blocks at a quarter of their inner widths and shallow (3, 3 and 3 blocks
    where it has 10, 20 and 10), on a 3x3 stem that keeps the 32x32 grid.

    `shortcuts=False` is the same net without its residual adds, to isolate what the shortcut does
    (the paper compares Inception-ResNet with Inception-v4, section 5, which differ in more than
    that). Each block keeps its branches and its 1x1 conv back to the block's input width (the
    second argument of `block` below), so widths, depth and MACs are the same; the 1x1 conv becomes
    conv-BN-ReLU, like every other conv of a non-residual inception net, and nothing is added.
    """

    def block(module: Mixed, width: int):
        return module if shortcuts else (Mixed(module.branches), f"1x1:{width}")

    return (
        ("stem", "3x3:64"),
        ("blocks_a", (block(block35(8, (8, 8), (8, 12, 16)), 64),) * 3),
        ("reduction_a", reduction_a(48, 48, 64, 64)),
        ("blocks_b", (block(block17(48, (32, 40, 48)), 192),) * 3),
        ("reduction_b", inception_resnet_reduction_b((48, 64), (48, 56), (48, 56, 64))),
        ("blocks_c", (block(block8(48, (48, 56, 64)), 376),) * 2),
        ("block_last", block(block8(48, (48, 56, 64), scale=1.0, relu=False), 376)),
        ("conv_head", "1x1:384"),
    )


INCEPTION_RESNET_SMALL = Arch(
    body=inception_resnet_small_body(),
    block="inception_resnet_v2",
    image_size=32,
    head=Head(drop=None),
    style=TIMM,
    num_classes=10,
    source="reslab: Inception-ResNet-v2 blocks, narrow and shallow, for 32 px",
)

INCEPTION_RESNET_SMALL_PLAIN = Arch(
    body=inception_resnet_small_body(shortcuts=False),
    block="inception_resnet_v2_plain",
    image_size=32,
    head=Head(drop=None),
    style=TIMM,
    num_classes=10,
    source="reslab: inception_resnet_small without its residual adds",
)

ARCHS = {
    "googlenet": GOOGLENET,
    "inception_v3": INCEPTION_V3,
    "inception_v4": INCEPTION_V4,
    "inception_resnet_v2": INCEPTION_RESNET_V2,
    "inception_small": INCEPTION_SMALL,
    "inception_resnet_small": INCEPTION_RESNET_SMALL,
    "inception_resnet_small_plain": INCEPTION_RESNET_SMALL_PLAIN,
}


# ---- The builder ---------------------------------------------------------------------------------

# torchvision's transform_input: its GoogLeNet and Inception-v3 weights (ported from TensorFlow)
# expect pixels scaled to [-1, 1]; this maps an ImageNet-normalized input, (p - mean) / std, there:
# p = x * std + mean, then (p - 0.5) / 0.5. Per channel: (std, mean).
_TRANSFORM_INPUT = ((0.229, 0.485), (0.224, 0.456), (0.225, 0.406))


def transform_input(x: torch.Tensor) -> torch.Tensor:
    """torchvision's transform_input (above); a function, so a headless backbone runs it too."""
    channels = [x[:, i : i + 1] * (std / 0.5) + (mean - 0.5) / 0.5 for i, (std, mean) in enumerate(_TRANSFORM_INPUT)]
    return torch.cat(channels, 1)


def _build(item: Item, in_channels: int, style: Style) -> tuple[nn.Module, int]:
    if isinstance(item, str):
        return make_layer(item, in_channels, style)
    if isinstance(item, Mixed):
        module = InceptionModule(item, in_channels, style)
        return module, module.out_channels
    modules = []
    for sub in item:
        module, in_channels = _build(sub, in_channels, style)
        modules.append(module)
    return nn.Sequential(*modules), in_channels


class InceptionNet(nn.Module):
    """Body lines -> global average pool -> dropout -> linear, with optional auxiliary heads.

    In training mode with `aux_logits=True`, `forward` returns `arch.outputs` (logits first, then
    the auxiliary logits, as torchvision does); otherwise the logits. `aux_loss_weights` lines up
    with the auxiliary logits. `num_classes=0` drops the classifier and returns pooled features.
    """

    def __init__(self, arch: Arch, *, num_classes: int = 1000, in_channels: int = 3, aux_logits: bool = False,
                 transform_input: bool = False, zero_init_residual: bool = False):
        super().__init__()
        self.arch = arch
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.aux_loss_weights = arch.aux_loss_weights if aux_logits else ()
        self.body_names: list[str] = []
        self.taps: dict[str, list[str]] = {}  # body line -> the auxiliary heads fed by its output
        channels, widths = in_channels, {}
        for name, item in arch.body:
            if isinstance(item, Aux):
                if aux_logits:
                    self.add_module(name, AUX_HEADS[item.head](widths[item.tap], num_classes, arch.style))
                    self.taps.setdefault(item.tap, []).append(name)
                continue
            module, channels = _build(item, channels, arch.style)
            self.add_module(name, module)
            self.body_names.append(name)
            widths[name] = channels
        self.num_features = channels
        self.num_classes = num_classes
        self.feature_layer = arch.feature_layer
        self.classifier_name = arch.head.fc
        self.add_module(arch.head.pool, nn.AdaptiveAvgPool2d(1))
        if arch.head.drop is not None:
            self.add_module(arch.head.drop, nn.Dropout(arch.head.dropout))
        self.add_module(arch.head.fc, self._new_classifier(num_classes))
        self._init_weights(zero_init_residual)

    def _new_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and self.arch.init_std is not None:
                # torchvision's initialization of its Inception nets: a normal truncated at +-2.
                std = getattr(m, "init_std", self.arch.init_std)
                nn.init.trunc_normal_(m.weight, mean=0.0, std=std, a=-2, b=2)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each Inception-ResNet block starts as the identity (its input is a ReLU output, so the
            # ReLU after the add passes it unchanged), as zero_init_residual does for the ResNets.
            for m in self.modules():
                if isinstance(m, InceptionModule) and m.residual:
                    m.zero_init_last()

    def _body(self, x: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.transform_input:
            x = transform_input(x)
        aux = []
        for name in self.body_names:
            x = getattr(self, name)(x)
            if with_aux:
                aux += [getattr(self, head)(x) for head in self.taps.get(name, ())]
        return x, aux

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's feature map (N, num_features, H', W'), before pooling."""
        return self._body(x, with_aux=False)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(getattr(self, self.arch.head.pool)(x), 1)
        if self.arch.head.drop is not None:
            x = getattr(self, self.arch.head.drop)(x)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor):
        # Python-level branching on the mode only, never on data: the eval graph traces and exports.
        if self.training and self.aux_logits:
            features, aux = self._body(x, with_aux=True)
            return self.arch.outputs(self.forward_head(features), *aux)
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialized head with `num_classes` outputs (0: no head).

        The auxiliary heads' last layers are replaced too, so that their logits match.
        """
        if num_classes == 0 and self.aux_logits:
            raise ReslabError("reset_classifier(0): the auxiliary classifiers need classes; build the model "
                              "with aux_logits=False to use it as a feature extractor")
        self.num_classes = num_classes
        device = next(self.parameters()).device
        setattr(self, self.classifier_name, self._new_classifier(num_classes).to(device))
        for heads in self.taps.values():
            for head in heads:
                getattr(self, head).reset_classifier(num_classes)
