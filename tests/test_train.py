"""Training: the run directory's files, exact resume, Ctrl-C, kill -9, NaN, schedules and config."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from reslab.checkpoint import load_model
from reslab.errors import ReslabError
from reslab.train import TrainConfig, train
from reslab.train.schedule import lr_multiplier
from reslab.train.state import METRIC_COLUMNS, load_state

CLASSES = ("circle", "square", "stripes")


def make_folder(root: Path, per_class: int = 12, size: int = 16, seed: int = 0, gray: bool = False) -> Path:
    """3 easily told-apart classes of small noisy RGB images (or, with `gray`, one-channel images as
    MNIST's), as PNG files in class subfolders."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    shapes = {
        "circle": (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2,
        "square": (abs(yy - size / 2) < size / 4) & (abs(xx - size / 2) < size / 4),
        "stripes": (xx // 2) % 2 == 0,
    }
    for c, mask in shapes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3))
            pixels[mask] += 150 + rng.integers(0, 40)
            image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
            (image.convert("L") if gray else image).save(root / c / f"{i}.png")
    return root


def tiny_config(folder: Path, out: Path, **overrides) -> TrainConfig:
    options = dict(model="resnet8", data=str(folder), data_dir=str(folder.parent / "cache"), image_size=16,
                   epochs=2, batch_size=8, val_split=0.25, out=str(out), quiet=True)
    options.update(overrides)
    return TrainConfig(**options)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "shapes")


def test_steps_csv_holds_the_training_error_within_epochs(folder, tmp_path, monkeypatch):
    from reslab.train import loop
    from reslab.train.state import read_metrics

    # 27 training images in batches of 8, 8, 8 and 3: with a row every 2 steps, two windows an epoch.
    monkeypatch.setattr(loop, "SYNC_EVERY", 1)
    monkeypatch.setattr(loop, "POINTS_PER_EPOCH", 2)
    run = tmp_path / "run"
    train(tiny_config(folder, run))
    steps, epochs = read_metrics(run / "steps.csv"), read_metrics(run / "metrics.csv")
    assert [(s["step"], s["epoch"]) for s in steps] == [(2, 0.5), (4, 1.0), (6, 1.5), (8, 2.0)]
    for epoch, (a, b) in zip(epochs, [steps[0:2], steps[2:4]], strict=True):  # the windows make up the epoch
        assert (16 * a["train_acc"] + 11 * b["train_acc"]) / 27 == pytest.approx(epoch["train_acc"], abs=1e-5)
        assert (16 * a["train_loss"] + 11 * b["train_loss"]) / 27 == pytest.approx(epoch["train_loss"], rel=1e-4)


def test_short_run_writes_every_file_consistently(folder, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_config(folder, run))
    for name in ("config.json", "metrics.csv", "summary.json", "best.safetensors", "last.safetensors",
                 "last.state.pt", "curves.png", "steps.csv"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*.tmp")), "temporary files left behind"
    assert not (run / ".lock").exists(), "the run's lock outlived it"

    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == METRIC_COLUMNS
    assert [int(r[0]) for r in rows[1:]] == [1, 2]
    last = dict(zip(rows[0], rows[1:][-1]))
    assert 0.0 <= float(last["val_acc"]) <= 1.0 and 0.0 <= float(last["train_acc"]) <= 1.0

    saved = json.loads((run / "summary.json").read_text())
    assert saved == summary and saved["run_dir"] == str(run)
    assert saved["epochs"] == 2 and saved["test_acc"] is None  # a class-subfolder folder has no test split
    assert saved["final_val_acc"] == pytest.approx(float(last["val_acc"]), abs=1e-6)
    assert saved["best_val_acc"] >= saved["final_val_acc"]
    assert saved["images_per_second"] > 0

    config = json.loads((run / "config.json").read_text())
    from reslab.data.folder import PHOTO_DEFAULTS

    # The recipe resolved, with the photo-folder lr (a folder of colour images trained from scratch;
    # small gray ones take the recipe's own: reslab.data.folder.photo_choice).
    assert config["config"]["lr"] == PHOTO_DEFAULTS["lr"] and config["config"]["schedule"] == "onecycle"
    assert config["precision"] == "fp32" or config["hardware"]["cpu_bf16_native"]
    assert config["classes"] == list(CLASSES) and config["data"]["sizes"]["val"] == 9
    assert "hardware" in config

    model, meta = load_model(run / "last.safetensors")
    assert meta.classes == list(CLASSES) and meta.extra["epoch"] == 2 and meta.model == "resnet8"
    best, best_meta = load_model(run)
    assert best_meta.extra["epoch"] == saved["best_epoch"]
    state = load_state(run)
    assert state["epoch"] == 2 and state["step_in_epoch"] == 0 and len(state["rows"]) == 2
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupt_and_resume_gives_identical_weights(folder, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(tiny_config(folder, whole))
    # Stop mid-epoch 1 (step 2 of 4), as Ctrl-C would, then resume from the directory alone.
    first = train(tiny_config(folder, parts), stop=lambda epoch, step: (epoch, step) == (1, 2))
    assert first["interrupted"] and first["epochs"] == 0
    assert load_state(parts)["step_in_epoch"] == 2
    final = train(TrainConfig(resume=str(parts), quiet=True))
    assert final["stopped"] == "completed" and final["epochs"] == 2

    a, b = load_file(whole / "last.safetensors"), load_file(parts / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
    rows_a = (whole / "metrics.csv").read_text().splitlines()
    rows_b = (parts / "metrics.csv").read_text().splitlines()
    assert len(rows_b) == 3  # header + 2 epochs: no duplicated row
    assert [r.rsplit(",", 1)[0] for r in rows_a] == [r.rsplit(",", 1)[0] for r in rows_b]  # all but seconds


def test_resume_refuses_other_settings_and_missing_runs(folder, tmp_path):
    from reslab.cli import build_parser
    from reslab.cli.train import config_from_args

    args = build_parser().parse_args(["train", "--resume", str(tmp_path), "--lr", "0.5"])
    with pytest.raises(ReslabError, match="--lr"):
        config_from_args(args)
    with pytest.raises(ReslabError, match="holds no run"):
        train(TrainConfig(resume=str(tmp_path)))


def test_nan_loss_stops_naming_epoch_and_step(folder, tmp_path):
    with pytest.raises(ReslabError, match=r"epoch 1, step \d+.*lower the lr"):
        train(tiny_config(folder, tmp_path / "run", lr=1e30, schedule="constant", label_smoothing=0.0))


def _cli(folder: Path, out: Path, epochs: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "reslab", "train", "--model", "resnet8", "--data", str(folder), "--image-size",
           "16", "--batch-size", "4", "--epochs", str(epochs), "--val-split", "0.25", "--out", str(out),
           "--data-dir", str(folder.parent / "cache"), "--quiet"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_kill_9_leaves_a_loadable_checkpoint(folder, tmp_path):
    run = tmp_path / "run"
    proc = _cli(folder, run, epochs=200)
    try:
        _wait_for(run / "curves.png", proc)  # the last file of epoch 1: from now on every file exists
        time.sleep(random.uniform(0.0, 1.0))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    model, meta = load_model(run / "last.safetensors")
    state = load_state(run)
    assert meta.classes == list(CLASSES) and state["epoch"] >= 1
    assert (run / ".lock").is_file()  # the killed run's lock file stays, but nothing holds it any more
    with open(run / "metrics.csv") as f:
        assert next(csv.reader(f)) == list(METRIC_COLUMNS)
    final = train(TrainConfig(resume=str(run), epochs=state["epoch"] + 1, quiet=True))
    assert final["epochs"] == state["epoch"] + 1


def test_ctrl_c_checkpoints_and_says_how_to_resume(folder, tmp_path):
    run = tmp_path / "run"
    proc = _cli(folder, run, epochs=200)
    _wait_for(run / "last.state.pt", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"--resume {run}" in err and "Traceback" not in err
    state = load_state(run)
    assert state["stopped"] == "interrupted"
    load_model(run / "last.safetensors")


def test_schedules_are_pure_functions_of_the_step():
    # Paper section 4.2: lr/10 at 32k and 48k of 64k iterations.
    assert [lr_multiplier("step", s, 64000) for s in (0, 31999, 32000, 47999, 48000, 63999)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    cycle = [lr_multiplier("onecycle", s, 100, 25) for s in range(100)]
    assert cycle[0] == pytest.approx(1 / 25) and max(cycle) == pytest.approx(1.0) and cycle[25] == 1.0
    assert cycle[-1] < 0.02
    cosine = [lr_multiplier("cosine", s, 100, 10) for s in range(100)]
    assert cosine[0] == pytest.approx(0.1) and cosine[10] == pytest.approx(1.0) and cosine[-1] < 0.01


def test_config_recipes_and_refusals():
    paper = TrainConfig(recipe="paper").resolve()
    assert (paper.lr, paper.momentum, paper.weight_decay, paper.batch_size, paper.schedule) == (
        0.1, 0.9, 1e-4, 128, "step")
    assert paper.label_smoothing == 0 and not paper.no_decay_norm_bias
    fast = TrainConfig(optimizer="adamw").resolve()
    assert fast.lr == 3e-3 and fast.label_smoothing == 0.1 and fast.no_decay_norm_bias
    assert TrainConfig(lr=0.05, recipe="paper").resolve().lr == 0.05  # explicit values win
    assert TrainConfig.from_dict(fast.to_dict()) == fast
    for bad, match in ((dict(recipe="slow"), "unknown recipe 'slow'"), (dict(epochs=0), "--epochs"),
                       (dict(batch_size=0), "--batch-size"), (dict(optimizer="rmsprop"), "rmsprop"),
                       (dict(optimizer="adam", nesterov=True), "Nesterov"), (dict(freeze="layer2"), "--pretrained")):
        with pytest.raises(ReslabError, match=match):
            TrainConfig(**bad).resolve()
    with pytest.raises(ReslabError, match="unknown training option"):
        TrainConfig.from_dict({"model": "resnet20", "lr_decay": 0.1})


def test_default_recipe_and_run_dir_name(monkeypatch, tmp_path):
    from reslab.train.state import claim_run_dir, new_run_dir, safe_name

    monkeypatch.chdir(tmp_path)
    assert safe_name("/data/cats vs dogs/") == "cats_vs_dogs"
    path = new_run_dir(None, "resnet20", "digits")
    assert path.parent == Path("runs") and path.name.startswith("resnet20-digits-")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metrics.csv").write_text("epoch\n")
    with pytest.raises(ReslabError, match=r"already holds a run \(metrics.csv\)"):
        claim_run_dir(str(tmp_path / "taken"), "resnet20", "digits")
    assert os.listdir(tmp_path / "taken") == ["metrics.csv"]
