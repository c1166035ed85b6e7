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
