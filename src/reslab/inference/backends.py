"""Where a forward pass runs: the installed backends, the choice among them, and one runner each.

- `torch`: BatchNorm folded into the convolutions (reslab.inference.fold), channels_last where it
  pays, bf16 where the hardware multiplies it natively, optionally `torch.compile`d.
- `onnxruntime` / `openvino`: the same BN-folded fp32 graph exported by reslab.inference.export, or
  its int8 form (reslab.inference.quantize). Both are optional extras. OpenVINO compiles with
  settings by batch size (`openvino_settings`: LATENCY for one image, THROUGHPUT streams for a batch).

A runner is a callable from a normalized float batch to float32 logits. The preference orders and
the channels_last defaults are decided from the measurements in benchmarks/RESULTS.md (Speed).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.hardware import bf16_is_fast
from reslab.inference.fold import fold_batchnorm

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
# What the inference commands accept; training's list (reslab.hardware.PRECISIONS) has no int8.
INFERENCE_PRECISIONS = ("fp32", "bf16", "auto", "int8")
# Fastest first on a CPU without native bf16, and on one with AMX/AVX512-BF16, where OpenVINO runs
# bf16 (benchmarks/RESULTS.md, Speed); on a GPU only torch runs.
CPU_PREFERENCE = ("onnxruntime", "openvino", "torch")
CPU_BF16_PREFERENCE = ("openvino", "onnxruntime", "torch")
# int8 graphs run on the exported runtimes only (torch's CPU int8 path is another graph format); OpenVINO
# ran the same QDQ graph faster than ONNX Runtime (benchmarks/RESULTS.md, int8).
INT8_PREFERENCE = ("openvino", "onnxruntime")
# The Python packages each optional backend needs, and the extra that installs them.
_REQUIRES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("openvino",)}
_EXTRA = {"onnxruntime": "onnx", "openvino": "openvino"}


def installed_backends() -> list[str]:
    """The backends this environment can run: torch always, the others where their extra is installed."""
    return ["torch"] + [b for b, mods in _REQUIRES.items() if all(importlib.util.find_spec(m) for m in mods)]


def resolve_backend(backend: str, device: str | torch.device = "cpu", precision: str = "auto") -> str:
    """A concrete backend for `device` (one already checked): `auto` takes the fastest installed one there
    (for int8: the fastest exported runtime)."""
    if backend not in BACKENDS:
        raise ReslabError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    on_cpu = str(device).partition(":")[0] == "cpu"
    installed = installed_backends()
    if precision == "int8":
        if not on_cpu:
            raise ReslabError(f"int8 runs on the CPU (ONNX Runtime, OpenVINO), got device {str(device)!r}; "
                              "use --device cpu, or --precision bf16 on a GPU")
        if backend == "torch":
            raise ReslabError("int8 runs on onnxruntime or openvino, not torch; use --backend auto")
        if backend == "auto":
            runnable = [b for b in INT8_PREFERENCE if b in installed]
            if not runnable:
                raise ReslabError("int8 needs ONNX Runtime or OpenVINO: `pip install reslab[onnx]`")
            return runnable[0]
    if backend == "auto":
        if not on_cpu:
            return "torch"
        preference = CPU_BF16_PREFERENCE if bf16_is_fast("cpu") else CPU_PREFERENCE
        return next(b for b in preference if b in installed)
    if backend not in installed:
        raise ReslabError(f"backend {backend!r} is not installed; `pip install reslab[{_EXTRA[backend]}]` "
                          "or use --backend torch")
    if backend != "torch" and not on_cpu:
        raise ReslabError(f"backend {backend!r} runs on the CPU only, got device {str(device)!r}; use --backend torch")
    return backend


def normalizer(mean: Sequence[float], std: Sequence[float], channels: int):
    """uint8 [0, 255] batch -> float (x/255 - mean)/std, exactly as the training loader does it."""
    from reslab.data.loader import normalization

    scale, shift = normalization(mean, std, channels)

    def normalize(images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(shift.to(images.device), images.float(), scale.to(images.device))

    return normalize


def default_channels_last(model_name: str, precision: str, device: torch.device) -> bool:
    """channels_last where it measured faster: GPUs, bf16, and the wide ImageNet-family nets.

    On the 2-core AVX2 CPU fp32 channels_last sped ResNet-50 up and slowed the narrow CIFAR
    ResNet-20 down (benchmarks/RESULTS.md, Speed: notes), so the net's size decides: the nets made for
    ImageNet-sized inputs (ResNets and Inception nets alike) take it, the 32 px ones do not.
    """
    if device.type == "cuda" or precision == "bf16":
        return True
    from reslab.models import get_model_spec

    try:
        return get_model_spec(model_name).image_size >= 128
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
    """An ONNX Runtime CPU session on an exported graph: fp32, or int8 QDQ (ORT has no bf16 CPU kernels)."""

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


def openvino_settings(batch_size: int, threads: int) -> dict[str, str | int]:
    """OpenVINO's CPU performance settings for calls on `batch_size` images with `threads` threads.

    Chosen by measurement (benchmarks/RESULTS.md, "OpenVINO: reslab against a plain compile"): one
    image runs fastest on one request with every thread (LATENCY); a batch runs fastest cut across
    the THROUGHPUT hint's streams, one infer request per stream, all in flight at once
    (OpenVinoRunner does the cutting: one synchronous call on a THROUGHPUT compile runs on a single
    stream and leaves the other streams' cores idle). At most one stream per image, so that a batch
    of 2 on 16 cores does not get 4 streams of which 2 idle.
    """
    if batch_size == 1:
        return {"PERFORMANCE_HINT": "LATENCY"}
    return {"PERFORMANCE_HINT": "THROUGHPUT", "PERFORMANCE_HINT_NUM_REQUESTS": min(batch_size, threads)}


def compiled_precision(compiled) -> str:
    """The precision an OpenVINO compiled model runs in ("f32", "bf16"), as it reports it."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type, or a string in older releases
    return value.to_string() if hasattr(value, "to_string") else str(value)


class OpenVinoRunner:
    """An OpenVINO CPU model, compiled on first use for each batch size's settings (`openvino_settings`;
    `hint` forces one PERFORMANCE_HINT for every batch size instead); a batch is split across the
    compiled model's optimal number of infer requests, run together.

    bf16 by INFERENCE_PRECISION_HINT (honoured only where the CPU has native bf16: on AVX2 OpenVINO
    reports and runs f32 whatever the hint). An int8 graph runs its quantized layers in int8 whatever
    the hint; the rest stays f32.
    """

    def __init__(self, path: str | os.PathLike, *, precision: str = "fp32", threads: int | None = None,
                 hint: str | None = None):
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(str(path))
        self.threads = threads or torch.get_num_threads()
        self.precision_hint = "bf16" if precision == "bf16" else "f32"
        self.hint = hint
        # Compiled models by their settings, which depend on the batch size only through the hint and
        # the request count: at most `threads` + 1 compilations (a tenth of a second each for ResNet-50).
        self._compiled: dict[tuple, tuple] = {}
        self.lock = threading.Lock()  # the infer requests are shared: callers on several threads take turns

    def settings(self, batch_size: int) -> dict[str, str | int]:
        """The configuration a call on `batch_size` images compiles with."""
        chosen = openvino_settings(batch_size, self.threads) if self.hint is None else {"PERFORMANCE_HINT": self.hint}
        return {**chosen, "INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": self.precision_hint}

    def compiled(self, batch_size: int):
        """The compiled model and its infer requests for calls on `batch_size` images."""
        config = self.settings(batch_size)
        key = tuple(sorted(config.items()))
        if key not in self._compiled:
            compiled = self.core.compile_model(self.model, "CPU", config)
            requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            self._compiled[key] = compiled, [compiled.create_infer_request() for _ in range(max(1, requests))]
        return self._compiled[key]

    @property
    def inference_precision(self) -> str:
        compiled, _ = next(iter(self._compiled.values())) if self._compiled else self.compiled(1)
        return compiled_precision(compiled)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().float().cpu().contiguous().numpy()
        with self.lock:
            compiled, requests = self.compiled(len(array))
            if len(requests) == 1 or len(array) == 1:
                result = requests[0].infer({0: array})
                return torch.from_numpy(result[compiled.output(0)].copy())
            parts = torch.linspace(0, len(array), min(len(requests), len(array)) + 1).round().long().tolist()
            running = list(zip(requests, parts[:-1], parts[1:]))
            for request, start, end in running:
                request.start_async({0: array[start:end]})
            for request, _, _ in running:
                request.wait()
            return torch.cat([torch.from_numpy(request.get_output_tensor(0).data.copy()) for request, _, _ in running])


def make_runner(backend: str, *, model: nn.Module | None, model_name: str, device: torch.device, precision: str,
                channels_last: bool | None, compile: bool, exported: Callable[[str], Path]):
    """The forward pass for a concrete backend; `exported(fmt)` gives an exported file on demand: "onnx",
    "openvino", or "int8" (the statically quantized ONNX graph, which both runtimes read)."""
    if backend == "torch":
        if channels_last is None:
            channels_last = default_channels_last(model_name, precision, device)
        return TorchRunner(model, device=device, precision=precision, channels_last=channels_last, compile=compile)
    if precision == "int8":
        path = exported("int8")
        return OnnxRuntimeRunner(path) if backend == "onnxruntime" else OpenVinoRunner(path, precision="fp32")
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(exported("onnx"))
    return OpenVinoRunner(exported("openvino"), precision=precision)
