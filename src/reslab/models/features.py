"""Backbone feature maps: `create_model(name, features_only=True, out_indices=(1, 2, 3, 4))`.

What detection and segmentation heads (an FPN, a U-Net decoder) build on: the net's feature maps at
several strides, without its head. The built model is wrapped, never rewritten: `FeatureExtractor`
keeps the modules up to the deepest level asked for under their own names (so a full model's state
dict loads into it with `strict=False`, and its keys are the checkpoint's) and drops the rest, the
pool and classifier included, then runs them in the order the model's own forward does.

Levels ("feature_info"), as timm numbers and names them where timm has the net:

- ImageNet ResNets (ResNeXt, Wide, plain and pre-activation too): 0 the stem at stride 2 (after its
  ReLU, module `relu`; timm calls that module `act1`), 1-4 the stages `layer1`..`layer4` at strides
  4, 8, 16, 32.
- CIFAR nets (paper section 4.2): 0 the stem at stride 1, 1-3 the stages at strides 1, 2, 4.
- Pre-activation nets: a block ends at its add, and the next block's BN-ReLU opens it, so level 0
  is the stem's conv output (module `conv1`) and the inner stages are their adds; the last stage is
  taken after the final BN-ReLU (module `relu_final`), where the head sees it.
- myrtle_resnet9: 0 the prep layer at stride 1, 1-3 the stages (after their residual branch) at
  strides 2, 4, 8.
- Inception-v3, Inception-v4, Inception-ResNet-v2: timm's five levels (strides 2 to 32).
  GoogLeNet (timm has none): the output before each stride-2 max pool (conv1, conv3, inception3b,
  inception4e, inception5b). The 32 px members: the stem and the outputs before each reduction
  (strides 1, 1, 2, 4). Nets with unpadded ("V") layers lose a few pixels per layer, so their maps
  are a little smaller than input / reduction; `reduction` is the stride.

`out_indices` defaults to every level.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.models.inception import ARCHS, InceptionNet, transform_input
from reslab.models.inception_blocks import ConvBNReLU, InceptionModule
from reslab.models.myrtle import MyrtleResNet9
from reslab.models.resnet import STEMS, ResNet

# (module, stride) per Inception net. timm's feature_info where timm has the net (inception_v3,
# inception_v4, inception_resnet_v2); otherwise the output before each stride-2 reduction.
INCEPTION_LEVELS: dict[str, tuple[tuple[str, int], ...]] = {
    "googlenet": (("conv1", 2), ("conv3", 4), ("inception3b", 8), ("inception4e", 16), ("inception5b", 32)),
    "inception_v3": (("Conv2d_2b_3x3", 2), ("Conv2d_4a_3x3", 4), ("Mixed_5d", 8), ("Mixed_6e", 16),
                     ("Mixed_7c", 32)),
    "inception_v4": (("features.2", 2), ("features.3", 4), ("features.9", 8), ("features.17", 16),
                     ("features.21", 32)),
    "inception_resnet_v2": (("conv2d_2b", 2), ("conv2d_4a", 4), ("repeat", 8), ("repeat_1", 16),
                            ("conv2d_7b", 32)),
    "inception_small": (("conv1", 1), ("inception3b", 1), ("inception4e", 2), ("inception5b", 4)),
    "inception_resnet_small": (("stem", 1), ("blocks_a", 1), ("blocks_b", 2), ("conv_head", 4)),
    "inception_resnet_small_plain": (("stem", 1), ("blocks_a", 1), ("blocks_b", 2), ("conv_head", 4)),
}


class FeatureInfo:
    """The levels a backbone can return, as timm's FeatureInfo: entries are dicts with `num_chs`,
    `reduction` (the stride against the input) and `module` (the module whose output it is).

    Indexing, `len` and iteration go over every level the net has; `channels()`, `reduction()` and
    `module_name()` give the selected levels (`out_indices`) in the order the model returns them, or
    the levels `idx` names (one index or a list).
    """

    def __init__(self, levels: Sequence[dict], out_indices: Sequence[int]):
        self.info = [dict(level) for level in levels]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (list, tuple)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None):
        indices = self.out_indices if idx is None else idx

        def pick(level: dict) -> dict:
            return dict(level) if keys is None else {k: level[k] for k in keys}

        if isinstance(indices, (list, tuple)):
            return [pick(self.info[i]) for i in indices]
        return pick(self.info[indices])

    def channels(self, idx: int | Sequence[int] | None = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None):
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None):
        return self.get("module", idx)

    def __getitem__(self, idx: int) -> dict:
        return self.info[idx]

    def __len__(self) -> int:
        return len(self.info)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo({self.info}, out_indices={self.out_indices})"


def _width(module: nn.Module) -> int:
    """Output channels of an Inception net's body line: a conv layer, a module, or a chain of them."""
    if isinstance(module, InceptionModule):
        return module.out_channels
    if isinstance(module, ConvBNReLU):
        return module.conv.out_channels
    if isinstance(module, nn.Sequential):
        return _width(module[-1])
    raise TypeError(f"no channel count for {type(module).__name__}")


def _resnet_plan(model: ResNet) -> tuple[list[str], list[dict]]:
    """(forward order of the top-level modules, levels) of a ResNet, read off the built model."""
    stem = STEMS[model.stem_type] if isinstance(model.stem_type, str) else model.stem_type
    has_pool = model.maxpool is not None
    order = ["conv1"] + ([] if model.preact else ["bn1", "relu"]) + (["maxpool"] if has_pool else [])
    order += model.stage_names + (["bn_final", "relu_final"] if model.preact else [])
    # A block's input width is its first conv's, so stage i's output is stage i+1's input.
    widths = [stage[0].conv1.in_channels for stage in model.stages] + [model.num_features]
    levels = [{"num_chs": widths[0], "reduction": stem.stride, "module": "conv1" if model.preact else "relu"}]
    reduction = stem.stride * (2 if has_pool else 1)
    for i, name in enumerate(model.stage_names):
        reduction *= 1 if i == 0 else 2  # resnet.make_stage: stride 1 in the first stage, 2 after
        last = i == len(model.stage_names) - 1
        levels.append({"num_chs": widths[i + 1], "reduction": reduction,
                       "module": "relu_final" if last and model.preact else name})
    return order, levels


def _inception_plan(model: InceptionNet) -> tuple[list[str], list[dict]]:
    name = next(n for n, arch in ARCHS.items() if arch is model.arch)
    levels = [{"num_chs": _width(model.get_submodule(module)), "reduction": reduction, "module": module}
              for module, reduction in INCEPTION_LEVELS[name]]
    return list(model.body_names), levels


def _myrtle_plan(model: MyrtleResNet9) -> tuple[list[str], list[dict]]:
    """The prep layer, then each stage; every stage ends in a 2x2 max pool."""
    levels = [{"num_chs": model.prep.conv.out_channels, "reduction": 1, "module": "prep"}]
    levels += [{"num_chs": stage.conv.out_channels, "reduction": 2 ** (i + 1), "module": name}
               for i, (name, stage) in enumerate(zip(model.stage_names, model.stages))]
    return ["prep", *model.stage_names], levels


def feature_levels(model: nn.Module) -> list[dict]:
    """Every level `model` offers to `features_only`, as `FeatureInfo` entries."""
    return _plan(model)[1]


def _plan(model: nn.Module) -> tuple[list[str], list[dict]]:
    if isinstance(model, ResNet):
        return _resnet_plan(model)
    if isinstance(model, InceptionNet):
        return _inception_plan(model)
    if isinstance(model, MyrtleResNet9):
        return _myrtle_plan(model)
    raise TypeError(f"features_only: no feature levels for {type(model).__name__}")


def check_out_indices(name: str, out_indices, count: int) -> tuple[int, ...]:
    """`out_indices` as a tuple of level numbers, or every level when None; a ReslabError otherwise."""
    valid = f"{name} has levels {', '.join(map(str, range(count)))}"
    if out_indices is None:
        return tuple(range(count))
    if not isinstance(out_indices, (list, tuple)):
        raise ReslabError(f"create_model({name!r}): out_indices must be a list or tuple of levels, "
                          f"got {out_indices!r} (e.g. out_indices=({count - 1},)); {valid}")
    bad = [i for i in out_indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count]
    if bad or not out_indices:
        raise ReslabError(f"create_model({name!r}): out_indices {tuple(out_indices)!r} "
                          f"{'has ' + ', '.join(map(repr, bad)) if bad else 'is empty'}; {valid}")
    if len(set(out_indices)) != len(out_indices):
        raise ReslabError(f"create_model({name!r}): out_indices {tuple(out_indices)!r} repeats a level; {valid}")
    return tuple(out_indices)


def pop_feature_options(name: str, options: dict) -> tuple[bool, object]:
    """Take `features_only` and `out_indices` out of create_model's options, refusing what a
    headless model cannot honour (a class count, auxiliary classifiers)."""
    features_only = options.pop("features_only", False)
    out_indices = options.pop("out_indices", None)
    if not isinstance(features_only, bool):
        raise ReslabError(f"create_model({name!r}): features_only must be True or False, got {features_only!r}")
    if out_indices is not None and not features_only:
        raise ReslabError(f"create_model({name!r}): out_indices picks the feature maps of features_only=True; "
                          "pass features_only=True too")
    if features_only:
        for key in ("num_classes", "aux_logits"):
            if options.get(key):
                raise ReslabError(f"create_model({name!r}): features_only=True returns feature maps without a "
                                  f"head, so {key}={options[key]!r} cannot apply; leave it out")
        options.pop("num_classes", None)
        options.pop("aux_logits", None)
    return features_only, out_indices


class FeatureExtractor(nn.Module):
    """A built model's stem and stages up to the deepest level asked for; `forward` returns the maps
    of `out_indices` as a list, in that order. `feature_info` describes them (see `FeatureInfo`)."""

    def __init__(self, model: nn.Module, out_indices: Sequence[int] | None = None, name: str | None = None):
        super().__init__()
        order, levels = _plan(model)
        out_indices = check_out_indices(name or type(model).__name__, out_indices, len(levels))
        self.feature_info = FeatureInfo(levels, out_indices)
        self.transform_input = bool(getattr(model, "transform_input", False))
        wanted = [levels[i]["module"] for i in out_indices]
        # A level inside a top-level nn.Sequential (timm's `features.9`) needs that sequence run
        # child by child; every other top-level module runs whole.
        steps: list[str] = []
        for top in order:
            if any(m.startswith(top + ".") for m in wanted):
                steps += [f"{top}.{child}" for child, _ in model.get_submodule(top).named_children()]
            else:
                steps.append(top)
        self.steps = steps[: max(steps.index(m) for m in wanted) + 1]
        self.returns = {module: position for position, module in enumerate(wanted)}
        for top in dict.fromkeys(step.split(".")[0] for step in self.steps):
            module = model.get_submodule(top)
            children = sum(step.startswith(top + ".") for step in self.steps)
            # A slice of an nn.Sequential keeps its children's names, so the state-dict keys stay.
            self.add_module(top, module[:children] if children else module)
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.transform_input:
            x = transform_input(x)
        out: list[torch.Tensor | None] = [None] * len(self.returns)
        for step in self.steps:
            x = self.get_submodule(step)(x)
            if step in self.returns:
                out[self.returns[step]] = x
        return out
