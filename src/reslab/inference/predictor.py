"""`Predictor`: a trained model as a function from images to class probabilities, on the fastest path.

It is what `reslab predict`, `evaluate`, `explain` and `serve` call. It owns the preprocessing
stored in the checkpoint, so an image of any size or mode is treated as in training, and it is
where a library caller's options (device, backend, precision, top-k) are checked.

`backend="auto"` takes the first installed backend of the preference order in
reslab.inference.backends, decided from the measurements in benchmarks/RESULTS.md (Speed).
`precision="int8"` runs the model statically quantized (reslab.inference.quantize), calibrated on
images of its training data (or `calibration`) and cached beside the run, or an int8 file as exported.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from reslab.checkpoint import CheckpointMeta
from reslab.errors import ReslabError
from reslab.hardware import bf16_is_fast, check_device, resolve_precision
from reslab.inference.backends import (
    INFERENCE_PRECISIONS,
    installed_backends,
    make_runner,
    normalizer,
    resolve_backend,
)
from reslab.inference.export import cached_export, read_exported_meta
from reslab.inference.quantize import (
    DEFAULT_CALIBRATION_IMAGES,
    Int8Settings,
    cached_int8,
    calibration_images,
    check_calibration_images,
    int8_info,
    warn_if_saturating,
)
from reslab.weights.source import load_source

TTA_MODES = ("none", "flip")


def check_tta(tta: str) -> str:
    if tta not in TTA_MODES:
        raise ReslabError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    return tta


def flip_probabilities(forward: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation "flip": the mean of the class probabilities `forward` (logits) gives
    the images and their mirror images (a photo's class does not change left to right)."""
    return flip_average(forward(batch), forward(batch.flip(-1)))


def flip_average(logits: torch.Tensor, mirrored_logits: torch.Tensor) -> torch.Tensor:
    """flip_probabilities from logits already computed on the images and on their mirror images."""
    return (torch.softmax(logits.float(), dim=1) + torch.softmax(mirrored_logits.float(), dim=1)) / 2


def resolve_tta(tta: str | None, meta: CheckpointMeta) -> str:
    """The test-time augmentation to use: the one asked for, else the one the checkpoint's training
    found paying on its validation split (`extra["tta"]`, reslab.train.budget.choose_tta), else none.
    A model trained without mirror images (`extra["flip"]` false: --no-flip, or a policy that does
    not flip) is never flipped by default, whatever else its metadata says: its classes may not
    survive a mirror (digits, text)."""
    if tta is not None:
        return check_tta(tta)
    if meta.extra.get("flip") is False:
        return "none"
    return meta.extra.get("tta") if meta.extra.get("tta") in TTA_MODES else "none"


def check_top_k(top_k: int) -> int:
    """How many classes to report per image: at least one (fewer classes than that: all of them)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ReslabError(f"top-k must be an integer of at least 1, got {top_k!r}")
    return top_k


class Predictor:
    """Class probabilities for images, from a run directory, a reslab weights file, or an exported
    `.onnx` / OpenVINO `.xml` file made by `reslab export`.

    backend: "auto" (fastest installed), "torch", "onnxruntime", "openvino".
    precision: "auto" (bf16 only where the hardware has it natively), "fp32", "bf16", "int8". An int8
      export is int8 whatever "auto" would pick.
    calibration: for int8 from a checkpoint, the data whose training images calibrate it (default: the
      data it was trained on; catalog weights need one), or a uint8 image batch already preprocessed;
      `calibration_images` of them are used (None: DEFAULT_CALIBRATION_IMAGES).
    top_k: the classes `predict` and `top` report per image unless a call asks for another number.
    `model` is always the plain eager PyTorch model (None for an exported file) so Grad-CAM can
    take its gradients; the fast path is a separate BN-folded copy or exported graph.
    """

    def __init__(self, source: str | os.PathLike, *, device: str | torch.device = "cpu", backend: str = "auto",
                 precision: str = "auto", top_k: int = 5, compile: bool = False, channels_last: bool | None = None,
                 model: str | None = None, classes=None, calibration: str | torch.Tensor | None = None,
                 calibration_images: int | None = None, tta: str | None = None):
        path = Path(source)
        self.source = path
        device = check_device(device)
        if path.suffix.lower() in (".onnx", ".xml") and path.is_file():
            model, meta = None, read_exported_meta(path)
            precision = _exported_precision(path, meta, precision)
            if backend == "auto" and precision != "int8":
                backend = "openvino" if path.suffix.lower() == ".xml" or "onnxruntime" not in installed_backends() \
                    else "onnxruntime"
            if backend == "onnxruntime" and path.suffix.lower() == ".xml":
                raise ReslabError(f"{path} is an OpenVINO model; use --backend openvino (or the .onnx export)")
            if backend == "auto" and path.suffix.lower() == ".xml":
                backend = "openvino"
        else:
            # Any source: a run, a weights file, catalog weights, a foreign checkpoint (see reslab.weights).
            net, meta = load_source(source, model=model, classes=classes, device=device)
            model = net
        self._calibration = (calibration, calibration_images)
        self._setup(model, meta, device, backend, precision, top_k, compile, channels_last)
        self.tta = resolve_tta(tta, meta)

    @classmethod
    def from_model(cls, model: nn.Module, meta: CheckpointMeta, device: str | torch.device = "cpu", *,
                   backend: str = "torch", precision: str = "fp32", top_k: int = 5, compile: bool = False,
                   channels_last: bool | None = None, calibration: str | torch.Tensor | None = None,
                   calibration_images: int | None = None, tta: str | None = None) -> Predictor:
        self = cls.__new__(cls)
        self.source = None
        device = check_device(device)
        self._calibration = (calibration, calibration_images)
        self._setup(model.to(device).eval(), meta, device, backend, precision, top_k, compile, channels_last)
        self.tta = resolve_tta(tta, meta)
        return self

    def _setup(self, model, meta, device, backend, precision, top_k, compile, channels_last) -> None:
        self.model, self.meta, self.device = model, meta, device
        pre = meta.preprocessing
        self.preprocessing, self.classes = pre, meta.classes
        self.normalize = normalizer(pre.get("mean", (0.0,)), pre.get("std", (1.0,)), pre.get("in_channels", 3))
        self.top_k = check_top_k(top_k)
        if precision not in INFERENCE_PRECISIONS:
            raise ReslabError(f"precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {precision!r}")
        self.backend = resolve_backend(backend, self.device, precision)
        if self.backend == "onnxruntime" and precision == "auto":
            precision = "fp32"  # ONNX Runtime has no bf16 CPU kernels: only an explicit bf16 is refused below
        self.precision = "int8" if precision == "int8" else resolve_precision(precision, self.device)
        if self.precision == "int8" and model is None:
            warn_if_saturating(meta, self.source)
        calibration, count = self._calibration
        if count is not None:
            check_calibration_images(count)
        if (calibration is not None or count is not None) and (self.precision != "int8" or model is None):
            why = f"{self.source} is quantized already" if model is None else f"precision is {self.precision}"
            raise ReslabError(f"--calibration and --calibration-images set up int8 quantization, and {why}; drop "
                              "them" + ("" if model is None else " or give --precision int8"))
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
        """This model as an ONNX or OpenVINO file ("int8": its quantized ONNX graph): the given one, a cached
        export, or a fresh one."""
        if self.model is None:  # built from an exported file
            if fmt in ("openvino", "int8") or self.source.suffix.lower() == ".onnx":
                return self.source
            raise ReslabError(f"{self.source} is an OpenVINO model; it cannot run on {fmt}")
        if fmt not in self._exports:
            self._exports[fmt] = self._int8() if fmt == "int8" else cached_export(self.model, self.meta, fmt)
        return self._exports[fmt]

    def _int8(self) -> Path:
        """The int8 graph, calibrated on the training data's images, cached beside the run (RUN/export/)."""
        calibration, count = self._calibration
        count = DEFAULT_CALIBRATION_IMAGES if count is None else count
        data = None
        if not isinstance(calibration, torch.Tensor):
            data = calibration or self.meta.extra.get("data")
            if not data:
                raise ReslabError(f"{self.source or self.meta.model} does not say which data it was trained on, and "
                                  "int8 calibrates on images of it: give the data with --calibration DATA")
            calibration = calibration_images(data, self.meta, count)
        folder = None
        if self.source is not None and self.source.exists():
            folder = (self.source if self.source.is_dir() else self.source.parent) / "export"
        return cached_int8(self.model, self.meta, calibration[:count], Int8Settings.for_this_cpu(),
                           folder=folder, data=data)

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
        """Class probabilities of a uint8 batch; with test-time augmentation `flip`, flip_probabilities."""
        if self.tta == "flip":
            return flip_probabilities(self.logits, batch)
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


def _exported_precision(path: Path, meta: CheckpointMeta, precision: str) -> str:
    """The precision an exported file runs at: an int8 file is int8, an fp32 one cannot become int8 here."""
    if int8_info(meta) is not None:
        if precision not in ("auto", "int8"):
            raise ReslabError(f"{path} is an int8 model; drop --precision {precision} (or give the fp32 export)")
        return "int8"
    if precision == "int8":
        raise ReslabError(f"{path} is an fp32 export; quantize it with `reslab export SRC --int8 --calibration DATA`,"
                          " or give the run itself with --precision int8")
    return precision
