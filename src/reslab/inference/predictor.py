"""`Predictor`: a trained model as a function from images to class probabilities, on the fastest path.

It is what `reslab predict`, `evaluate`, `explain` and `serve` call. It owns the preprocessing
stored in the checkpoint, so an image of any size or mode is treated as in training, and it is
where a library caller's options (device, backend, precision, top-k) are checked.

`backend="auto"` takes the first installed backend of the preference order in
reslab.inference.backends, decided from the measurements in benchmarks/RESULTS.md (Speed).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from reslab.checkpoint import CheckpointMeta
from reslab.errors import ReslabError
from reslab.hardware import bf16_is_fast, check_device, resolve_precision
from reslab.inference.backends import installed_backends, make_runner, resolve_backend
from reslab.inference.export import cached_export, read_exported_meta
from reslab.weights.source import load_source


def check_top_k(top_k: int) -> int:
    """How many classes to report per image: at least one (fewer classes than that: all of them)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ReslabError(f"top-k must be an integer of at least 1, got {top_k!r}")
    return top_k


def normalizer(mean: Sequence[float], std: Sequence[float], channels: int):
    """uint8 [0, 255] batch -> float (x/255 - mean)/std, exactly as the training loader does it."""
    from reslab.data.loader import normalization

    scale, shift = normalization(mean, std, channels)

    def normalize(images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(shift.to(images.device), images.float(), scale.to(images.device))

    return normalize


class Predictor:
    """Class probabilities for images, from a run directory, a reslab weights file, or an exported
    `.onnx` / OpenVINO `.xml` file made by `reslab export`.

    backend: "auto" (fastest installed), "torch", "onnxruntime", "openvino".
    precision: "auto" (bf16 only where the hardware has it natively), "fp32", "bf16".
    top_k: the classes `predict` and `top` report per image unless a call asks for another number.
    `model` is always the plain eager PyTorch model (None for an exported file) so Grad-CAM can
    take its gradients; the fast path is a separate BN-folded copy or exported graph.
    """

    def __init__(self, source: str | os.PathLike, *, device: str | torch.device = "cpu", backend: str = "auto",
                 precision: str = "auto", top_k: int = 5, compile: bool = False, channels_last: bool | None = None,
                 model: str | None = None, classes=None):
        path = Path(source)
        self.source = path
        device = check_device(device)
        if path.suffix.lower() in (".onnx", ".xml") and path.is_file():
            model, meta = None, read_exported_meta(path)
            if backend == "auto":
                backend = "openvino" if path.suffix.lower() == ".xml" or "onnxruntime" not in installed_backends() \
                    else "onnxruntime"
            if backend == "onnxruntime" and path.suffix.lower() == ".xml":
                raise ReslabError(f"{path} is an OpenVINO model; use --backend openvino (or the .onnx export)")
        else:
            # Any source: a run, a weights file, catalog weights, a foreign checkpoint (see reslab.weights).
            net, meta = load_source(source, model=model, classes=classes, device=device)
            model = net
        self._setup(model, meta, device, backend, precision, top_k, compile, channels_last)

    @classmethod
    def from_model(cls, model: nn.Module, meta: CheckpointMeta, device: str | torch.device = "cpu", *,
                   backend: str = "torch", precision: str = "fp32", top_k: int = 5, compile: bool = False,
                   channels_last: bool | None = None) -> Predictor:
        self = cls.__new__(cls)
        self.source = None
        device = check_device(device)
        self._setup(model.to(device).eval(), meta, device, backend, precision, top_k, compile, channels_last)
        return self

    def _setup(self, model, meta, device, backend, precision, top_k, compile, channels_last) -> None:
        self.model, self.meta, self.device = model, meta, device
        pre = meta.preprocessing
        self.preprocessing, self.classes = pre, meta.classes
        self.normalize = normalizer(pre.get("mean", (0.0,)), pre.get("std", (1.0,)), pre.get("in_channels", 3))
        self.top_k = check_top_k(top_k)
        self.backend = resolve_backend(backend, self.device)
        if self.backend == "onnxruntime" and precision == "auto":
            precision = "fp32"  # ONNX Runtime has no bf16 CPU kernels: only an explicit bf16 is refused below
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
                self._runner = make_runner(self.backend, model=self.model, model_name=self.meta.model,
                                           device=self.device, precision=self.precision, exported=self._exported,
                                           **self._options)
            return self._runner

    def _exported(self, fmt: str) -> Path:
        """This model as an ONNX or OpenVINO file: the given one, a cached export, or a fresh one."""
        if self.model is None:  # built from an exported file
            if fmt == "openvino" or self.source.suffix.lower() == ".onnx":
                return self.source
            raise ReslabError(f"{self.source} is an OpenVINO model; it cannot run on {fmt}")
        if fmt not in self._exports:
            self._exports[fmt] = cached_export(self.model, self.meta, fmt)
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

    def top(self, probabilities: torch.Tensor, top_k: int | None = None) -> list[list[tuple[str, float]]]:
        """The top-k (class name, probability) of each row of an N x num_classes probability batch,
        most probable first; `top_k` None: this Predictor's own."""
        k = self.top_k if top_k is None else check_top_k(top_k)
        values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
        return [
            [(self.classes[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
            for row_p, row_i in zip(values, indices)
        ]

    def predict(self, images, top_k: int | None = None) -> list[list[tuple[str, float]]]:
        """Top-k (class name, probability) for each image (paths or PIL images)."""
        return self.top(self.probabilities(self.load_images(images)), top_k)
