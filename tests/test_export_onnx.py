"""`reslab export`: a round trip through ONNX Runtime / OpenVINO keeps the logits and the metadata."""

from __future__ import annotations

import pytest
import torch

from reslab.checkpoint import CheckpointMeta, save_weights
from reslab.cli import main
from reslab.errors import ReslabError
from reslab.inference import Predictor
from reslab.inference.export import TOLERANCE, export, read_exported_meta
from reslab.models import create_model

CLASSES = ["cat", "dog", "owl"]


@pytest.fixture
def checkpoint(tmp_path):
    from tests.test_infer_speed import randomize_batchnorm

    torch.manual_seed(0)
    model = randomize_batchnorm(create_model("resnet20", num_classes=3))
    meta = CheckpointMeta(model="resnet20", classes=CLASSES,
                          preprocessing={"image_size": 16, "in_channels": 3, "mean": [0.5, 0.5, 0.5],
                                         "std": [0.25, 0.25, 0.25], "resize": "squash", "interpolation": "bilinear"})
    return save_weights(tmp_path / "run" / "best.safetensors", model, meta)


def test_onnx_round_trip_with_onnxruntime(checkpoint, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint.parent), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max abs difference against PyTorch (onnxruntime, fp32)" in printed
    diff = float(printed.split("fp32): ")[1].split()[0])
    assert diff <= TOLERANCE

    meta = read_exported_meta(out)
    assert meta.classes == CLASSES and meta.model == "resnet20" and meta.preprocessing["image_size"] == 16

    # Dynamic batch, and the exported file alone is enough for a Predictor.
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    reference = Predictor(checkpoint, backend="torch", precision="fp32")
    with torch.no_grad():
        expected = reference.model(reference.normalize(images))
    exported = Predictor(out, backend="onnxruntime")
    assert exported.model is None and exported.classes == CLASSES
    got = exported.logits(images)
    assert got.shape == (5, 3)
    assert (got - expected).abs().max() <= TOLERANCE


def test_openvino_round_trip(checkpoint, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    result = export(checkpoint, "openvino", tmp_path / "ov" / "model.xml")
    assert result.path.exists() and result.path.with_suffix(".bin").exists()
    assert result.max_abs_diff is not None and result.max_abs_diff <= TOLERANCE
    assert read_exported_meta(result.path).classes == CLASSES
    predictor = Predictor(result.path)
    assert predictor.backend == "openvino"
    assert predictor.logits(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)).shape == (2, 3)


def test_export_refuses_bad_input(checkpoint, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--format", "onnx"]) == 2
    assert "no run directory or weights file" in capsys.readouterr().err
    with pytest.raises(ReslabError, match="--opset"):
        export(checkpoint, "onnx", opset=3)
    with pytest.raises(ReslabError, match="format"):
        export(checkpoint, "tflite")
    not_reslab = tmp_path / "foreign.onnx"
    not_reslab.write_bytes(b"not an onnx file")
    pytest.importorskip("onnx")
    with pytest.raises(ReslabError, match="foreign.onnx"):
        read_exported_meta(not_reslab)
