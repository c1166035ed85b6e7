"""The model registry: every variant is a line of data, built by its family's one builder.

ResNets (`ModelSpec`: block, stage depths, widths) are built by `ResNet`; the Inception family
(`InceptionSpec`: an `inception.Arch`) by `InceptionNet`; Page's fast-training ResNet-9 (`MyrtleSpec`:
widths and which stages are residual) by `myrtle.MyrtleResNet9`. `create_model(name, **options)` and
`list_models()` are the public doors. Options are checked here, at the door, with the received
value echoed in the error (as Keras applications do); an option of another family is refused
with the reason.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

from reslab.errors import ReslabError
from reslab.models.blocks import BLOCKS
from reslab.models.features import FeatureExtractor, pop_feature_options
from reslab.models.inception import ARCHS, Arch, InceptionNet
from reslab.models.myrtle import MyrtleResNet9
from reslab.models.resnet import FAMILY_STEMS, SHORTCUTS, STEMS, ResNet

IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)


@dataclass(frozen=True)
class ModelSpec:
    """One registered architecture: enough data to build it and to describe it."""

    name: str
    family: str  # "imagenet" (paper section 4.1 / torchvision) or "cifar" (section 4.2)
    block: str  # a key of blocks.BLOCKS
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    groups: int = 1
    width_per_group: int = 64
    shortcut: str = "B"
    source: str = ""

    @property
    def image_size(self) -> int:
        return 224 if self.family == "imagenet" else 32

    @property
    def num_classes(self) -> int:
        """The default: ImageNet's 1000 classes, or CIFAR-10's 10."""
        return 1000 if self.family == "imagenet" else 10

    @property
    def residual(self) -> bool:
        return BLOCKS[self.block].residual

    @property
    def depth(self) -> int:
        layers_per_block = 3 if BLOCKS[self.block].expansion == 4 else 2
        return layers_per_block * sum(self.depths) + 2


@dataclass(frozen=True)
class InceptionSpec:
    """One registered Inception-family net: its `Arch` (the lines of data) and what describes it."""

    name: str
    arch: Arch
    family: str = "inception"

    @property
    def block(self) -> str:
        return self.arch.block

    @property
    def image_size(self) -> int:
        return self.arch.image_size

    @property
    def num_classes(self) -> int:
        return self.arch.num_classes

    @property
    def residual(self) -> bool:
        return self.arch.residual

    @property
    def depth(self) -> int:
        return self.arch.depth

    @property
    def source(self) -> str:
        return self.arch.source


@dataclass(frozen=True)
class MyrtleSpec:
    """A net of Page's fast-training family (reslab.models.myrtle): the prep layer's and each stage's
    width, which stages carry a residual branch, and the scale of the logits."""

    name: str
    widths: tuple[int, ...]
    residual_stages: tuple[bool, ...]
    head_scale: float
    source: str
    family: str = "cifar"  # a 32 px CIFAR-10 net
    block: str = "myrtle"
    image_size: int = 32
    num_classes: int = 10
    residual: bool = True

    @property
    def depth(self) -> int:
        # Weight layers: the prep conv, a conv per stage, two per residual branch, the linear.
        return 1 + len(self.residual_stages) + 2 * sum(self.residual_stages) + 1


Spec = ModelSpec | InceptionSpec | MyrtleSpec
_REGISTRY: dict[str, Spec] = {}


def register(spec: Spec) -> Spec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    if isinstance(spec, ModelSpec) and spec.block not in BLOCKS:
        raise ValueError(f"unknown block {spec.block!r} for {spec.name!r}")
    _REGISTRY[spec.name] = spec
    return spec


# ImageNet family: paper Table 1; ResNeXt (Xie et al., 2017) and Wide ResNet (Zagoruyko and
# Komodakis, 2016) are the same builder with grouped or wider 3x3 convolutions.
_IMAGENET = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": ("bottleneck", (3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3), 1, 128),
    "plain18": ("plain", (2, 2, 2, 2), 1, 64),
    "plain34": ("plain", (3, 4, 6, 3), 1, 64),
    "preact_resnet18": ("preact_basic", (2, 2, 2, 2), 1, 64),
    "preact_resnet34": ("preact_basic", (3, 4, 6, 3), 1, 64),
    "preact_resnet50": ("preact_bottleneck", (3, 4, 6, 3), 1, 64),
    "preact_resnet101": ("preact_bottleneck", (3, 4, 23, 3), 1, 64),
    "preact_resnet152": ("preact_bottleneck", (3, 8, 36, 3), 1, 64),
}
for _name, (_block, _depths, _groups, _wpg) in _IMAGENET.items():
    register(ModelSpec(_name, "imagenet", _block, _depths, IMAGENET_WIDTHS, _groups, _wpg, "B"))

# CIFAR family (section 4.2): 6n+2 layers, three stages of n blocks; option A shortcuts.
for _n in (3, 5, 7, 9, 18, 200):
    register(ModelSpec(f"resnet{6 * _n + 2}", "cifar", "basic", (_n,) * 3, CIFAR_WIDTHS, shortcut="A"))
for _n in (3, 5, 7, 9, 18):
    register(ModelSpec(f"plain{6 * _n + 2}", "cifar", "plain", (_n,) * 3, CIFAR_WIDTHS, shortcut="A"))
# "Identity Mappings" (He et al., 2016): pre-activation basic nets, and bottleneck nets of 9n+2
# layers whose authors used projection shortcuts where the shape changes.
for _n in (3, 9, 18):
    register(ModelSpec(f"preact_resnet{6 * _n + 2}", "cifar", "preact_basic", (_n,) * 3, CIFAR_WIDTHS,
                       shortcut="A"))
for _n in (18, 111):
    register(ModelSpec(f"preact_resnet{9 * _n + 2}", "cifar", "preact_bottleneck", (_n,) * 3,
                       CIFAR_WIDTHS, shortcut="B"))

# The DAWNBench CIFAR-10 net of the fast-training literature: 94 % in 24 epochs (reslab.models.myrtle).
register(MyrtleSpec("myrtle_resnet9", (64, 128, 256, 512), (True, False, True), 0.125,
                    'David C. Page, "How to Train Your ResNet" (Myrtle.ai, 2018); github.com/davidcpage/cifar10-fast'))

# The same net at a quarter of its width (16 to 128 channels, 1/16 of the arithmetic): reslab's choice
# for CIFAR-sized colour images under --budget on a CPU, where the full net trains an epoch of 45k
# images in about 14 minutes (from its step time) and this one in 53-108 s (whole epochs of the budget
# runs; benchmarks/RESULTS.md, "CIFAR-10 in 30 minutes: the net").
register(MyrtleSpec("myrtle_resnet9_quarter", (16, 32, 64, 128), (True, False, True), 0.125,
                    "myrtle_resnet9 at a quarter of its width (reslab; measured in benchmarks/RESULTS.md)"))

# Inception family: GoogLeNet and Inception-v3 as torchvision builds them, Inception-v4 and
# Inception-ResNet-v2 as timm does, and two small members for 32 px inputs (see inception.py).
for _name, _arch in ARCHS.items():
    register(InceptionSpec(_name, _arch))

# Any other 6n+2 depth by name: resnet14, plain8, preact_resnet38 ... (the experiments use them).
_CIFAR_NAME = re.compile(r"^(resnet|plain|preact_resnet)(\d+)$")


def _cifar_spec_for(name: str) -> ModelSpec | None:
    m = _CIFAR_NAME.match(name)
    if not m:
        return None
    kind, depth = m.group(1), int(m.group(2))
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ReslabError(
            f"model {name!r}: depth {depth} is not 6n+2 with n >= 1; CIFAR nets have 3 stages of n "
            f"blocks of 2 layers plus the first conv and the fc (e.g. {kind}20, {kind}56)"
        )
    block = {"resnet": "basic", "plain": "plain", "preact_resnet": "preact_basic"}[kind]
    return ModelSpec(name, "cifar", block, ((depth - 2) // 6,) * 3, CIFAR_WIDTHS, shortcut="A")


FAMILIES = ("imagenet", "cifar", "inception")


def list_models(family: str | None = None) -> list[str]:
    """Registered model names, optionally of one family ("imagenet", "cifar" or "inception").
    (`reslab.list_models(pretrained=True)` lists the weights catalog: reslab.weights.)"""
    if family is not None and family not in FAMILIES:
        raise ReslabError(f"unknown model family {family!r}: choose one of {', '.join(FAMILIES)}")
    return [n for n, s in _REGISTRY.items() if family is None or s.family == family]


def get_model_spec(name: str) -> Spec:
    if not isinstance(name, str):
        raise ReslabError(f"model name must be a string, got {name!r}")
    spec = _REGISTRY.get(name) or _cifar_spec_for(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run `reslab models` for the list"
        raise ReslabError(f"unknown model {name!r}: {hint}")
    return spec


OPTIONS = ("num_classes", "in_channels", "zero_init_residual", "shortcut", "stride_in_1x1", "stem", "aux_logits",
           "transform_input")


def create_model(name: str, **options) -> nn.Module:
    """Build a registered model (randomly initialized; `reslab.create_model("resnet50.tv2_in1k",
    pretrained=True)` adds the weights catalog: reslab.weights, a layer above this one).

    Options on every model: `num_classes` (default 1000 for ImageNet-sized nets, 10 for the 32 px
    ones; 0 returns pooled features), `in_channels` (3; 1 for grayscale), `zero_init_residual`
    (False; each residual block starts as the identity). ResNets: `shortcut` ("A", "B" or "C"),
    `stride_in_1x1` (ImageNet bottleneck nets: the original paper's and Keras's placement of the
    downsampling stride; torchvision's "v1.5" placement by default), `stem` ("imagenet": 7x7/2 conv
    and max pool, the ImageNet nets' default; "cifar": one 3x3/1 conv, the CIFAR nets' default;
    "deep": three 3x3 convs and the max pool, as timm's resnet*d). GoogLeNet and Inception-v3:
    `aux_logits` (False; the auxiliary classifiers, trained but unused at inference) and
    `transform_input` (False; torchvision's re-scaling of ImageNet-normalized input for their
    ported weights). `features_only=True` (with `out_indices`, default every level) returns the
    headless backbone whose forward gives a list of feature maps, described by its `feature_info`
    (reslab.models.features).
    """
    spec = get_model_spec(name)
    features_only, out_indices = pop_feature_options(name, options)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ReslabError(f"create_model({name!r}): unknown option(s) {', '.join(unknown)}; "
                          f"valid options: {', '.join(OPTIONS)}, features_only, out_indices")
    num_classes = options.pop("num_classes", spec.num_classes)
    in_channels = options.pop("in_channels", 3)
    for key, value, low in (("num_classes", num_classes, 0), ("in_channels", in_channels, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ReslabError(f"create_model({name!r}): {key} must be an integer >= {low}, got {value!r}")
    build = {InceptionSpec: _build_inception, MyrtleSpec: _build_myrtle}.get(type(spec), _build_resnet)
    model = build(spec, num_classes=num_classes, in_channels=in_channels, **options)
    return FeatureExtractor(model, out_indices, name) if features_only else model


def _build_resnet(spec: ModelSpec, *, num_classes: int, in_channels: int, shortcut=None, stride_in_1x1=False,
                  stem=None, zero_init_residual=False, aux_logits=False, transform_input=False) -> ResNet:
    name = spec.name
    if aux_logits:
        raise ReslabError(f"create_model({name!r}): aux_logits adds the auxiliary classifiers of GoogLeNet and "
                          "Inception-v3; a ResNet has none")
    if transform_input:
        raise ReslabError(f"create_model({name!r}): transform_input re-scales the input for torchvision's GoogLeNet "
                          "and Inception-v3 weights; a ResNet takes ImageNet-normalized input as it is")
    if shortcut is None:
        shortcut = spec.shortcut
    elif not spec.residual:
        raise ReslabError(f"create_model({name!r}): a plain net has no shortcuts, so shortcut={shortcut!r} "
                          "cannot apply; use the resnet of the same depth")
    if shortcut not in SHORTCUTS:
        raise ReslabError(f"create_model({name!r}): shortcut must be 'A', 'B' or 'C' (paper section 3.3), "
                          f"got {shortcut!r}")
    if stride_in_1x1 and spec.family != "imagenet":
        raise ReslabError(f"create_model({name!r}): stride_in_1x1 places the stride of ImageNet bottleneck "
                          "blocks; CIFAR nets downsample in their first 3x3 conv as the paper does")
    if stem is None:
        stem = FAMILY_STEMS[spec.family]
    elif stem not in STEMS:
        raise ReslabError(f"create_model({name!r}): stem must be one of {', '.join(map(repr, STEMS))}, got {stem!r}")
    elif spec.family == "cifar" and stem != "cifar":
        raise ReslabError(f"create_model({name!r}): a CIFAR net's first stage takes the {spec.widths[0]} channels "
                          f"of its own 3x3 stem at full resolution; stem={stem!r} belongs to the ImageNet nets "
                          "(e.g. resnet18)")
    return ResNet(
        BLOCKS[spec.block],
        list(spec.depths),
        list(spec.widths),
        stem=stem,
        num_classes=num_classes,
        in_channels=in_channels,
        groups=spec.groups,
        width_per_group=spec.width_per_group,
        shortcut=shortcut,
        stride_in_1x1=bool(stride_in_1x1),
        zero_init_residual=bool(zero_init_residual),
    )


def _build_inception(spec: InceptionSpec, *, num_classes: int, in_channels: int, aux_logits=False,
                     transform_input=False, zero_init_residual=False, shortcut=None,
                     stride_in_1x1=False, stem=None) -> InceptionNet:
    name, arch = spec.name, spec.arch
    if stem is not None:
        raise ReslabError(f"create_model({name!r}): stem picks a ResNet's stem; {name}'s stem is part of its "
                          f"architecture ({arch.source}), so stem={stem!r} cannot apply")
    if shortcut is not None:
        kind = "adds each block's branches to an identity shortcut" if arch.residual else "has no shortcuts"
        raise ReslabError(f"create_model({name!r}): shortcut picks a ResNet's shortcut option (paper section "
                          f"3.3); {name} {kind}, so shortcut={shortcut!r} cannot apply")
    if stride_in_1x1:
        raise ReslabError(f"create_model({name!r}): stride_in_1x1 places the stride of ResNet bottleneck blocks; "
                          f"{name} has none")
    with_aux = [n for n, s in _REGISTRY.items() if isinstance(s, InceptionSpec) and s.arch.has_aux]
    if aux_logits and not arch.has_aux:
        raise ReslabError(f"create_model({name!r}): {name} has no auxiliary classifiers; "
                          f"aux_logits applies to {' and '.join(with_aux)}")
    if aux_logits and num_classes == 0:
        raise ReslabError(f"create_model({name!r}): aux_logits=True needs classes for the auxiliary "
                          "classifiers; num_classes=0 (features only) cannot have them")
    if transform_input and not arch.transform_input:
        raise ReslabError(f"create_model({name!r}): transform_input belongs to torchvision's googlenet and "
                          f"inception_v3 (their ported weights expect it); {arch.source} has no such option")
    if transform_input and in_channels != 3:
        raise ReslabError(f"create_model({name!r}): transform_input re-scales the three RGB channels, "
                          f"so it needs in_channels=3, got {in_channels!r}")
    if zero_init_residual and not arch.residual:
        raise ReslabError(f"create_model({name!r}): {name} has no residual branches to start at zero; "
                          "zero_init_residual applies to the Inception-ResNet nets")
    return InceptionNet(arch, num_classes=num_classes, in_channels=in_channels, aux_logits=bool(aux_logits),
                        transform_input=bool(transform_input), zero_init_residual=bool(zero_init_residual))


def _build_myrtle(spec: MyrtleSpec, *, num_classes: int, in_channels: int, zero_init_residual=False, shortcut=None,
                  stride_in_1x1=False, stem=None, aux_logits=False, transform_input=False) -> MyrtleResNet9:
    name = spec.name
    refused = {"shortcut": (shortcut is not None, "its residual branches add to the identity, there is no "
                                                  "shortcut option (paper section 3.3) to pick"),
               "stride_in_1x1": (stride_in_1x1, "it has no bottleneck blocks; its stages downsample by max pooling"),
               "stem": (stem is not None, "its prep layer (one 3x3 conv-BN-ReLU) is part of the architecture"),
               "aux_logits": (aux_logits, "it has no auxiliary classifiers"),
               "transform_input": (transform_input, "that belongs to torchvision's googlenet and inception_v3")}
    for key, (given, why) in refused.items():
        if given:
            value = {"shortcut": shortcut, "stem": stem}.get(key, True)
            raise ReslabError(f"create_model({name!r}): {key}={value!r} cannot apply to {name}: {why}")
    return MyrtleResNet9(spec.widths, spec.residual_stages, num_classes=num_classes, in_channels=in_channels,
                         head_scale=spec.head_scale, zero_init_residual=bool(zero_init_residual))
