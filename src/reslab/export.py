"""Compatibility: ONNX / OpenVINO export moved to `reslab.inference.export`.

`from reslab.export import export` (and the other names below) keeps working; new code imports
from reslab.inference.export. This module only re-exports, so it adds no import cycle.
"""

from reslab.inference.export import (
    DEFAULT_OPSET,
    FORMATS,
    INPUT,
    OUTPUT,
    TOLERANCE,
    ExportResult,
    cached_export,
    check_export,
    export,
    export_onnx,
    export_openvino,
    input_shape,
    model_key,
    read_exported_meta,
)

__all__ = ["DEFAULT_OPSET", "FORMATS", "INPUT", "OUTPUT", "TOLERANCE", "ExportResult", "cached_export", "check_export",
           "export", "export_onnx", "export_openvino", "input_shape", "model_key", "read_exported_meta"]
