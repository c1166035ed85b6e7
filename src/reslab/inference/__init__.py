"""Inference: BN folding, backends and their runners, export, and the `Predictor` on top.

The modules import one way, each only from those before it:

    fold        BatchNorm folded into the convolutions (torch only)
    backends    the installed backends, the choice among them, a runner for each
    export      ONNX / OpenVINO files from the folded graph, checked with a runner; the export cache
    quantize    int8: the ONNX export statically quantized (ONNX Runtime, QDQ) on calibration images of
                real data, checked against fp32; cached beside the run like the exports
    predictor   `Predictor`: checkpoint or exported file -> preprocessing -> runner -> probabilities

An int8 graph runs on ONNX Runtime or OpenVINO (`backends.make_runner`'s int8 case).
serve, explain, evaluate and bench use this package; none of its modules imports them.
The `export` function is not re-exported here: the name is its module's (`reslab.inference.export`).
"""

from reslab.inference.backends import (
    BACKENDS,
    CPU_BF16_PREFERENCE,
    CPU_PREFERENCE,
    INFERENCE_PRECISIONS,
    INT8_PREFERENCE,
    OnnxRuntimeRunner,
    OpenVinoRunner,
    TorchRunner,
    default_channels_last,
    installed_backends,
    make_runner,
    normalizer,
    openvino_settings,
    resolve_backend,
)
from reslab.inference.export import (
    FORMATS,
    TOLERANCE,
    ExportResult,
    cached_export,
    check_export,
    export_onnx,
    export_openvino,
    read_exported_meta,
)
from reslab.inference.fold import fold_batchnorm
from reslab.inference.predictor import Predictor, check_top_k
from reslab.inference.quantize import Int8Settings, cached_int8, export_int8

__all__ = [
    "BACKENDS", "CPU_BF16_PREFERENCE", "CPU_PREFERENCE", "FORMATS", "INFERENCE_PRECISIONS", "INT8_PREFERENCE",
    "TOLERANCE", "ExportResult", "Int8Settings", "OnnxRuntimeRunner", "OpenVinoRunner", "Predictor", "TorchRunner",
    "cached_export", "cached_int8", "check_export", "check_top_k", "default_channels_last", "export_int8",
    "export_onnx", "export_openvino", "fold_batchnorm", "installed_backends", "make_runner", "normalizer",
    "openvino_settings", "read_exported_meta", "resolve_backend",
]
