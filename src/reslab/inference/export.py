"""Export to ONNX and OpenVINO: the BN-folded fp32 graph, dynamic batch, self-describing, checked.

    reslab export runs/resnet20-digits-... --format onnx        # -> RUN/best.onnx
    reslab export best.safetensors --format openvino            # -> best.xml + best.bin

The graph is `reslab.inference.fold.fold_batchnorm(model)`; the batch dimension is dynamic. The class names,
model name and options and the preprocessing travel inside the file (ONNX `metadata_props`,
OpenVINO `rt_info` under "reslab"), with the same keys as a reslab safetensors checkpoint, so
`Predictor("best.onnx")` and `reslab predict best.onnx cat.jpg` need nothing else. Every export is
run once against the eager PyTorch model on a random batch of another batch size than the one
traced; fp32 must agree within `TOLERANCE` (max abs difference of the logits). int8 files are made
from this export by reslab.inference.quantize (`reslab export --int8`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from reslab.checkpoint import CheckpointMeta, resolve
from reslab.errors import ReslabError
from reslab.inference.backends import OnnxRuntimeRunner, OpenVinoRunner, installed_backends
from reslab.inference.fold import fold_batchnorm
from reslab.io import atomic_path, cache_root

FORMATS = {"onnx": ".onnx", "openvino": ".xml"}
TOLERANCE = 1e-4
DEFAULT_OPSET = 17
INPUT, OUTPUT = "input", "logits"


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float | None  # None where no runtime was installed to check with
    checked_with: str | None


def input_shape(meta: CheckpointMeta) -> tuple[int, int, int]:
    pre = meta.preprocessing
    if "image_size" not in pre:
        raise ReslabError(f"checkpoint of {meta.model} stores no image size in its preprocessing; re-save it with "
                          "reslab train")
    return int(pre.get("in_channels", 3)), int(pre["image_size"]), int(pre["image_size"])


def export_onnx(model: nn.Module, meta: CheckpointMeta, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET) -> Path:
    """Write the BN-folded fp32 model as ONNX (dynamic batch, reslab metadata) atomically."""
    _require("onnx", "onnx")
    import onnx

    folded = fold_batchnorm(model).cpu().float()
    example = torch.randn(2, *input_shape(meta))
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) is deprecated but needs no onnxscript and handles
        # the option-A shortcut's strided slice and pad exactly; its warnings are noise here.
        warnings.simplefilter("ignore")
        torch.onnx.export(folded, (example,), str(tmp), dynamo=False, opset_version=opset,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        graph = onnx.load(str(tmp))
        for key, value in meta.to_metadata().items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        graph.producer_name = "reslab"
        onnx.save(graph, str(tmp))
    return Path(path)


def export_openvino(model: nn.Module, meta: CheckpointMeta, path: str | os.PathLike, *,
                    opset: int = DEFAULT_OPSET) -> Path:
    """Write the model as OpenVINO IR (`path` .xml plus its .bin), fp32 weights, reslab rt_info.

    Converted from the ONNX export, which was several times faster than OpenVINO's PyTorch
    frontend (benchmarks/RESULTS.md, Speed: notes).
    """
    _require("openvino", "openvino")
    path = Path(path)
    if path.suffix != ".xml":
        raise ReslabError(f"an OpenVINO model is an .xml file (plus .bin), got --out {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as tmp:
        onnx_path = export_onnx(model, meta, Path(tmp) / "model.onnx", opset=opset)
        return onnx_to_openvino(onnx_path, meta, path)


def onnx_to_openvino(onnx_path: str | os.PathLike, meta: CheckpointMeta, path: str | os.PathLike) -> Path:
    """An ONNX file (fp32, or int8 QDQ: OpenVINO reads the pairs as FakeQuantize and runs them in int8)
    as OpenVINO IR with `meta` in its rt_info. The .bin is moved in place before the .xml, so a
    reader never finds an .xml without its weights.
    """
    _require("openvino", "openvino")
    import openvino as ov

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as tmp:
        ov_model = ov.Core().read_model(str(onnx_path))
        for key, value in meta.to_metadata().items():
            ov_model.set_rt_info(value, ["reslab", key])
        staged = Path(tmp) / path.name
        ov.save_model(ov_model, str(staged), compress_to_fp16=False)  # fp16 weights would fail the 1e-4 check
        os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(staged, path)
    return path


def read_exported_meta(path: str | os.PathLike) -> CheckpointMeta:
    """The reslab metadata inside an exported .onnx or OpenVINO .xml file."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".onnx":
            _require("onnx", "onnx")
            import onnx

            graph = onnx.load(str(path), load_external_data=False)
            metadata = {p.key: p.value for p in graph.metadata_props}
        else:
            _require("openvino", "openvino")
            import openvino as ov

            ov_model = ov.Core().read_model(str(path))
            metadata = {}
            if ov_model.has_rt_info(["reslab"]):
                for key in ("format", "format_version", "model", "model_options", "classes", "preprocessing",
                            "extra"):
                    if ov_model.has_rt_info(["reslab", key]):
                        metadata[key] = ov_model.get_rt_info(["reslab", key]).astype(str)
    except ReslabError:
        raise
    except Exception as err:  # the parsers raise their own types for a damaged file
        raise ReslabError(f"{path} is not a readable exported model ({str(err).splitlines()[0]}); "
                          "export it again with `reslab export`") from None
    if metadata.get("format") != "reslab":
        raise ReslabError(f"{path} holds no reslab metadata (class names, preprocessing); export it with "
                          "`reslab export`")
    return CheckpointMeta.from_metadata(metadata, path)


def check_export(model: nn.Module, meta: CheckpointMeta, path: Path, fmt: str,
                 batch_size: int = 3) -> tuple[float | None, str | None]:
    """Max abs difference of the exported model's logits against the eager fp32 PyTorch model.

    The batch size differs from the traced one (2), so a batch dimension baked in would show here.
    """
    installed = installed_backends()
    if fmt == "onnx" and "onnxruntime" in installed:
        runner, name = OnnxRuntimeRunner(path), "onnxruntime"
    elif "openvino" in installed:
        runner, name = OpenVinoRunner(path, precision="fp32"), "openvino"
    else:
        return None, None
    x = torch.randn(batch_size, *input_shape(meta), generator=torch.Generator().manual_seed(0))
    reference = model.cpu().float().eval()
    with torch.no_grad():
        expected = reference(x)
    return float((runner(x) - expected).abs().max()), name


def export(source: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, *,
           opset: int = DEFAULT_OPSET, model_name: str | None = None, classes=None) -> ExportResult:
    """Export any model source (a run, a weights file, catalog weights, a foreign checkpoint with
    `model_name`; see reslab.weights.load_source); the output is checked (fp32 within TOLERANCE)."""
    from reslab.weights.source import load_source

    if fmt not in FORMATS:
        raise ReslabError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not 7 <= opset <= 21:
        raise ReslabError(f"--opset must be between 7 and 21, got {opset}")
    model, meta = load_source(source, model=model_name, classes=classes)
    if out is not None:
        out = Path(out)
    elif Path(source).exists():
        out = resolve(source).with_suffix(FORMATS[fmt])
    else:  # catalog weights or a URL: named after them, in the current folder
        from reslab.train.state import safe_name

        out = Path(safe_name(str(source)) + FORMATS[fmt])
    if fmt == "openvino" and out.suffix != ".xml":
        raise ReslabError(f"an OpenVINO model is an .xml file (plus .bin), got --out {str(out)!r}")
    writer = export_onnx if fmt == "onnx" else export_openvino
    writer(model, meta, out, opset=opset)
    diff, checked_with = check_export(model, meta, out, fmt)
    if diff is not None and not diff <= TOLERANCE:
        raise ReslabError(f"{out}: exported {fmt} output differs from PyTorch by {diff:.3g} (more than "
                          f"{TOLERANCE:g}); the file is kept for inspection, please report it")
    return ExportResult(out, fmt, diff, checked_with)


def model_key(model: nn.Module, meta: CheckpointMeta, fmt: str, opset: int = DEFAULT_OPSET) -> str:
    """A digest of everything an export depends on: weights, metadata, format, versions."""
    import reslab

    digest = hashlib.sha256(f"{fmt}|{opset}|{reslab.__version__}|{torch.__version__}".encode())
    digest.update(repr(sorted(meta.to_metadata().items())).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def cached_export(model: nn.Module, meta: CheckpointMeta, fmt: str) -> Path:
    """An export of `model` in reslab's cache (reslab.io.cache_root(), under export/), made once.

    Keyed on the weights themselves, so a retrained checkpoint at the same path is exported anew.
    """
    folder = cache_root() / "export"
    path = folder / f"{meta.model}-{model_key(model, meta, fmt)}{FORMATS[fmt]}"
    if path.exists() and (fmt == "onnx" or path.with_suffix(".bin").exists()):
        return path
    (export_onnx if fmt == "onnx" else export_openvino)(model, meta, path)
    return path


def _require(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ReslabError(f"exporting needs the {module!r} package: `pip install reslab[{extra}]`")
