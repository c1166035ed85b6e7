"""Keras applications ResNet50/101/152 weights (.h5, .weights.h5, .keras) as a reslab state dict.

Read with h5py alone: no Keras import, nothing executed. Keras's ResNet is the original paper's
"v1": the downsampling stride sits in the first 1x1 of a bottleneck (our `stride_in_1x1=True`),
its convolutions carry biases, and its BatchNorm epsilon is 1.001e-5. Both differences are folded
exactly into our bias-free convolutions and eps=1e-5 BatchNorm:

    BN(conv(x) + b) with (mean, var, eps_k)  ==  BN(conv(x)) with (mean - b, var + eps_k - eps_t, eps_t)

Three file layouts are understood:
- legacy HDF5 (Keras 2 downloads such as resnet50_weights_tf_dim_ordering_tf_kernels.h5, and
  Keras 3 `model.save("x.h5")`): groups named after the layers (`conv2_block1_1_conv`) holding
  `kernel`/`bias`/`gamma`/... datasets (`kernel:0` in Keras 2);
- Keras 3 `.weights.h5`: layers named by class and creation counter (`conv2d_3/vars/0`) in the
  model's layer order, so the names are recovered from that order;
- Keras 3 `.keras`: a zip archive holding `model.weights.h5`.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from reslab.errors import ReslabError

KERAS_BN_EPS = 1.001e-5  # keras.applications.resnet: BatchNormalization(epsilon=1.001e-5)
TORCH_BN_EPS = 1e-5
SUFFIXES = (".h5", ".hdf5", ".keras")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

# Stage depths of keras.applications ResNet50/101/152 (paper Table 1), keyed by conv count.
DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
_LAYER = re.compile(r"^(conv1_(?:conv|bn)|conv[2-5]_block\d+_[0-3]_(?:conv|bn)|predictions)$")
_BN_VARS = ("gamma", "beta", "moving_mean", "moving_variance")
_CONV_VARS = ("kernel", "bias")


def is_keras_file(path: Path) -> bool:
    if path.suffix.lower() in SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_MAGIC
    except OSError:
        return False


def _open_h5(path: Path):
    try:
        import h5py
    except ImportError:
        raise ReslabError(f"{path} is a Keras weights file; reading it needs h5py: pip install h5py") from None
    try:
        if path.suffix.lower() == ".keras":
            with zipfile.ZipFile(path) as archive:
                return h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
        return h5py.File(path, "r")
    except (OSError, KeyError, zipfile.BadZipFile) as err:
        raise ReslabError(f"{path} is not a readable Keras weights file ({err}); give an .h5, .weights.h5 "
                          "or .keras file written by Keras") from None


def _named_layers(h5, read: bool = True) -> dict[str, dict[str, np.ndarray | None]]:
    """Legacy layout: every dataset under a group named like a Keras ResNet layer (its values only
    when `read`, so the architecture can be told without reading the weights)."""
    layers: dict[str, dict[str, np.ndarray | None]] = {}

    def visit(name, obj):
        if not hasattr(obj, "shape"):
            return
        parts = name.split("/")
        owner = next((p for p in reversed(parts[:-1]) if _LAYER.match(p)), None)
        if owner is not None:
            layers.setdefault(owner, {})[parts[-1].split(":")[0]] = np.asarray(obj) if read else None

    h5.visititems(visit)
    return layers


def _not_a_resnet(path: Path, h5) -> ReslabError:
    """The error for an HDF5 file without a Keras ResNet50/101/152 in it, saying what it holds."""
    names: list[str] = []
    h5.visit(names.append)
    top = list(h5.keys())
    if any("_preact_" in name for name in names):
        what = "it looks like a Keras ResNetV2 (pre-activation), whose layers reslab does not convert"
    elif top:
        what = f"it holds {', '.join(top[:4])}{', ...' if len(top) > 4 else ''}"
    else:
        what = "it is empty"
    return ReslabError(
        f"{path} is not the weights of a Keras applications ResNet50, ResNet101 or ResNet152 ({what}); give "
        "such a file with --model resnet50/101/152, or a torch or safetensors checkpoint of the model"
    )


def _keras_layer_order(depths: tuple[int, ...]) -> tuple[list[str], list[str]]:
    """Conv and BN layer names in the order Keras's functional graph lists them.

    In a block with a projection shortcut Keras orders 1_conv, 1_bn, 2_conv, 2_bn, 0_conv, 3_conv,
    0_bn, 3_bn (its topological sort), so per class the order is 1, 2, 0, 3.
    """
    convs, bns = ["conv1_conv"], ["conv1_bn"]
    for stage, depth in enumerate(depths, start=2):
        for block in range(1, depth + 1):
            order = (1, 2, 0, 3) if block == 1 else (1, 2, 3)
            convs += [f"conv{stage}_block{block}_{i}_conv" for i in order]
            bns += [f"conv{stage}_block{block}_{i}_bn" for i in order]
    return convs, bns


def _counter_layers(h5, path: Path, read: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Keras 3 `.weights.h5`: `layers/conv2d_<k>/vars/<i>`, named back through the layer order."""

    def find(group):
        if "layers" in group and "conv2d" in group["layers"]:
            return group["layers"]
        for key in getattr(group, "keys", lambda: [])():
            child = group[key]
            if hasattr(child, "keys") and (found := find(child)) is not None:
                return found
        return None

    group = find(h5)
    if group is None:
        return {}

    def numbered(prefix: str) -> list[str]:
        names = [k for k in group if k == prefix or re.fullmatch(rf"{prefix}_\d+", k)]
        return sorted(names, key=lambda k: int(k.rsplit("_", 1)[1]) if k != prefix else 0)

    conv_groups, bn_groups = numbered("conv2d"), numbered("batch_normalization")
    arch = next((n for n, d in DEPTHS.items() if 1 + 3 * sum(d) + len(d) == len(conv_groups)), None)
    if arch is None or len(bn_groups) != len(conv_groups):
        raise ReslabError(f"{path}: {len(conv_groups)} convolutions and {len(bn_groups)} BatchNorms do not make "
                          "a Keras applications ResNet50, ResNet101 or ResNet152")
    conv_names, bn_names = _keras_layer_order(DEPTHS[arch])
    if not read:
        return {name: {} for name in conv_names + bn_names}
    layers = {}
    for names, groups, var_names in ((conv_names, conv_groups, _CONV_VARS), (bn_names, bn_groups, _BN_VARS)):
        for name, key in zip(names, groups):
            vars_ = group[key]["vars"]
            layers[name] = {v: np.asarray(vars_[str(i)]) for i, v in enumerate(var_names) if str(i) in vars_}
    if "dense" in group:
        vars_ = group["dense"]["vars"]
        layers["predictions"] = {v: np.asarray(vars_[str(i)]) for i, v in enumerate(_CONV_VARS) if str(i) in vars_}
    return layers


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _convert(layers: dict[str, dict[str, np.ndarray]], path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}

    def target(keras_name: str) -> str:
        if keras_name.startswith("conv1_"):
            return "conv1" if keras_name.endswith("conv") else "bn1"
        m = re.match(r"conv(\d)_block(\d+)_(\d)_(conv|bn)", keras_name)
        stage, block, index, kind = int(m.group(1)) - 1, int(m.group(2)) - 1, int(m.group(3)), m.group(4)
        prefix = f"layer{stage}.{block}"
        if index == 0:
            return f"{prefix}.downsample.{0 if kind == 'conv' else 1}"
        return f"{prefix}.{kind}{index}"

    for name, vars_ in layers.items():
        if not name.endswith("_conv"):
            continue
        bn_name = name[: -len("conv")] + "bn"
        if bn_name not in layers or "kernel" not in vars_:
            raise ReslabError(f"{path}: Keras layer {name} has no kernel or no {bn_name} after it; "
                              "not a Keras applications ResNet")
        bn = layers[bn_name]
        # HWIO -> OIHW.
        state[f"{target(name)}.weight"] = _t(vars_["kernel"].transpose(3, 2, 0, 1))
        bias = vars_.get("bias", np.zeros(vars_["kernel"].shape[-1]))
        dest = target(bn_name)
        mean = bn["moving_mean"].astype(np.float64) - bias.astype(np.float64)
        var = bn["moving_variance"].astype(np.float64) + (KERAS_BN_EPS - TORCH_BN_EPS)
        state[f"{dest}.weight"] = _t(bn.get("gamma", np.ones_like(mean)))
        state[f"{dest}.bias"] = _t(bn.get("beta", np.zeros_like(mean)))
        state[f"{dest}.running_mean"] = _t(mean)
        state[f"{dest}.running_var"] = _t(var)
        state[f"{dest}.num_batches_tracked"] = torch.tensor(0)
    if "predictions" in layers:
        dense = layers["predictions"]
        state["fc.weight"] = _t(dense["kernel"].T)  # Dense kernel is (in, out)
        state["fc.bias"] = _t(dense["bias"])
    return state


def _layers(path: Path, read: bool) -> tuple[dict[str, dict], str]:
    with _open_h5(path) as h5:
        layers = _named_layers(h5, read) or _counter_layers(h5, path, read)
        if "conv1_conv" not in layers:
            raise _not_a_resnet(path, h5)
    depths = tuple(
        len({m.group(1) for n in layers if (m := re.match(rf"conv{s}_block(\d+)_", n))}) for s in range(2, 6)
    )
    arch = next((n for n, d in DEPTHS.items() if d == depths), None)
    if arch is None:
        raise ReslabError(f"{path}: a Keras ResNet with stage depths {depths}, which is none of ResNet50/101/152; "
                          "give the weights of keras.applications.ResNet50, ResNet101 or ResNet152")
    return layers, arch


def architecture(path: Path) -> str:
    """Which of resnet50/101/152 a Keras weights file holds, from its layer names alone (no weights
    are read); a ReslabError naming the file when it holds none of them."""
    return _layers(path, read=False)[1]


def check_architecture(label: str, arch: str, model_name: str) -> None:
    if model_name != arch:
        raise ReslabError(f"{label} holds Keras {arch} weights, but the model is {model_name}; use --model {arch}")


def read_keras(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A state dict for our `resnetXX(stride_in_1x1=True)` and the architecture name it fits."""
    layers, arch = _layers(path, read=True)
    return _convert(layers, path), arch
