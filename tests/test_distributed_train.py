"""`reslab train` on 2 CPU processes (gloo, 127.0.0.1) against 1, end to end.

Tiny data written here: 32 images of 8x8 in 2 classes, global batch 8 (4 per rank), so every
step's batch splits evenly and nothing is padded. With --sync-bn and no augmentation the 2-process
run must end on the single-process run's weights.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reslab.checkpoint import read_weights
from reslab.train import TrainConfig, train
from reslab.train.distributed import CRASH_ENV, CRASH_STEP_ENV, TIMEOUT_ENV

pytestmark = pytest.mark.slow

TIMEOUT = 60  # seconds a collective may wait in these runs
# lr 0.01: at 0.05 this tiny net (BatchNorm over 2x2 maps of 4 images) trains chaotically and float
# rounding, which differs between 1 and 2 processes, grows to 1e-2 within 8 steps; at 0.01 it stays ~1e-6.
COMMON = ["--model", "resnet20", "--batch-size", "8", "--image-size", "8", "--val-split", "0", "--augment", "none",
          "--schedule", "constant", "--lr", "0.01", "--quiet"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp") / "images"
    rng = np.random.default_rng(0)
    for c, name in enumerate(("dark", "light")):
        (root / name).mkdir(parents=True)
        for i in range(16):
            pixels = rng.integers(0, 128, (8, 8, 3)) + 127 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"RESLAB_DATA": str(tmp_path / "cache"), TIMEOUT_ENV: str(TIMEOUT), **extra})
    return env


def _single(folder: Path, out: Path, epochs: int) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(model="resnet20", data=str(folder), epochs=epochs, batch_size=8, image_size=8, val_split=0.0,
                      augment="none", schedule="constant", lr=0.01, quiet=True, out=str(out),
                      data_dir=str(out.parent / "cache"))
    summary = train(cfg)
    assert summary["stopped"] == "completed"
    return read_weights(out / "last.safetensors")[0]


def _assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    worst = max((got[k].double() - expected[k].double()).abs().max().item() for k in expected)
    assert worst < 1e-5, f"largest weight difference {worst:.3g}"


def test_two_processes_train_as_one_and_write_one_run(folder, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-m", "reslab", "train", "--data", str(folder), "--epochs", "2", "--nproc", "2",
           "--sync-bn", *COMMON]
    done = subprocess.run(cmd, cwd=work, env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run in runs" in done.stdout  # rank 0's summary line comes back through the launcher
    runs = [p for p in work.rglob("*") if p.is_dir()]
    assert len(runs) == 2 and runs[0] == work / "runs", runs  # runs/ and exactly one run inside
    run = runs[1]
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert len((run / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs, each written once
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    _assert_same_weights(read_weights(run / "last.safetensors")[0], _single(folder, tmp_path / "single", 2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_crash_on_rank_1_ends_both_processes_and_the_run_resumes_on_one(folder, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "reslab", "train", "--data", str(folder), "--epochs", "2", "--out", str(run), "--sync-bn", *COMMON]
    # Rank 1 crashes on the first step of epoch 2 (4 steps an epoch), after epoch 1's checkpoint.
    env = _env(tmp_path, **{CRASH_ENV: "1", CRASH_STEP_ENV: "5", TIMEOUT_ENV: "150"})
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert "crash injected on rank 1 at step 5" in done.stderr
    # torchrun returns once every worker has ended; rank 0 ended on the crash, not on the timeout.
    assert elapsed < 150 and "waited more than" not in done.stderr, (elapsed, done.stderr[-2000:])
    assert not (run / "summary.json").exists() or json.loads((run / "summary.json").read_text())["epochs"] == 1
    assert len((run / "metrics.csv").read_text().splitlines()) == 2

    # What the 2 processes wrote at epoch 1 is the single process's epoch 1; resumed on 1 process,
    # the run ends where the single process does.
    _assert_same_weights(read_weights(run / "last.safetensors")[0], _single(folder, tmp_path / "single1", 1))
    summary = train(TrainConfig(resume=str(run), quiet=True))
    assert summary["stopped"] == "completed" and summary["epochs"] == 2
    _assert_same_weights(read_weights(run / "last.safetensors")[0], _single(folder, tmp_path / "single2", 2))
