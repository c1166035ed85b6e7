"""Inference: a trained model as a function from images to class probabilities, on the fastest path.

`Predictor` is what `reslab predict`, `evaluate`, `explain` and `serve` call. It owns the
preprocessing stored in the checkpoint, so an image of any size or mode is treated as in training.

The forward pass runs on a *backend*:

- `torch`: BatchNorm folded into the convolutions (`fold_batchnorm`), channels_last where it pays,
  bf16 where the hardware multiplies it natively, optionally `torch.compile`d.
- `onnxruntime` / `openvino`: the same BN-folded fp32 graph exported (reslab.export), cached per
  checkpoint under ~/.cache/reslab/export. Both are optional extras.

`backend="auto"` takes the first installed backend of a preference order decided from the
measurements in benchmarks/RESULTS.md (Speed): on a CPU without native bf16, ONNX Runtime, then
OpenVINO, then torch (on the idle 2-core AVX2 machine, ResNet-50 fp32: ONNX Runtime 19.8 img/s at
batch 32 and 60.6 ms at batch 1, OpenVINO 15.5 img/s and 65.0 ms, BN-folded torch 11.3 img/s and
110 ms); on a CPU with AMX/AVX512-BF16, OpenVINO first (it runs bf16 there: about 190 img/s for
ResNet-50 per issue 7's measurement on such a machine); on a GPU torch.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from reslab.checkpoint import CheckpointMeta, load_model
from reslab.errors import ReslabError
from reslab.hardware import bf16_is_fast, resolve_precision

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
# Fastest first, on a CPU (benchmarks/RESULTS.md, Speed).
CPU_PREFERENCE = ("onnxruntime", "openvino", "torch")
CPU_BF16_PREFERENCE = ("openvino", "onnxruntime", "torch")
# The Python packages each optional backend needs.
_REQUIRES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("openvino",)}
_EXTRA = {"onnxruntime": "onnx", "openvino": "openvino"}


def normalizer(mean: Sequence[float], std: Sequence[float], channels: int):
    """uint8 [0, 255] batch -> float (x/255 - mean)/std, exactly as the training loader does it."""
    from reslab.data.loader import normalization

    scale, shift = normalization(mean, std, channels)

    def normalize(images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(shift.to(images.device), images.float(), scale.to(images.device))

    return normalize


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every BatchNorm that directly follows a convolution folded
    into that convolution's weight and bias, the BatchNorm replaced by `nn.Identity`.

    At inference BN is a fixed per-channel affine map (Ioffe & Szegedy 2015, section 3.1), so
    conv -> BN is one conv with w' = w * gamma / sigma and b' = beta + (b - mu) * gamma / sigma:
    a third of a ResNet's layers and a full read and write of each activation disappear. Which
    conv feeds which BN is read from a torch.fx trace, so pre-activation blocks (BN before the
    conv) keep the BNs that cannot be folded; a conv whose output is also used elsewhere is left
    alone. The module tree and its methods (forward_features, ...) stay as they were.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # a foreign model fx cannot trace: still correct, just not folded
        warnings.warn(f"fold_batchnorm: could not trace {type(model).__name__} ({err}); BatchNorm left unfolded",
                      stacklevel=2)
        return model
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or calls[node.target] != 1:
            continue
        source = node.args[0]
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        conv = modules.get(source.target)
        if not isinstance(conv, nn.Conv2d) or calls[source.target] != 1:
            continue
        _set_submodule(model, source.target, fuse_conv_bn_eval(conv, bn))
        _set_submodule(model, node.target, nn.Identity())
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def installed_backends() -> list[str]:
    """The backends this environment can run: torch always, the others where their extra is installed."""
    return ["torch"] + [b for b, mods in _REQUIRES.items() if all(importlib.util.find_spec(m) for m in mods)]


def resolve_backend(backend: str, device: str | torch.device = "cpu") -> str:
    """A concrete backend: `auto` takes the fastest installed one for this device."""
    if backend not in BACKENDS:
        raise ReslabError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = torch.device(device)
    installed = installed_backends()
    if backend == "auto":
        if device.type != "cpu":
            return "torch"
        preference = CPU_BF16_PREFERENCE if bf16_is_fast(device) else CPU_PREFERENCE
        return next(b for b in preference if b in installed)
    if backend not in installed:
        raise ReslabError(f"backend {backend!r} is not installed; `pip install reslab[{_EXTRA[backend]}]` "
                          "or use --backend torch")
    if backend != "torch" and device.type != "cpu":
        raise ReslabError(f"backend {backend!r} runs on the CPU only, got device {str(device)!r}; use --backend torch")
    return backend


def default_channels_last(model_name: str, precision: str, device: torch.device) -> bool:
    """channels_last where it measured faster: GPUs, bf16, and the wide ImageNet-family nets.

    On the 2-core AVX2 CPU fp32 ResNet-50 ran 1.4x faster channels_last, while the narrow CIFAR
    ResNet-20 ran 1.4x slower (benchmarks/RESULTS.md, Speed), so the family decides.
    """
    if device.type == "cuda" or precision == "bf16":
        return True
    from reslab.models import get_model_spec

    try:
        return get_model_spec(model_name).family == "imagenet"
    except ReslabError:
        return False


class TorchRunner:
    """The eager or compiled PyTorch forward pass of the BN-folded model."""

    def __init__(self, model: nn.Module, *, device: torch.device, precision: str, channels_last: bool,
                 compile: bool = False):
        self.device, self.precision, self.channels_last = device, precision, channels_last
        folded = fold_batchnorm(model).to(device)
        for p in folded.parameters():
            p.requires_grad_(False)
        if precision == "bf16":
            # bf16 weights once, rather than autocast re-casting every weight on every call.
            folded = folded.to(torch.bfloat16)
        if channels_last:
            folded = folded.to(memory_format=torch.channels_last)
        self.module = folded
        self.forward = torch.compile(folded, dynamic=False) if compile else folded

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = x.to(self.device, torch.bfloat16 if self.precision == "bf16" else torch.float32)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.forward(x).float()


class OnnxRuntimeRunner:
    """An ONNX Runtime CPU session on an exported graph (fp32 only: ORT has no bf16 CPU kernels)."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})
        return torch.from_numpy(logits)


class OpenVinoRunner:
    """An OpenVINO CPU compiled model; bf16 by INFERENCE_PRECISION_HINT (honoured only where the CPU
    has native bf16: on AVX2 OpenVINO reports and runs f32 whatever the hint)."""

    def __init__(self, path: str | os.PathLike, *, precision: str = "fp32", threads: int | None = None,
                 hint: str = "LATENCY"):
        import openvino as ov

        config = {
            "PERFORMANCE_HINT": hint,
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        }
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()  # one infer request: serve's threads take turns

    @property
    def inference_precision(self) -> str:
        value = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: "f32", "bf16"
        return value.to_string() if hasattr(value, "to_string") else str(value)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().float().cpu().contiguous().numpy()
        with self.lock:
            result = self.request.infer({0: array})
            return torch.from_numpy(result[self.compiled.output(0)].copy())


def make_runner(backend: str, *, model: nn.Module | None, meta: CheckpointMeta, device: torch.device,
                precision: str, channels_last: bool | None, compile: bool, exported: Callable[[str], Path]):
    """The forward pass for a concrete backend; `exported(fmt)` gives an exported file on demand."""
    if backend == "torch":
        if channels_last is None:
            channels_last = default_channels_last(meta.model, precision, device)
        return TorchRunner(model, device=device, precision=precision, channels_last=channels_last, compile=compile)
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(exported("onnx"))
    return OpenVinoRunner(exported("openvino"), precision=precision)


class Predictor:
    """Class probabilities for images, from a run directory, a reslab weights file, or an exported
    `.onnx` / OpenVINO `.xml` file made by `reslab export`.

    backend: "auto" (fastest installed), "torch", "onnxruntime", "openvino".
    precision: "auto" (bf16 only where the hardware has it natively), "fp32", "bf16".
    `model` is always the plain eager PyTorch model (None for an exported file) so Grad-CAM can
    take its gradients; the fast path is a separate BN-folded copy or exported graph.
    """

    def __init__(self, source: str | os.PathLike, *, device: str = "cpu", backend: str = "auto",
                 precision: str = "auto", compile: bool = False, channels_last: bool | None = None):
        path = Path(source)
        self.source = path
        if path.suffix.lower() in (".onnx", ".xml") and path.is_file():
            from reslab.export import read_exported_meta

            model, meta = None, read_exported_meta(path)
            if backend == "auto":
                backend = "openvino" if path.suffix.lower() == ".xml" or "onnxruntime" not in installed_backends() \
                    else "onnxruntime"
            if backend == "onnxruntime" and path.suffix.lower() == ".xml":
                raise ReslabError(f"{path} is an OpenVINO model; use --backend openvino (or the .onnx export)")
        else:
            model, meta = load_model(source, device=device)
        self._setup(model, meta, device, backend, precision, compile, channels_last)

    @classmethod
    def from_model(cls, model: nn.Module, meta: CheckpointMeta, device: str = "cpu", *, backend: str = "torch",
                   precision: str = "fp32", compile: bool = False, channels_last: bool | None = None) -> Predictor:
        self = cls.__new__(cls)
        self.source = None
        self._setup(model.to(device).eval(), meta, device, backend, precision, compile, channels_last)
        return self

    def _setup(self, model, meta, device, backend, precision, compile, channels_last) -> None:
        self.model, self.meta, self.device = model, meta, torch.device(device)
        pre = meta.preprocessing
        self.preprocessing, self.classes = pre, meta.classes
        self.normalize = normalizer(pre.get("mean", (0.0,)), pre.get("std", (1.0,)), pre.get("in_channels", 3))
        self.backend = resolve_backend(backend, self.device)
        self.precision = resolve_precision(precision, self.device)
        if self.precision == "bf16" and not bf16_is_fast(self.device):
            warnings.warn(f"bf16 on {self.device} without native bf16 arithmetic runs several times slower than "
                          "fp32 (precision 'auto' avoids it)", stacklevel=3)
        if self.backend == "onnxruntime" and self.precision == "bf16":
            raise ReslabError("onnxruntime runs fp32 only on the CPU; use --precision fp32, or --backend torch or "
                              "openvino for bf16")
        if self.backend == "torch" and model is None:
            raise ReslabError(f"the torch backend needs a reslab checkpoint, not the exported file {self.source}; "
                              "use --backend onnxruntime or openvino")
        self._options = {"channels_last": channels_last, "compile": compile}
        self._exports: dict[str, Path] = {}
        self._runner = None
        self._lock = threading.Lock()

    @property
    def runner(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The backend's forward pass (normalized float batch -> logits), built on first use so that
        a Predictor used only for its eager `model` (Grad-CAM) never exports anything."""
        with self._lock:
            if self._runner is None:
                self._runner = make_runner(self.backend, model=self.model, meta=self.meta, device=self.device,
                                           precision=self.precision, exported=self._exported, **self._options)
            return self._runner

    def _exported(self, fmt: str) -> Path:
        """This model as an ONNX or OpenVINO file: the given one, a cached export, or a fresh one."""
        from reslab import export

        if self.model is None:  # built from an exported file
            if fmt == "openvino" or self.source.suffix.lower() == ".onnx":
                return self.source
            raise ReslabError(f"{self.source} is an OpenVINO model; it cannot run on {fmt}")
        if fmt not in self._exports:
            self._exports[fmt] = export.cached_export(self.model, self.meta, fmt, source=self.source)
        return self._exports[fmt]

    def load_images(self, images) -> torch.Tensor:
        """Paths or PIL images -> one uint8 batch, preprocessed as in training."""
        from reslab.data import preprocess_image

        return torch.stack([preprocess_image(img, **self.preprocessing) for img in images])

    def logits(self, batch: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 N x C x H x W batch -> float32 logits N x num_classes (on the CPU for exported backends)."""
        out = []
        for start in range(0, len(batch), batch_size):
            with torch.inference_mode():
                x = self.normalize(batch[start : start + batch_size].to(self.device))
            out.append(self.runner(x))
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(batch), dim=1)

    def predict(self, images, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k (class name, probability) for each image (paths or PIL images)."""
        probs = self.probabilities(self.load_images(images))
        k = min(top_k, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        return [
            [(self.classes[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
            for row_p, row_i in zip(values, indices)
        ]
