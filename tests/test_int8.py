"""int8: the export round trip, the accuracy gate, exported files in evaluate/predict, on-the-fly int8."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from reslab.cli import main  # noqa: E402
from reslab.errors import ReslabError  # noqa: E402
from reslab.evaluate import evaluate  # noqa: E402
from reslab.inference import INT8_PREFERENCE, Predictor, installed_backends  # noqa: E402
from reslab.inference.export import read_exported_meta  # noqa: E402
from reslab.inference.quantize import (  # noqa: E402
    DEFAULT_CALIBRATION_IMAGES,
    Int8Settings,
    export_int8,
    int8_info,
    warn_if_saturating,
)
from reslab.train import train  # noqa: E402
from test_train import CLASSES, make_folder, tiny_config  # noqa: E402

# Top-1 agreement of the int8 graph with fp32 on the held-out shapes: a small net's logits move a
# little under int8 rounding, a broken quantization (wrong scales, a lost layer) scrambles them.
MIN_AGREEMENT = 0.9
AUTO = next(b for b in INT8_PREFERENCE if b in installed_backends())  # where int8 runs by default


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet8 trained for two epochs on three shape classes (48 images, 16 px): its run records its data."""
    root = tmp_path_factory.mktemp("int8")
    folder = make_folder(root / "shapes", per_class=16)
    run = root / "run"
    # The augmentation pinned (not the small-folder default): the fixture must be a model that learned.
    train(tiny_config(folder, run, epochs=2, augment="trivial"))
    return folder, run


def _black_folder(root: Path, size: int = 16) -> Path:
    """Images with every pixel 0, in the same class folders: calibration ranges far from real ones."""
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(root / c / f"{i}.png")
    return root


def test_int8_export_round_trip_agrees_with_fp32(trained, tmp_path, capsys):
    folder, run = trained
    out = tmp_path / "model-int8.onnx"
    assert main(["export", str(run), "--format", "onnx", "--int8", "--calibration", str(folder),
                 "--calibration-images", "12", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "calibrated on 12 images" in printed and "checked on 36 images of" in printed  # the rest of the folder
    agreement = float(printed.split("top-1 agreement with fp32 ")[1].split(";")[0])
    assert agreement >= MIN_AGREEMENT

    meta = read_exported_meta(out)
    info = int8_info(meta)
    assert meta.classes == list(CLASSES) and meta.preprocessing["image_size"] == 16
    assert info["settings"] == Int8Settings.for_this_cpu().to_dict() and info["calibration"]["images"] == 12
    import onnx

    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops  # QDQ around the convolutions

    # The exported file alone is an int8 Predictor, and its answers are the fp32 model's on nearly every image.
    int8 = Predictor(out)
    assert int8.model is None and int8.precision == "int8" and int8.backend == AUTO
    fp32 = Predictor(run, backend="torch", precision="fp32")
    images = fp32.load_images(sorted(folder.rglob("*.png")))
    same = (int8.logits(images).argmax(1) == fp32.logits(images).argmax(1)).float().mean()
    assert same >= MIN_AGREEMENT


def test_int8_openvino_export_runs_the_quantized_graph(trained, tmp_path):
    pytest.importorskip("openvino")
    folder, run = trained
    out = tmp_path / "ov" / "model.xml"
    assert main(["export", str(run), "--format", "openvino", "--int8", "--calibration", str(folder),
                 "--calibration-images", "12", "--out", str(out)]) == 0
    assert out.exists() and out.with_suffix(".bin").exists()
    predictor = Predictor(out)
    assert (predictor.backend, predictor.precision) == ("openvino", "int8")
    assert int8_info(predictor.meta)["calibration"]["images"] == 12
    images = predictor.load_images(sorted(folder.rglob("*.png")))
    reference = Predictor(run, backend="torch", precision="fp32").logits(images).argmax(1)
    assert (predictor.logits(images).argmax(1) == reference).float().mean() >= MIN_AGREEMENT


def test_export_refuses_an_int8_model_that_drops_more_than_max_drop(trained, tmp_path, capsys):
    """Calibrated on black images, the activation ranges clip every real input: top-1 collapses."""
    folder, run = trained
    black = _black_folder(tmp_path / "black")
    out = tmp_path / "bad-int8.onnx"
    argv = ["export", str(run), "--format", "onnx", "--int8", "--calibration", str(black), "--eval-data",
            str(folder), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "int8 top-1 dropped by" in err and "more than --max-drop 0.01: nothing written" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    drop = float(err.split("dropped by ")[1].split()[0])
    assert drop > 0.01
    # Told to, it writes the file anyway and says so; a --max-drop above the drop accepts it.
    assert main([*argv, "--force"]) == 0
    assert "written because of --force" in capsys.readouterr().out and out.exists()
    out.unlink()
    assert main([*argv, "--max-drop", f"{min(drop + 0.01, 1):.4f}"]) == 0 and out.exists()


def test_export_int8_library_reports_drop_and_writes_nothing_when_refused(trained, tmp_path):
    from reslab.weights.source import load_source

    folder, run = trained
    model, meta = load_source(run)
    images = Predictor(run, backend="torch", precision="fp32").load_images(sorted(folder.rglob("*.png")))
    labels = Predictor(run, backend="torch", precision="fp32").logits(images).argmax(1)  # fp32 top-1 is 1.0
    black = torch.zeros(8, 3, 16, 16, dtype=torch.uint8)
    result = export_int8(model, meta, "onnx", tmp_path / "m.onnx", calibration=black, holdout=images,
                         labels=labels, max_drop=0.01)
    assert result.path is None and not (tmp_path / "m.onnx").exists()
    report = result.report
    assert report.fp32_top1 == 1.0 and report.drop == pytest.approx(1 - report.agreement) and report.drop > 0.01
    with pytest.raises(ReslabError, match="--max-drop must be a fraction"):
        export_int8(model, meta, "onnx", tmp_path / "m.onnx", calibration=black, holdout=images, labels=labels,
                    max_drop=2)
    with pytest.raises(ReslabError, match=r"\.xml file"):
        export_int8(model, meta, "openvino", tmp_path / "m.onnx", calibration=black, holdout=images, labels=labels)


def test_evaluate_and_predict_take_an_exported_int8_file(trained, tmp_path, capsys):
    folder, run = trained
    out = tmp_path / "model-int8.onnx"
    assert main(["export", str(run), "--format", "onnx", "--int8", "--calibration", str(folder), "--out",
                 str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(folder), "--out", str(tmp_path / "ev"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["precision"] == "int8" and result["backend"] == AUTO and result["n"] == 48
    fp32 = evaluate(run, data=str(folder), out=tmp_path / "ev32", backend="torch", precision="fp32")
    assert abs(result["top1"] - fp32["top1"]) <= 1 - MIN_AGREEMENT

    files = sorted(str(p) for p in folder.rglob("*.png"))[:3]
    assert main(["predict", str(out), *files, "--json", "--top-k", "2"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert [p["image"] for p in predicted] == files
    assert all(len(p["top"]) == 2 and p["top"][0]["class"] in CLASSES for p in predicted)

    # An int8 file is int8: another precision is refused, as is int8 for an fp32 export.
    assert main(["evaluate", str(out), "--data", str(folder), "--precision", "fp32"]) == 2
    assert "is an int8 model; drop --precision fp32" in capsys.readouterr().err
    assert main(["evaluate", str(out), "--data", str(folder), "--calibration", str(folder)]) == 2
    assert "model-int8.onnx is quantized already; drop them" in capsys.readouterr().err
    fp32_file = tmp_path / "model.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(fp32_file)]) == 0
    assert main(["predict", str(fp32_file), files[0], "--precision", "int8"]) == 2
    assert "is an fp32 export; quantize it with `reslab export SRC --int8" in capsys.readouterr().err


def test_precision_int8_quantizes_on_the_fly_with_the_runs_data_cached_beside_it(trained, tmp_path, monkeypatch):
    import reslab.inference.quantize as quantize

    folder, run = trained
    run = Path(shutil.copytree(run, tmp_path / "run"))
    calls = []
    real = quantize.quantize_onnx
    monkeypatch.setattr(quantize, "quantize_onnx", lambda *a, **k: calls.append(1) or real(*a, **k))
    images = Predictor(run, precision="fp32", backend="torch").load_images(sorted(folder.rglob("*.png")))

    first = Predictor(run, precision="int8", calibration_images=10)
    assert (first.backend, first.precision) == (AUTO, "int8")
    logits = first.logits(images)
    cached = sorted((run / "export").glob("*-int8.onnx"))
    assert len(cached) == 1 and len(calls) == 1
    assert int8_info(read_exported_meta(cached[0]))["calibration"] == {
        "data": str(folder), "images": 10, "digest": int8_info(read_exported_meta(cached[0]))["calibration"]["digest"]}
    # The same run, data and count: the cached graph, the same answers, nothing quantized again.
    again = Predictor(run, precision="int8", calibration_images=10)
    assert torch.equal(again.logits(images), logits) and len(calls) == 1
    # Both runtimes read that one file.
    for backend in {"onnxruntime", "openvino"} & set(installed_backends()):
        other = Predictor(run, precision="int8", backend=backend, calibration_images=10).logits(images)
        assert (other.argmax(1) == logits.argmax(1)).float().mean() >= MIN_AGREEMENT and len(calls) == 1
    # Another calibration set is another key, hence another file.
    Predictor(run, precision="int8", calibration_images=11).logits(images[:1])
    assert len(sorted((run / "export").glob("*-int8.onnx"))) == 2 and len(calls) == 2

    reference = Predictor(run, precision="fp32", backend="torch").logits(images).argmax(1)
    assert (logits.argmax(1) == reference).float().mean() >= MIN_AGREEMENT


def test_int8_refuses_what_it_cannot_do(trained, tmp_path, capsys):
    folder, run = trained
    with pytest.raises(ReslabError, match="int8 runs on onnxruntime or openvino, not torch"):
        Predictor(run, precision="int8", backend="torch")
    with pytest.raises(ReslabError, match="calibration-images must be an integer of at least 1, got 0"):
        Predictor(run, precision="int8", calibration_images=0)
    with pytest.raises(ReslabError, match="set up int8 quantization, and precision is fp32; drop them or give"):
        Predictor(run, precision="fp32", calibration=str(folder))  # never silently ignored
    # Weights that do not say what they were trained on need --calibration.
    from reslab.checkpoint import CheckpointMeta, save_weights
    from reslab.models import create_model

    meta = CheckpointMeta(model="resnet8", classes=list(CLASSES), preprocessing={"image_size": 16, "in_channels": 3})
    weights = save_weights(tmp_path / "w" / "best.safetensors", create_model("resnet8", num_classes=3), meta)
    image = str(next(folder.rglob("*.png")))
    assert main(["predict", str(weights), image, "--precision", "int8"]) == 2
    assert "give the data with --calibration DATA" in capsys.readouterr().err
    assert main(["predict", str(weights), image, "--precision", "int8", "--calibration", str(folder)]) == 0
    assert sorted((tmp_path / "w" / "export").glob("*-int8.onnx"))  # cached beside the weights

    assert main(["export", str(run), "--format", "onnx", "--int8"]) == 2
    assert "--int8 needs --calibration DATA" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "onnx", "--calibration", str(folder)]) == 2
    assert "--calibration: for an int8 export only; add --int8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", str(run), image, "--precision", "int8", "--calibration-images", "0"])
    assert "--calibration-images must be an integer of at least 1, got 0" in capsys.readouterr().err
    assert main(["train", "--precision", "int8", "--out", str(tmp_path / "never")]) == 2  # training has no int8
    assert "--precision must be one of fp32, bf16, auto, got 'int8'" in capsys.readouterr().err
    assert main(["bench", "--mode", "train", "--precision", "int8"]) == 2
    assert "int8 is an inference precision" in capsys.readouterr().err


def test_reduce_range_is_decided_from_the_cpu(monkeypatch, tmp_path):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("RESLAB_CPU_VNNI", "0")
    assert Int8Settings.for_this_cpu().reduce_range is True  # u8 x s8 pairs summed in int16 can saturate
    assert Int8Settings.for_this_cpu().per_channel is False  # with 7-bit weights, per tensor measured better
    assert Int8Settings.for_this_cpu(reduce_range=False).per_channel is True
    assert Int8Settings.for_this_cpu(reduce_range=False).reduce_range is False  # asked for: kept
    from reslab.checkpoint import CheckpointMeta

    made_with_vnni = CheckpointMeta(model="resnet8", extra={"int8": {"settings": {"reduce_range": False}}})
    with pytest.warns(UserWarning, match="quantized for a CPU with VNNI"):
        warn_if_saturating(made_with_vnni, "model.onnx")
    monkeypatch.setenv("RESLAB_CPU_VNNI", "1")
    assert Int8Settings.for_this_cpu().reduce_range is False  # VNNI sums in int32: all 8 bits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_saturating(made_with_vnni, "model.onnx")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setenv("RESLAB_CPU_VNNI", "0")
    assert Int8Settings.for_this_cpu().reduce_range is False  # ARM's dot products do not saturate


def test_the_help_states_the_library_defaults(capsys):
    from reslab.inference.quantize import DEFAULT_MAX_DROP

    for command in ("predict", "export"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"calibration images (default {DEFAULT_CALIBRATION_IMAGES})" in text
    assert f"drop against fp32 (default {DEFAULT_MAX_DROP:g})" in text


def test_serve_runs_int8_calibrated_on_the_runs_data(trained, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from reslab.serve import ServeConfig, create_app

    folder, run = trained
    run = Path(shutil.copytree(run, tmp_path / "run"))
    app = create_app(run, ServeConfig(precision="int8", calibration_images=10))
    predictor = app.state.service.predictor
    assert (predictor.precision, predictor.backend) == ("int8", AUTO)
    assert sorted((run / "export").glob("*-int8.onnx"))  # built and cached before the port opens
    image = next(folder.rglob("*.png"))
    with TestClient(app) as client:
        response = client.post("/predict", files={"file": (image.name, image.read_bytes(), "image/png")})
    assert response.status_code == 200 and response.json()["predictions"][0]["class"] in CLASSES


def test_fp32_ends_keeps_the_first_conv_and_the_classifier_in_fp32(trained, tmp_path):
    import onnx

    from reslab.inference.fold import fold_batchnorm
    from reslab.inference.quantize import quantize_model
    from reslab.weights.source import load_source

    folder, run = trained
    model, meta = load_source(run)
    model = fold_batchnorm(model)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def quantized_inputs(settings) -> tuple[bool, bool]:
        graph = onnx.load(str(quantize_model(model, meta, tmp_path / f"{settings.fp32_ends}.onnx", images, settings)))
        made_by_dequantize = {o for n in graph.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        first = next(n for n in graph.graph.node if n.op_type == "Conv")
        last = next(n for n in reversed(graph.graph.node) if n.op_type in ("Gemm", "MatMul"))
        return first.input[1] in made_by_dequantize, last.input[1] in made_by_dequantize

    assert quantized_inputs(Int8Settings(reduce_range=True)) == (True, True)
    assert quantized_inputs(Int8Settings(reduce_range=True, fp32_ends=True)) == (False, False)
