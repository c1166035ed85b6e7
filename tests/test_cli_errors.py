"""Every bad input of issue 4 gets one line on stderr, a non-zero exit, no traceback, nothing damaged."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from reslab.checkpoint import CheckpointMeta, save_weights
from reslab.cli import main
from reslab.models import create_model
from reslab.train import train
from test_train import make_folder, tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder = make_folder(root / "shapes", per_class=6)
    run = root / "run"
    train(tiny_config(folder, run, epochs=1, batch_size=6))
    return root, folder, run


def _fails(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


def test_bad_training_input(setup, capsys, tmp_path):
    root, folder, run = setup
    common = ["train", "--model", "resnet8", "--image-size", "8", "--quiet", "--data-dir", str(root / "cache")]
    out = tmp_path / "out"
    _fails(capsys, [*common, "--data", str(tmp_path / "missing"), "--out", str(out)], "missing")
    _fails(capsys, [*common, "--data", str(folder), "--recipe", "slow", "--out", str(out)], "unknown recipe 'slow'")
    _fails(capsys, [*common, "--data", str(folder), "--epochs", "0", "--out", str(out)], "--epochs")
    _fails(capsys, [*common, "--data", str(folder), "--batch-size", "0", "--out", str(out)], "--batch-size")
    _fails(capsys, [*common, "--data", str(folder), "--batch-size", "1000", "--out", str(out)],
           "larger than the training set")
    assert not out.exists(), "a refused run must not leave a run directory"
    _fails(capsys, ["train", "--resume", str(tmp_path)], "holds no run")


def test_refused_resume_and_reused_out_leave_the_run_intact(setup, capsys):
    _, folder, run = setup
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    _fails(capsys, ["train", "--model", "resnet8", "--data", str(folder), "--out", str(run)], "already holds a run")
    _fails(capsys, ["train", "--resume", str(run), "--lr", "1"], "--lr")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_bad_checkpoints(setup, capsys, tmp_path):
    root, folder, run = setup
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00not a checkpoint at all")
    _fails(capsys, ["evaluate", str(junk)], "junk.safetensors")
    _fails(capsys, ["predict", str(junk), str(next(folder.rglob("*.png")))], "junk.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": create_model("resnet8").fc.weight.detach().contiguous()}, str(foreign))
    _fails(capsys, ["evaluate", str(foreign)], "not a reslab checkpoint")
    _fails(capsys, ["evaluate", str(tmp_path)], "holds no run")
    _fails(capsys, ["evaluate", str(tmp_path / "nothing")], "no run directory or weights file")

    # Weights of another architecture under resnet8's name.
    meta = CheckpointMeta(model="resnet8", model_options={"in_channels": 3}, classes=["a", "b", "c"],
                          extra={"data": str(folder)})
    lying = tmp_path / "lying.safetensors"
    save_weights(lying, create_model("resnet14", num_classes=3), meta)
    _fails(capsys, ["evaluate", str(lying), "--out", str(tmp_path / "o")], "does not match")

    # Another class count than the data's.
    meta.classes = ["a", "b"]
    two = tmp_path / "two.safetensors"
    save_weights(two, create_model("resnet8", num_classes=2), meta)
    _fails(capsys, ["evaluate", str(two), "--out", str(tmp_path / "o")], "2 classes")
    assert not (tmp_path / "o").exists()
    _fails(capsys, ["predict", str(run), str(tmp_path / "no.png")], "no.png")
