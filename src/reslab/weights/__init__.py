"""Pretrained weights by name: `create_model("resnet50.tv2_in1k", pretrained=True)`.

    entry = get_weights("resnet20.akamaster_cifar10")   # URL, hash, accuracy, preprocessing, classes
    model, meta = load_pretrained_model("resnet20.akamaster_cifar10")

Files live in torch.hub's checkpoints folder ($TORCH_HOME/hub/checkpoints), shared with torchvision
and timm (reslab.weights.hub). The entries are in reslab.weights.entries.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from reslab.errors import ReslabError
from reslab.weights import entries as _entries  # noqa: F401  (registers the catalog)
from reslab.weights.catalog import (
    Preprocessing,
    WeightsEntry,
    class_names,
    default_weights,
    find_by_digest,
    find_by_md5,
    get_weights,
    is_weights_name,
    list_weights,
    register_weights,
    unregister_weights,
)
from reslab.weights.hub import checkpoints_dir, fetch
from reslab.weights.source import PretrainedPlan, default_preprocessing, load_source, pretrained_plan, read_class_names

__all__ = [
    "create_model",
    "list_models",
    "Preprocessing",
    "PretrainedPlan",
    "WeightsEntry",
    "checkpoints_dir",
    "class_names",
    "default_preprocessing",
    "default_weights",
    "entry_meta",
    "find_by_digest",
    "find_by_md5",
    "get_weights",
    "is_weights_name",
    "list_weights",
    "load_entry_state",
    "load_pretrained_model",
    "load_source",
    "read_class_names",
    "pretrained_plan",
    "recognise_file",
    "register_weights",
    "unregister_weights",
    "weights_file",
]

# Auxiliary classifiers of GoogLeNet and Inception-v3: in the published files, absent from a model
# built without them (torchvision drops them the same way after loading).
AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


def weights_file(entry: WeightsEntry | str, *, quiet: bool = False) -> Path:
    """The entry's file, checked, downloaded into $TORCH_HOME/hub/checkpoints if it is not there."""
    entry = get_weights(entry) if isinstance(entry, str) else entry
    return fetch(entry.url, entry.local_name, algorithm=entry.hash_algorithm, expected=entry.hash, quiet=quiet)


def recognise_file(path: Path) -> WeightsEntry | None:
    """The catalog entry a local file is (by its SHA-256, or MD5 for Keras files), whatever its name."""
    from reslab.weights.hub import file_digest

    entry = find_by_digest(file_digest(path, "sha256"))
    if entry is None and path.suffix.lower() in (".h5", ".hdf5", ".keras"):
        entry = find_by_md5(file_digest(path, "md5"))
    return entry


def entry_meta(entry: WeightsEntry):
    """The CheckpointMeta of a catalog entry: model, options, class names and preprocessing."""
    from reslab.checkpoint import CheckpointMeta

    return CheckpointMeta(model=entry.model, model_options=dict(entry.model_options), classes=entry.class_names(),
                          preprocessing=entry.preprocessing.to_dict(), extra={"weights": entry.name})


def load_entry_state(entry: WeightsEntry, path: Path | None = None, *, quiet: bool = False) -> dict:
    """The entry's tensors under reslab's (torchvision's/timm's) names, read without running code."""
    from reslab.transfer import map_keys
    from reslab.transfer.sources import read_source

    path = path or weights_file(entry, quiet=quiet)
    state, _ = map_keys(read_source(str(path), quiet=True).state)
    if entry.bgr_input:  # see catalog.CAFFE_MEAN: the model then reads RGB
        state["conv1.weight"] = state["conv1.weight"].flip(1)
    return state


def load_into(model: nn.Module, state: dict, label: str, model_name: str) -> str:
    """Load `state` into `model` strictly except for the head (a new class count gets a fresh one)
    and the auxiliary heads the model was built without; returns what happened to the head."""
    from reslab.transfer import load_state_checked

    keys = set(model.state_dict())
    state = {k: v for k, v in state.items() if k in keys or not k.startswith(AUX_PREFIXES)}
    return load_state_checked(model, state, label, model_name)[0]


def load_pretrained_model(name: str, *, num_classes: int | None = None, quiet: bool = False, **options):
    """(model, CheckpointMeta) for catalog weights `name`; with another `num_classes`, a fresh head."""
    from reslab.models import create_model

    entry = get_weights(name)
    classes = entry.class_names()
    model = create_model(entry.model, num_classes=len(classes), **{**entry.model_options, **options})
    head = load_into(model, load_entry_state(entry, quiet=quiet), entry.name, entry.model)
    meta = entry_meta(entry)
    meta.model_options.update(options)
    if num_classes is not None and num_classes != len(classes):
        model.reset_classifier(num_classes)
        meta.classes = [str(i) for i in range(num_classes)]
        head = f"replaced ({len(classes)} -> {num_classes} classes)"
    meta.extra["head"] = head
    if num_classes == 0:
        raise ReslabError("num_classes=0 with pretrained weights: use model.forward_features for features")
    return model, meta


def list_models(family: str | None = None, *, pretrained: bool = False) -> list[str]:
    """Registered model names (reslab.models.list_models); with `pretrained=True`, the catalog's
    `MODEL.TAG` weights names instead (timm's convention)."""
    from reslab.models import get_model_spec
    from reslab.models import list_models as architectures

    names = architectures(family)  # checks `family`
    if not pretrained:
        return names
    return [e.name for e in list_weights() if family is None or get_model_spec(e.model).family == family]


def create_model(name: str, pretrained: bool = False, **options) -> nn.Module:
    """reslab.models.create_model, plus the catalog: `create_model("resnet50.tv2_in1k", pretrained=True)`
    (a fresh head when `num_classes` differs from the weights'), `create_model("resnet50", pretrained=True)`
    (its best ImageNet weights), `create_model("resnet50.tv2_in1k")` (the architecture those weights
    need, randomly initialized, as timm does). `features_only=True` (and `out_indices`) makes any of
    them a headless backbone (reslab.models.features), the pretrained weights loaded first."""
    from reslab.models import create_model as build
    from reslab.models.features import FeatureExtractor, pop_feature_options

    if not pretrained and "." not in name:
        return build(name, **options)
    entry = get_weights(name) if "." in name else default_weights(name)
    features_only, out_indices = pop_feature_options(name, options)
    if not pretrained and features_only:
        return build(entry.model, **{**entry.model_options, **options}, features_only=True, out_indices=out_indices)
    if not pretrained:
        return build(entry.model, **{"num_classes": len(entry.class_names()), **entry.model_options, **options})
    num_classes = options.pop("num_classes", None)
    model, _ = load_pretrained_model(entry.name, num_classes=num_classes, **options)
    return FeatureExtractor(model, out_indices, name) if features_only else model
