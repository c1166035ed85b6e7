"""`reslab bench --json` emits the documented fields, measured on a tiny model in about a second."""

from __future__ import annotations

import json

import pytest

from reslab.bench import BenchConfig, peers, run_bench
from reslab.cli import main
from reslab.errors import ReslabError

DOCUMENTED = ("model", "mode", "batch_size", "image_size", "precision", "backend", "images_per_second",
              "ms_per_batch", "gflops_per_second")


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_bench_json_has_the_documented_fields(mode, capsys):
    argv = ["bench", "--model", "resnet20", "--mode", mode, "--batch-size", "4", "--image-size", "8",
            "--seconds", "0.3", "--warmup", "1", "--backend", "torch", "--threads", "1", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    for key in DOCUMENTED:
        assert key in result, key
    assert (result["model"], result["mode"], result["batch_size"], result["image_size"]) == ("resnet20", mode, 4, 8)
    assert result["backend"] == "torch" and result["precision"] in ("fp32", "bf16")
    assert result["images_per_second"] > 0 and result["steps"] >= 3
    assert result["ms_per_batch"] == pytest.approx(1000 * 4 / result["images_per_second"], rel=1e-6)
    # GFLOP/s follow from the MACs: 2 FLOPs a MAC, 3 passes' worth for a training step.
    factor = 3 if mode == "train" else 1
    assert result["flops_per_image"] % (2 * factor) == 0
    assert result["gflops_per_second"] == pytest.approx(result["images_per_second"] * result["flops_per_image"] / 1e9)
    assert "hardware" in result and "cpu_capability" in result["hardware"]


def test_compare_puts_the_textbook_loop_first_and_every_installed_backend_after():
    rows = [p.resolve() for p in peers(BenchConfig(model="resnet20", mode="infer", image_size=8))]
    assert rows[0].textbook and rows[0].precision == "fp32" and rows[0].channels_last is False
    from reslab.inference import installed_backends

    assert {r.backend for r in rows[1:]} == set(installed_backends())
    train_rows = peers(BenchConfig(mode="train"))
    assert len(train_rows) == 2 and train_rows[0].textbook


def test_textbook_train_step_runs():
    result = run_bench(BenchConfig(model="resnet20", mode="train", batch_size=4, image_size=8, seconds=0.2,
                                   warmup=1, threads=1, textbook=True))
    assert result["name"].startswith("textbook") and result["images_per_second"] > 0


def test_bench_refuses_bad_options(capsys):
    with pytest.raises(ReslabError, match="training runs on torch only"):
        BenchConfig(mode="train", backend="onnxruntime").resolve()
    assert main(["bench", "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err
    assert main(["bench", "--model", "resnet7"]) == 2


def test_bench_json_for_int8_has_the_quantization_and_the_peak(capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from reslab.inference.quantize import Int8Settings

    argv = ["bench", "--model", "resnet20", "--mode", "infer", "--batch-size", "4", "--image-size", "8",
            "--seconds", "0.3", "--warmup", "1", "--precision", "int8", "--threads", "1", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    for key in DOCUMENTED:
        assert key in result, key
    assert result["precision"] == "int8" and result["backend"] in ("onnxruntime", "openvino")
    quantization = result["quantization"]
    assert quantization["reduce_range"] == Int8Settings.for_this_cpu().reduce_range  # decided from the CPU flags
    assert [quantization[k] for k in ("per_channel", "activations", "weights")] == [True, "uint8", "int8"]
    assert quantization["calibration_data"] == "digits" and quantization["calibration_images"] > 0
    # Read against the machine's own int8 matrix-product rate on the same thread.
    assert result["peak_precision"] == "int8" and result["peak_gflops_per_second"] > 0
    assert result["peak_fraction"] == pytest.approx(result["gflops_per_second"] / result["peak_gflops_per_second"])
    assert {"cpu_int8_vnni", "cpu_flags", "cpu_bf16_native"} <= result["hardware"].keys()


@pytest.mark.parametrize(("bf16", "int8"), [(False, True), (True, False), (False, False)])
def test_compare_rows_follow_the_hardware(monkeypatch, bf16, int8):
    """bf16 rows where the CPU multiplies bf16 natively, int8 rows where it has int8 dot products."""
    import reslab.inference.quantize as quantize
    from reslab.inference import INT8_PREFERENCE, installed_backends

    monkeypatch.setenv("RESLAB_CPU_BF16", "1" if bf16 else "0")
    monkeypatch.setattr(quantize, "int8_is_fast", lambda: int8)
    rows = [p.resolve() for p in peers(BenchConfig(model="resnet20", mode="infer", image_size=8, precision="fp32"))]
    assert rows[0].textbook and len(rows) == len(set(map(str, rows)))
    ran = {(r.backend, r.precision) for r in rows[1:]}
    installed = installed_backends()
    assert {b for b, p in ran if p == "fp32"} == set(installed)  # every backend, always, in fp32
    bf16_rows = {(b, "bf16") for b in ("torch", "openvino") if b in installed}
    int8_rows = {(b, "int8") for b in INT8_PREFERENCE if b in installed}
    assert (bf16_rows <= ran) if bf16 else not {r for r in ran if r[1] == "bf16"}
    assert (int8_rows <= ran) if int8 else not {r for r in ran if r[1] == "int8"}
