"""`reslab bench --json` emits the documented fields, measured on a tiny model in about a second."""

from __future__ import annotations

import dataclasses
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
    expected = Int8Settings.for_this_cpu()  # decided from the CPU flags: per tensor where reduce_range is on
    assert (quantization["reduce_range"], quantization["per_channel"]) == (expected.reduce_range, expected.per_channel)
    assert [quantization[k] for k in ("activations", "weights")] == ["uint8", "int8"]
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


def test_compare_has_openvinos_plain_compile_at_each_of_its_float_precisions(monkeypatch):
    from reslab.inference import installed_backends

    if "openvino" not in installed_backends():
        pytest.skip("openvino not installed")
    for bf16 in (False, True):
        monkeypatch.setenv("RESLAB_CPU_BF16", "1" if bf16 else "0")
        rows = [p.resolve() for p in peers(BenchConfig(model="resnet20", mode="infer", image_size=8))]
        plain = [r for r in rows if r.plain_openvino]
        assert sorted(r.precision for r in plain) == (["bf16", "fp32"] if bf16 else ["fp32"])
        assert all(r.backend == "openvino" and not r.textbook for r in plain)
        # reslab's own OpenVINO row at the same precision is there to read against it
        assert {r.precision for r in plain} <= {r.precision for r in rows
                                                if r.backend == "openvino" and not r.plain_openvino}


@pytest.mark.parametrize("batch_size", [1, 6])
def test_plain_openvino_peer_agrees_with_torch_and_states_its_hint(batch_size):
    pytest.importorskip("openvino")
    import torch

    from reslab.bench import _model, plain_openvino_step

    cfg = BenchConfig(model="resnet20", mode="infer", batch_size=batch_size, image_size=32, precision="fp32",
                      threads=2, plain_openvino=True).resolve()
    model = _model(cfg).eval()
    x = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    step, settings = plain_openvino_step(cfg, model, x)
    with torch.no_grad():
        expected = model(x)
    got = torch.as_tensor(step())
    assert got.shape == expected.shape and (got - expected).abs().max() < 1e-4
    assert settings["openvino_hint"] == ("LATENCY" if batch_size == 1 else "THROUGHPUT")
    assert settings["openvino_inference_precision"] == "f32" and not settings["bn_folded"]


def test_bench_json_names_the_plain_peer_and_reslabs_openvino_settings():
    pytest.importorskip("openvino")
    base = BenchConfig(model="resnet20", mode="infer", batch_size=4, image_size=8, precision="fp32",
                       backend="openvino", seconds=0.2, warmup=1, threads=2)
    plain = run_bench(dataclasses.replace(base, plain_openvino=True))
    assert (plain["name"], plain["backend"]) == ("openvino-plain fp32", "openvino-plain")
    for batch_size, hint in [(4, "THROUGHPUT"), (1, "LATENCY")]:
        result = run_bench(dataclasses.replace(base, batch_size=batch_size))
        assert result["backend"] == "openvino" and result["openvino_hint"] == hint


def test_plain_openvino_peer_refuses_what_it_is_not():
    with pytest.raises(ReslabError, match="plain OpenVINO peer"):
        BenchConfig(mode="infer", precision="int8", plain_openvino=True).resolve()
