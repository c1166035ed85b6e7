"""int8: post-training static quantization, calibrated on real images through the model's own preprocessing.

    reslab export runs/resnet20-digits-... --format onnx --int8 --calibration digits   # -> RUN/best-int8.onnx
    reslab predict runs/resnet20-digits-... cat.png --precision int8                  # quantized on the fly

The BN-folded fp32 ONNX export is quantized by ONNX Runtime (`quantize_static`): every convolution and
the classifier get int8 weights, one scale per output channel, and uint8 activations whose ranges are
the min/max seen on the calibration images (QDQ format: QuantizeLinear/DequantizeLinear pairs that ORT
fuses into integer kernels and that OpenVINO reads as FakeQuantize and runs in int8 too). The choices
were measured (benchmarks/RESULTS.md, int8):

- uint8 activations x int8 weights: ORT's x86 kernels are u8 x s8; int8 activations measured much
  slower in ORT and no faster in OpenVINO. One weight scale per output channel; MinMax ranges.
- ORT's pre-processing first: the exporter shares identical biases through Identity nodes, and a
  convolution whose bias is not a plain initializer stays fp32.
- OpenVINO runs the same QDQ file (NNCF's own quantization measured no faster, no more accurate).
- `reduce_range` (7-bit weights) exactly where the CPU has no VNNI (an x86 CPU without AVX512-VNNI,
  AVX-VNNI or AMX): there the kernel sums pairs of u8 x s8 products in int16 (vpmaddubsw), which
  saturates for large weights and activations; 7-bit weights keep every pair in range. With VNNI the
  products are summed in int32 and the 8th bit is kept. A file made on one CPU may run on another, so
  the choice is recorded in the file and a Predictor warns when it meets a CPU the file was not made for.
  With 7-bit weights, one scale per tensor: measured more accurate than per-channel scales there.
- calibration through the model's preprocessing on images of the data it was trained on (or the data
  the user names), never random noise: the activation ranges are the model's on real inputs.

Cached files carry in their name a digest of the weights, the settings and the calibration images
themselves, so a new calibration set or a retrained checkpoint is quantized anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reslab.checkpoint import CheckpointMeta
from reslab.errors import ReslabError
from reslab.hardware import cpu_flags, cpu_has_vnni
from reslab.inference.backends import OnnxRuntimeRunner, installed_backends, normalizer
from reslab.inference.export import (
    FORMATS,
    INPUT,
    cached_export,
    export_onnx,
    model_key,
    onnx_to_openvino,
    read_exported_meta,
)
from reslab.io import atomic_path, cache_root

DEFAULT_CALIBRATION_IMAGES = 128
DEFAULT_MAX_DROP = 0.01
CALIBRATION_BATCH = 16  # images per calibration forward pass (ORT keeps only each tensor's min and max)
X86 = ("x86_64", "amd64", "i386", "i686")
INT8_KEY = "int8"  # where an int8 file's settings live in its metadata's `extra`


@dataclass(frozen=True)
class Int8Settings:
    """How a graph is quantized; recorded in the file and part of every cache key."""

    reduce_range: bool  # 7-bit weights: see the module docstring
    per_channel: bool = True
    activations: str = "uint8"
    weights: str = "int8"
    calibration: str = "minmax"
    format: str = "QDQ"
    fp32_ends: bool = False  # the first convolution and the classifier left in fp32

    @classmethod
    def for_this_cpu(cls, reduce_range: bool | None = None) -> Int8Settings:
        """The settings this CPU runs best: reduce_range exactly on an x86 CPU without VNNI, and then
        one weight scale per tensor (with 7-bit weights, per-channel scales lost 0.6-1.0 point of top-1
        on resnet20, per-tensor 0.2-0.8, in four paired measurements; benchmarks/RESULTS.md, int8)."""
        reduce_range = needs_reduce_range() if reduce_range is None else bool(reduce_range)
        return cls(reduce_range=reduce_range, per_channel=not reduce_range)

    def to_dict(self) -> dict:
        return asdict(self)


def needs_reduce_range() -> bool:
    """Whether int8 products can saturate here (x86 without VNNI); ARM's dot products and VNNI do not."""
    return platform.machine().lower() in X86 and not cpu_has_vnni()


def int8_is_fast() -> bool:
    """Whether this CPU has int8 dot products that beat its fp32 arithmetic: x86 from AVX2 on (with or
    without VNNI), 64-bit ARM."""
    machine = platform.machine().lower()
    return machine in ("aarch64", "arm64") or (machine in X86 and bool(cpu_flags() & {"avx2", "avx512_vnni",
                                                                                          "avx_vnni", "amx_int8"}))


def int8_info(meta: CheckpointMeta) -> dict | None:
    """The quantization record of an int8 file's metadata (settings, calibration), None for fp32."""
    info = meta.extra.get(INT8_KEY)
    return info if isinstance(info, dict) else None


def warn_if_saturating(meta: CheckpointMeta, where) -> None:
    """A file quantized with full-range weights, run on a CPU whose int8 kernels can saturate."""
    info = int8_info(meta)
    if info and not info.get("settings", {}).get("reduce_range", True) and needs_reduce_range():
        warnings.warn(f"{where} was quantized for a CPU with VNNI (8-bit weights); this CPU has no VNNI and its "
                      "int8 kernels may saturate: re-export it here (reslab export --int8) for full accuracy",
                      stacklevel=3)


def check_calibration_images(count: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ReslabError(f"--calibration-images must be an integer of at least 1, got {count!r}")
    return count


def check_max_drop(max_drop: float) -> float:
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop <= 1:
        raise ReslabError(f"--max-drop must be a fraction between 0 and 1 (0.01: one point of top-1), got {max_drop!r}")
    return max_drop


def _require_ort() -> None:
    if "onnxruntime" not in installed_backends():
        raise ReslabError("int8 needs ONNX Runtime (it quantizes the graph): `pip install reslab[onnx]`")


# --- calibration images -------------------------------------------------------------------------------


def calibration_images(data: str, meta: CheckpointMeta, count: int = DEFAULT_CALIBRATION_IMAGES, *,
                       data_dir: str | None = None) -> torch.Tensor:
    """`count` images of `data`'s training split as uint8 N x C x H x W, through `meta`'s preprocessing.

    For the data the checkpoint was trained on, the split is the training run's own (same seed and
    validation fraction), so no validation image calibrates. The pick is seeded: the same call gives
    the same images, hence the same cache key.
    """
    from reslab.data import load_data

    check_calibration_images(count)
    pre, extra = meta.preprocessing, meta.extra
    same_data = data == extra.get("data")
    size, resize_size = pre.get("image_size"), pre.get("resize_size") or pre.get("image_size")
    bundle = load_data(data, image_size=resize_size, val_split=extra.get("val_split") if same_data else None,
                       seed=extra.get("seed", 0) if same_data else 0, data_dir=data_dir, quiet=True)
    want = pre.get("in_channels", 3)
    if bundle.in_channels != want:
        raise ReslabError(f"the model takes {want}-channel images but {data} gives {bundle.in_channels}-channel "
                          "ones; calibrate on data like its training data")
    return pick(bundle.train.images, count, size)


def pick(images: torch.Tensor, count: int, size: int | None = None) -> torch.Tensor:
    """A seeded choice of `count` images (all where there are fewer), centre-cropped to `size`."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:count].sort().values
    chosen = images[order]
    if size is not None and chosen.shape[-1] != size:
        top, left = (chosen.shape[2] - size) // 2, (chosen.shape[3] - size) // 2
        chosen = chosen[:, :, top:top + size, left:left + size]
    return chosen.contiguous()


def images_digest(images: torch.Tensor) -> str:
    """A digest of a uint8 image batch: the calibration set's identity in cache keys and metadata."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# --- quantization -----------------------------------------------------------------------------------


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over normalized float batches."""

    def __init__(self, batches: Iterator[np.ndarray]):
        self.batches = batches

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {INPUT: batch}

    def rewind(self):  # part of the protocol; one pass is all MinMax needs
        raise NotImplementedError


def normalized_batches(images: torch.Tensor, meta: CheckpointMeta,
                       batch_size: int = CALIBRATION_BATCH) -> Iterator[np.ndarray]:
    """uint8 images -> float batches exactly as the model sees them (the Predictor's normalization)."""
    pre = meta.preprocessing
    normalize = normalizer(pre.get("mean", (0.0,)), pre.get("std", (1.0,)), pre.get("in_channels", 3))
    for start in range(0, len(images), batch_size):
        yield normalize(images[start:start + batch_size]).numpy()


def quantize_onnx(fp32: str | os.PathLike, out: str | os.PathLike, batches: Iterator[np.ndarray],
                  meta: CheckpointMeta, settings: Int8Settings, calibration: dict) -> Path:
    """Write `fp32` (an ONNX file) statically quantized to `out`, with `meta` plus the int8 record.

    `batches` are normalized float batches (normalized_batches); `calibration` says what they were
    (data, images, digest) and goes into the metadata beside `settings`.
    """
    _require_ort()
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".reslab-int8-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # ORT's pre-processing folds the exporter's Identity nodes into the initializers: a bias behind
        # one (identical zero biases are deduplicated that way) would stay fp32 and its Conv unfused.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantized = Path(tmp) / "int8.onnx"
        excluded = _end_nodes(onnx.load(str(prepared))) if settings.fp32_ends else []
        quantize_static(str(prepared), str(quantized), _Batches(iter(batches)), nodes_to_exclude=excluded,
                        quant_format=getattr(QuantFormat, settings.format), per_channel=settings.per_channel,
                        reduce_range=settings.reduce_range, activation_type=types[settings.activations],
                        weight_type=types[settings.weights], calibrate_method=CalibrationMethod.MinMax,
                        calibration_providers=["CPUExecutionProvider"])
        graph = onnx.load(str(quantized))
        stamped = replace(meta, extra={**meta.extra, INT8_KEY: {"settings": settings.to_dict(), **calibration}})
        del graph.metadata_props[:]
        for key, value in stamped.to_metadata().items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        graph.producer_name = "reslab"
        with atomic_path(out) as staged:
            onnx.save(graph, str(staged))
    return out


def _end_nodes(graph) -> list[str]:
    """Names of the graph's first convolution and last matrix product (the classifier)."""
    nodes = graph.graph.node
    first = next((n.name for n in nodes if n.op_type == "Conv"), None)
    last = next((n.name for n in reversed(nodes) if n.op_type in ("Gemm", "MatMul")), None)
    return [name for name in (first, last) if name]


def quantize_model(model: nn.Module, meta: CheckpointMeta, out: str | os.PathLike, images: torch.Tensor,
                   settings: Int8Settings, *, data: str | None = None) -> Path:
    """`model` (BN-folded, exported to ONNX) quantized with `images` (uint8, preprocessed) as calibration."""
    with tempfile.TemporaryDirectory(prefix=".reslab-fp32-") as tmp:
        fp32 = export_onnx(model, meta, Path(tmp) / "fp32.onnx")
        return quantize_onnx(fp32, out, normalized_batches(images, meta), meta, settings,
                             calibration_record(images, data))


def calibration_record(images: torch.Tensor, data: str | None) -> dict:
    return {"calibration": {"data": data, "images": len(images), "digest": images_digest(images)}}


def int8_key(model: nn.Module, meta: CheckpointMeta, settings: Int8Settings, calibration: torch.Tensor) -> str:
    """A digest of everything an int8 graph depends on: the fp32 export's key, settings, calibration pixels."""
    digest = hashlib.sha256(model_key(model, meta, "onnx").encode())
    digest.update(json.dumps(settings.to_dict(), sort_keys=True).encode())
    digest.update(images_digest(calibration).encode())
    return digest.hexdigest()[:24]


def cached_int8(model: nn.Module, meta: CheckpointMeta, calibration: torch.Tensor, settings: Int8Settings, *,
                folder: str | os.PathLike | None = None, data: str | None = None) -> Path:
    """An int8 ONNX graph of `model` calibrated on `calibration` (uint8 images), made once.

    `folder`: beside a run (RUN/export/), else reslab's export cache. The fp32 graph it starts from is
    the cached export (reslab.inference.export.cached_export).
    """
    folder = Path(folder) if folder is not None else cache_root() / "export"
    path = folder / f"{meta.model}-{int8_key(model, meta, settings, calibration)}-int8.onnx"
    if not path.exists():
        fp32 = cached_export(model, meta, "onnx")
        quantize_onnx(fp32, path, normalized_batches(calibration, meta), meta, settings,
                      calibration_record(calibration, data))
    return path


# --- the checked export -------------------------------------------------------------------------------


@dataclass
class Int8Report:
    """What an int8 export measured against the fp32 graph on held-out labelled images."""

    n: int
    agreement: float  # fraction of images whose top-1 class is the same in fp32 and int8
    fp32_top1: float | None  # None without labels
    int8_top1: float | None
    calibration_images: int
    settings: dict = field(default_factory=dict)

    @property
    def drop(self) -> float | None:
        return None if self.fp32_top1 is None else self.fp32_top1 - self.int8_top1


@dataclass
class Int8Export:
    path: Path | None  # None where the export was refused
    format: str
    report: Int8Report


def compare_int8(fp32: Path, int8: Path, images: torch.Tensor, labels: torch.Tensor | None,
                 meta: CheckpointMeta, batch_size: int = 64) -> tuple[int, float, float | None, float | None]:
    """(n, top-1 agreement, fp32 top-1, int8 top-1) of two ONNX graphs on uint8 `images`."""
    fp32_runner, int8_runner = OnnxRuntimeRunner(fp32), OnnxRuntimeRunner(int8)
    predictions = {"fp32": [], "int8": []}
    for batch in normalized_batches(images, meta, batch_size):
        x = torch.from_numpy(batch)
        predictions["fp32"].append(fp32_runner(x).argmax(1))
        predictions["int8"].append(int8_runner(x).argmax(1))
    a, b = torch.cat(predictions["fp32"]), torch.cat(predictions["int8"])
    agreement = float((a == b).float().mean())
    if labels is None:
        return len(a), agreement, None, None
    return len(a), agreement, float((a == labels).float().mean()), float((b == labels).float().mean())


def export_int8(model: nn.Module, meta: CheckpointMeta, fmt: str, out: str | os.PathLike, *,
                calibration: torch.Tensor, holdout: torch.Tensor, labels: torch.Tensor | None,
                data: str | None = None, max_drop: float = DEFAULT_MAX_DROP, force: bool = False,
                reduce_range: bool | None = None) -> Int8Export:
    """Quantize `model` on `calibration`, measure it against fp32 on `holdout` (uint8 images, `labels`
    as the model's class indices), and write it as `fmt` to `out` unless top-1 dropped by more than
    `max_drop` (then nothing is written and the report says why), or `force`.
    """
    _require_ort()
    if fmt not in FORMATS:
        raise ReslabError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    check_max_drop(max_drop)
    if len(holdout) == 0:
        raise ReslabError("no held-out images to check the int8 model on; give --eval-data")
    out = Path(out)
    if out.suffix != FORMATS[fmt]:
        raise ReslabError(f"an {fmt} model is a {FORMATS[fmt]} file, got --out {str(out)!r}")
    settings = Int8Settings.for_this_cpu(reduce_range)
    with tempfile.TemporaryDirectory(prefix=".reslab-int8-") as tmp:
        fp32 = export_onnx(model, meta, Path(tmp) / "fp32.onnx")
        int8 = quantize_onnx(fp32, Path(tmp) / "int8.onnx", normalized_batches(calibration, meta), meta, settings,
                             calibration_record(calibration, data))
        n, agreement, fp32_top1, int8_top1 = compare_int8(fp32, int8, holdout, labels, meta)
        report = Int8Report(n, agreement, fp32_top1, int8_top1, len(calibration), settings.to_dict())
        if report.drop is not None and report.drop > max_drop and not force:
            return Int8Export(None, fmt, report)
        if fmt == "onnx":
            with atomic_path(out) as staged:
                staged.write_bytes(int8.read_bytes())
        else:
            onnx_to_openvino(int8, read_exported_meta(int8), out)
    return Int8Export(out, fmt, report)
