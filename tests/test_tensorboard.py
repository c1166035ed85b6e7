"""`reslab train --log tensorboard` (issue 22, item 5): event files in the run directory, read back with
TensorBoard's own EventAccumulator, across an interruption, a resume and a killed process's leftovers."""

from __future__ import annotations

import csv
import sys

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from reslab.cli import main  # noqa: E402
from reslab.train import TrainConfig, loop, train  # noqa: E402
from reslab.train.tensorboard import event_log  # noqa: E402
from test_train import make_folder, tiny_config  # noqa: E402

# 36 images, a quarter held out: 27 to train on in batches of 4, so 7 steps an epoch; the step loss
# is written at the loop's host syncs, here every 3rd step and an epoch's last.
STEPS, SYNC_EVERY = 7, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _events(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_events_hold_the_run_once_across_a_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "SYNC_EVERY", SYNC_EVERY)
    folder = make_folder(tmp_path / "shapes")
    run_dir = tmp_path / "run"
    config = tiny_config(folder, run_dir, batch_size=4, log="tensorboard")
    first = train(config, stop=lambda epoch, step: (epoch, step) == (2, 2))  # as Ctrl-C would, mid-epoch 2
    assert first["interrupted"]
    # What a process killed after its last checkpoint leaves behind: steps the resumed run will redo.
    with SummaryWriter(str(run_dir)) as orphan:
        orphan.add_scalar("train/loss_step", 999.0, STEPS + 4)
        orphan.add_scalar("train/loss", 999.0, 2 * STEPS)
    final = train(TrainConfig(resume=str(run_dir), quiet=True))
    assert final["stopped"] == "completed"

    events = _events(run_dir)
    tags = events.Tags()
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch", "train/loss_step"} <= set(tags["scalars"])
    assert {"curves", "samples"} <= set(tags["images"])
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    for tag, column in (("train/loss", "train_loss"), ("val/acc", "val_acc"), ("lr", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [STEPS, 2 * STEPS], tag  # one value an epoch, at its last step
        assert [s.value for s in scalars] == pytest.approx([float(r[column]) for r in rows], rel=1e-5), tag
    steps = [s.step for s in events.Scalars("train/loss_step")]
    assert steps == [3, 6, 7, 9, 10, 13, 14]  # host syncs, the stop's step 2 + 7, then the resumed run's
    assert 999.0 not in [s.value for s in events.Scalars("train/loss_step")]  # the leftovers are purged
    curves = events.Images("curves")
    assert curves[-1].step == 2 * STEPS and curves[-1].encoded_image_string[:4] == b"\x89PNG"


def test_only_rank_0_writes_and_no_log_writes_nothing(tmp_path):
    with event_log("tensorboard", tmp_path, 0, is_main=False) as log:
        assert log is None
    with event_log(None, tmp_path, 0, is_main=True) as log:
        assert log is None
    assert list(tmp_path.iterdir()) == []


def test_a_missing_package_or_an_unknown_log_is_one_line(tmp_path, capsys, monkeypatch):
    folder = make_folder(tmp_path / "shapes", per_class=2)
    common = ["train", "--data", str(folder), "--model", "resnet8", "--image-size", "16", "--epochs", "1",
              "--out", str(tmp_path / "run")]
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    assert main([*common, "--log", "tensorboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'reslab[tensorboard]'" in err[0]
    assert main([*common, "--log", "wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--log must be tensorboard, got 'wandb'" in err[0]
    assert not (tmp_path / "run" / "metrics.csv").exists()
