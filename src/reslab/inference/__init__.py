"""Inference: BN folding, backends and their runners, export, and the `Predictor` on top.

The modules import one way, each only from those before it:

    fold        BatchNorm folded into the convolutions (torch only)
    backends    the installed backends, the choice among them, a runner for each
    export      ONNX / OpenVINO files from the folded graph, checked with a runner; the export cache
    predictor   `Predictor`: checkpoint or exported file -> preprocessing -> runner -> probabilities

int8 (ONNX Runtime static quantization) belongs between export and predictor: a `quantize` module
that turns a cached ONNX export and calibration batches into a quantized graph (cached the same
way), a runner case for it in `backends.make_runner`, and "int8" among the Predictor's precisions.
serve, explain, evaluate and bench use this package; none of its modules imports them.
The `export` function is not re-exported here: the name is its module's (`reslab.inference.export`).
"""

from reslab.inference.backends import (
    BACKENDS,
    CPU_BF16_PREFERENCE,
    CPU_PREFERENCE,
    OnnxRuntimeRunner,
    OpenVinoRunner,
    TorchRunner,
    default_channels_last,
    installed_backends,
    make_runner,
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
from reslab.inference.predictor import Predictor, check_top_k, normalizer

__all__ = [
    "BACKENDS", "CPU_BF16_PREFERENCE", "CPU_PREFERENCE", "FORMATS", "TOLERANCE", "ExportResult", "OnnxRuntimeRunner",
    "OpenVinoRunner", "Predictor", "TorchRunner", "cached_export", "check_export", "check_top_k",
    "default_channels_last", "export_onnx", "export_openvino", "fold_batchnorm", "installed_backends",
    "make_runner", "normalizer", "read_exported_meta", "resolve_backend",
]
