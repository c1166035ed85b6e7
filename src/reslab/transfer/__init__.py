"""Transfer learning: foreign pretrained weights, a new head, frozen early layers.

    options = model_options_for(src)                        # {"stride_in_1x1": True} for Keras files
    model = create_model("resnet50", num_classes=2, **options)
    report = load_pretrained(model, src, model_name="resnet50")   # strict except for the head
    freeze(model, "layer3")                                 # stem..layer3 frozen, BN stats included

Loading goes through one plain mapping step: wrapper prefixes (`module.` from DataParallel/DDP,
`model.` from Lightning, `_orig_mod.` from torch.compile) are stripped and the classifier names of
the common code bases (`linear`, `head`, `head.fc`, `classifier`) become our `fc`. Everything but
the head must then match by name and shape, or the load fails with a table of the mismatches:
a partial load with strict=False that quietly leaves half the net random is the classic way to
get chance accuracy from "pretrained" weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from reslab.checkpoint import unwrap
from reslab.errors import ReslabError
from reslab.transfer import keras
from reslab.transfer.sources import Loaded, is_url, read_source, split_url

__all__ = [
    "FREEZE_POINTS",
    "body_parts",
    "Loaded",
    "classifier_name",
    "freeze",
    "load_pretrained",
    "load_state_checked",
    "map_keys",
    "match_state",
    "model_options_for",
    "read_source",
    "unfreeze_step",
]

WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
CLASSIFIER_NAMES = ("head.fc", "linear", "head", "classifier", "fc")
FREEZE_POINTS = ("stem", "layer1", "layer2", "layer3", "layer4", "all-but-head")
_TABLE_ROWS = 10


def map_keys(state: dict[str, torch.Tensor], target_keys: set[str] | None = None) -> tuple[dict, dict]:
    """Strip wrapper prefixes and rename the classifier to `fc`; returns (state, {old: new}).

    A classifier name is only mapped when the target model has no module of that name.
    """
    renamed: dict[str, str] = {}
    state = dict(state)
    for _ in range(len(WRAPPER_PREFIXES) + 1):  # prefixes can stack: module._orig_mod.
        prefix = next((p for p in WRAPPER_PREFIXES if any(k.startswith(p) for k in state)), None)
        if prefix is None or (target_keys and any(k.startswith(prefix) for k in target_keys)):
            break
        new = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
        if len(new) != len(state):
            raise ReslabError(f"stripping the {prefix!r} prefix makes two tensors share a name; the checkpoint "
                              "mixes wrapped and unwrapped weights")
        state = new
        renamed[prefix] = ""
    target_keys = target_keys or set()
    for name in CLASSIFIER_NAMES:
        if name == "fc" or f"{name}.weight" not in state or f"{name}.weight" in target_keys:
            continue
        if "fc.weight" in state:
            break
        for leaf in ("weight", "bias"):
            if f"{name}.{leaf}" in state:
                state[f"fc.{leaf}"] = state.pop(f"{name}.{leaf}")
        renamed[name] = "fc"
        break
    return state, renamed


def _shape(t) -> str:
    return "x".join(map(str, t.shape)) if t is not None and t.dim() else "scalar" if t is not None else "-"


def _mismatch_table(rows: list[tuple[str, str, str, str]]) -> tuple[str, str]:
    counts = {kind: sum(r[0] == kind for r in rows) for kind in ("missing", "unexpected", "shape")}
    width = max(len(r[1]) for r in rows[:_TABLE_ROWS])
    lines = [f"  {'problem':<10}  {'tensor':<{width}}  {'model':>14}  {'checkpoint':>14}"]
    lines += [f"  {k:<10}  {n:<{width}}  {e:>14}  {f:>14}" for k, n, e, f in rows[:_TABLE_ROWS]]
    if len(rows) > _TABLE_ROWS:
        lines.append(f"  ... and {len(rows) - _TABLE_ROWS} more")
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
    return summary, "\n".join(lines)


def classifier_name(model: nn.Module) -> str:
    """The module name of the model's classifier: `fc` for ResNets and torchvision's Inception nets,
    timm's `last_linear` (Inception-v4) or `classif` (Inception-ResNet-v2)."""
    model = unwrap(model)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return next((name for name, m in model.named_modules() if head is not None and m is head), "fc")


def match_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                model_name: str | None = None) -> tuple[dict, str]:
    """The state dict to load strictly, and what happens to the head.

    The classifier is loaded when its shape fits, else left to the model's fresh one; every
    other tensor must match by name and shape (BatchNorm's `num_batches_tracked` counters aside,
    which old checkpoints lack), else a ReslabError shows the mismatches.
    """
    model = unwrap(model)
    head = classifier_name(model) + "."
    expected = model.state_dict()
    body = {k: v for k, v in expected.items() if not k.startswith(head)}
    rows = []
    for key, tensor in body.items():
        if key not in state:
            if not key.endswith("num_batches_tracked"):
                rows.append(("missing", key, _shape(tensor), "-"))
        elif state[key].shape != tensor.shape:
            rows.append(("shape", key, _shape(tensor), _shape(state[key])))
    head_keys = [k for k in state if k.startswith(head)]
    rows += [("unexpected", k, "-", _shape(state[k])) for k in state if k not in body and k not in head_keys]

    src_w = state.get(f"{head}weight")
    head_w = expected.get(f"{head}weight")
    new_classes = getattr(model, "num_classes", head_w.shape[0] if head_w is not None else 0)
    if src_w is not None and src_w.dim() == 2 and src_w.shape[1] != getattr(model, "num_features", src_w.shape[1]):
        rows.append(("shape", f"{head}weight", f"{new_classes}x{model.num_features}", _shape(src_w)))
    if rows:
        summary, table = _mismatch_table(rows)
        raise ReslabError(
            f"{source} does not fit {model_name or type(model).__name__} ({summary}); nothing was loaded. "
            f"Pick the model these weights were trained as (--model) or another checkpoint:\n{table}"
        )
    out = {k: v for k, v in state.items() if k in body}
    for key in body:  # counters absent from old checkpoints keep the model's value
        out.setdefault(key, body[key])
    if src_w is None:
        what = "new (the checkpoint has no classifier)"
    elif new_classes == 0:
        what = f"dropped (checkpoint has {src_w.shape[0]} classes; the model returns pooled features)"
    elif tuple(src_w.shape) == tuple(expected[f"{head}weight"].shape) and f"{head}bias" in state:
        out.update({k: state[k] for k in head_keys})
        what = "loaded"
    else:
        what = f"replaced ({src_w.shape[0]} -> {new_classes} classes)"
    return out, what


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                       model_name: str) -> tuple[str, int]:
    """Load `state` into `model` strictly except for the head (see match_state); returns the head's
    fate and how many tensors were loaded."""
    target = unwrap(model)
    to_load, head = match_state(target, state, source, model_name)
    if head.startswith("replaced"):
        target.reset_classifier(target.num_classes)  # fresh, in case the model's head was touched
    target.load_state_dict(to_load, strict=False)  # strict by construction: match_state checked it
    return head, len(to_load)


def model_options_for(source: str, model_name: str | None = None) -> dict:
    """create_model options that the weights in `source` need, known before the model is built.

    Keras's ResNets put the stride in the first 1x1 of a bottleneck (the paper's v1), so a model
    for them needs stride_in_1x1=True; a reslab checkpoint brings its own model options.
    Looks only at the name or, for local files, the file (never downloads). A local Keras file is
    refused here, naming it, when it holds no Keras ResNet50/101/152 or (given `model_name`)
    another one than the model: before the option would reach a model that has no such stride.
    """
    if is_url(source):
        url, _ = split_url(source)
        return {"stride_in_1x1": True} if Path(url).suffix.lower() in keras.SUFFIXES else {}
    path = Path(source)
    if not path.exists():
        return {}
    if path.is_file() and keras.is_keras_file(path):
        arch = keras.architecture(path)
        if model_name is not None:
            keras.check_architecture(str(path), arch, model_name)
        return {"stride_in_1x1": True}
    if path.is_dir() or path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        from reslab.checkpoint import FORMAT, CheckpointMeta, resolve

        try:
            resolved = resolve(path)
            with safe_open(str(resolved), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") == FORMAT:
                return dict(CheckpointMeta.from_metadata(meta, resolved).model_options)
        except (ReslabError, SafetensorError, OSError, ValueError):
            return {}  # load_pretrained will say what is wrong with it
    return {}


def _stride_in_1x1(model: nn.Module) -> bool | None:
    stage = getattr(model, "layer2", None)
    first = stage[0] if stage is not None and len(stage) else None
    if first is None or not hasattr(first, "conv3"):
        return None
    return first.conv1.stride[0] > 1


def load_pretrained(model: nn.Module, source: str, *, model_name: str, sha256: str | None = None,
                    quiet: bool = False) -> dict:
    """Load weights from `source` into `model` in place, strictly except for the head.

    When the class count differs, the model keeps a freshly initialized classifier and the report
    says so. Returns a JSON-able report for the run's config.json.
    """
    loaded = read_source(str(source), sha256=sha256, quiet=quiet)
    target = unwrap(model)
    label = loaded.url or str(loaded.path)
    if loaded.kind == "keras":
        keras.check_architecture(label, loaded.info["architecture"], model_name)
        if _stride_in_1x1(target) is False:
            raise ReslabError(f"{label} holds Keras weights, which put the stride in the first 1x1 conv of a "
                              f"bottleneck; create the model with create_model({model_name!r}, stride_in_1x1=True) "
                              "(reslab train does this itself)")
    state, renamed = map_keys(loaded.state, set(target.state_dict()))
    head, loaded_count = load_state_checked(target, state, label, model_name)
    report = {
        "source": str(source),
        "kind": "url" if loaded.url else loaded.kind,
        "path": str(loaded.path),
        "sha256": loaded.sha256,
        "renamed": renamed,
        "head": head,
        "tensors": loaded_count,
    }
    if loaded.url:
        report["format"] = loaded.kind
    report.update(loaded.info)
    if not quiet:
        msg = f"pretrained: {loaded_count} tensors from {label} ({report['kind']}); head {head}"
        if renamed:
            msg += "; renamed " + ", ".join(f"{old!r} -> {new!r}" for old, new in renamed.items())
        print(msg)
    return report


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d of a frozen part of the net: stays in eval mode whatever `model.train()` says.

    Frozen BN must normalize with its pretrained running statistics and never update them; a
    BN in train mode would both use batch statistics and move its running averages even though
    its affine parameters get no gradient. The state dict is that of nn.BatchNorm2d.
    """

    def train(self, mode: bool = True):
        return super().train(False)


def body_parts(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The body in order, as (name, modules): stem, each stage, then what follows the last stage
    (named all-but-head). A net without stages (the Inception nets) is one part: all but the head."""
    if not hasattr(model, "stage_names"):
        head = model.get_classifier()
        return [("all-but-head", [m for m in model.children() if m is not head])]
    stem_names = getattr(model, "stem_names", ("conv1", "bn1"))  # myrtle_resnet9's stem is its `prep`
    stem = [m for m in (getattr(model, name, None) for name in stem_names) if m is not None]
    parts = [("stem", stem)]
    parts += [(name, [getattr(model, name)]) for name in model.stage_names]
    final = [model.bn_final] if hasattr(model, "bn_final") else []
    parts.append(("all-but-head", final))
    return parts


def _set_frozen(module: nn.Module, frozen: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(not frozen)
    for m in module.modules():
        if frozen and type(m) is nn.BatchNorm2d:
            m.__class__ = FrozenBatchNorm2d
            m.eval()
        elif not frozen and type(m) is FrozenBatchNorm2d:
            m.__class__ = nn.BatchNorm2d
            m.train(module.training)


def freeze(model: nn.Module, until: str) -> dict:
    """Freeze the stem and every stage up to and including `until` (`none` unfreezes all).

    `until`: stem, layer1..layer4 (layer3 is the last CIFAR stage), or all-but-head. Frozen
    parameters get requires_grad=False and their BatchNorm layers stay in eval mode across later
    model.train() calls, so their running statistics do not move.
    """
    target = unwrap(model)
    parts = body_parts(target)
    names = [n for n, _ in parts]
    if until != "none" and until not in names:
        raise ReslabError(f"--freeze {until!r}: this model's parts are {', '.join(names)} (or none)")
    upto = -1 if until == "none" else names.index(until)
    for i, (_, modules) in enumerate(parts):
        for m in modules:
            _set_frozen(m, i <= upto)
    _set_frozen(target.get_classifier(), False)
    params = list(target.parameters())
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    return {"until": until, "frozen_params": frozen, "trainable_params": sum(p.numel() for p in params) - frozen}


def unfreeze_step(model: nn.Module, until: str) -> str:
    """Gradual unfreezing (Howard and Ruder, 2018): the freeze point one part earlier than `until`.

    all-but-head -> last stage -> ... -> layer1 -> stem -> none. Apply it with `freeze(model, ...)`.
    """
    names = [n for n, _ in body_parts(unwrap(model))]
    if until == "none":
        return "none"
    i = names.index(until)
    if until == "all-but-head" and not body_parts(unwrap(model))[-1][1]:
        i -= 1  # nothing between the last stage and the head: skip straight past the last stage
    return names[i - 1] if i > 0 else "none"
