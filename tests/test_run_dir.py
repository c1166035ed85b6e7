"""Run-directory faults (issue 12, item 5): each is one line on stderr, exit 2, and nothing already
written is lost. Two trainings on one folder, a run killed before its first checkpoint, temporary
files of interrupted writes, and an --out that cannot be written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from reslab.cli import main
from reslab.errors import ReslabError
from reslab.train import train
from reslab.train.state import LOCK, RunLock, unwritable
from test_train import make_folder, tiny_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "shapes", per_class=6)


def _args(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "resnet8", "--data", str(folder), "--image-size", "16", "--batch-size", "6",
            "--epochs", "1", "--val-split", "0.25", "--quiet", "--data-dir", str(folder.parent / "cache"),
            "--out", str(out), *extra]


def _fails(capsys, argv: list[str], match: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def test_a_second_training_on_a_folder_in_use_is_refused(folder, tmp_path, capsys):
    run = tmp_path / "run"
    refusals = []

    def while_training(epoch: int, step: int) -> bool:
        # Rank 0 holds the lock for the whole run: a second start or a resume meanwhile is refused.
        if step == 1:
            before = _files(run)
            refusals.append(_fails(capsys, _args(folder, run), f"--out {run} is in use by another training "
                                   f"(process {os.getpid()})"))
            refusals.append(_fails(capsys, ["train", "--resume", str(run), "--quiet"], "is in use"))
            assert _files(run) == before, "a refused training touched the running one's files"
        return False

    summary = train(tiny_config(folder, run, epochs=1, batch_size=6), stop=while_training)
    assert len(refusals) == 2 and summary["stopped"] == "completed"
    assert not (run / LOCK).exists()


def test_a_lock_file_nobody_holds_does_not_block(folder, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text("999999999")  # left by a killed run: the kernel released its flock
    assert main(_args(folder, run)) == 0
    assert (run / "last.state.pt").is_file() and not (run / LOCK).exists()


def test_resume_and_reuse_of_a_run_killed_before_its_first_checkpoint(folder, tmp_path, capsys):
    def crash(epoch: int, step: int) -> bool:
        raise RuntimeError("killed")

    whole = tmp_path / "whole"
    assert main(_args(folder, whole)) == 0
    early = tmp_path / "early"
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_config(folder, early, epochs=1, batch_size=6), stop=crash)
    assert sorted(os.listdir(early)) == ["config.json"]  # no state, no metrics: nothing trained is lost

    # --resume starts it from step 1 with its saved config, and ends where an uninterrupted run does.
    assert main(["train", "--resume", str(early), "--quiet"]) == 0, capsys.readouterr().err
    a, b = load_file(whole / "last.safetensors"), load_file(early / "last.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    # A new run may take such a folder over as well.
    again = tmp_path / "again"
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_config(folder, again, epochs=1, batch_size=6), stop=crash)
    assert main(_args(folder, again)) == 0, capsys.readouterr().err
    assert (again / "metrics.csv").read_text().count("\n") == 2


def test_messages_say_what_the_folder_holds(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(folder, run)) == 0
    before = _files(run)
    _fails(capsys, _args(folder, run),
           f"--out {run} already holds a run (last.state.pt, metrics.csv, last.safetensors, best.safetensors)")
    assert _files(run) == before

    # Epochs recorded but their state gone: a restart would overwrite them, so it is refused.
    (run / "last.state.pt").unlink()
    before = _files(run)
    _fails(capsys, ["train", "--resume", str(run)], "holds metrics.csv but no last.state.pt")
    # And a folder without config.json says what it does hold.
    (run / "config.json").unlink()
    _fails(capsys, ["train", "--resume", str(run)], "holds no run (no config.json; it holds metrics.csv")
    assert _files(run) == {k: v for k, v in before.items() if k != "config.json"}
    _fails(capsys, ["train", "--resume", str(tmp_path / "absent")], "no such run directory")
    assert not (tmp_path / "absent").exists()


def test_temporary_files_of_interrupted_writes_are_removed_on_start_and_resume(folder, tmp_path):
    run = tmp_path / "run"
    stopped = train(tiny_config(folder, run, epochs=2, batch_size=6), stop=lambda epoch, step: epoch == 2)
    assert stopped["interrupted"]
    # What io.atomic_path leaves when killed mid-write, and look-alikes that are not its own.
    partial = [".last.state.pt.k3j_x9a2.tmp", ".metrics.csv.0abcdefg.tmp"]
    others = [".notes.tmp", "keep.tmp", ".plan.tmp.txt"]
    for name in partial + others:
        (run / name).write_text("x")
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert not any((run / name).exists() for name in partial)
    assert all((run / name).exists() for name in others)

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / partial[0]).write_text("x")
    assert main(_args(folder, fresh)) == 0
    assert not (fresh / partial[0]).exists()


def test_out_that_cannot_be_written(folder, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _fails(capsys, _args(folder, blocker / "run"), f"--out {blocker / 'run'}: {blocker} is a file, not a folder")
    _fails(capsys, _args(folder, blocker / "deeper" / "run"), f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "not a folder"
    # A refused run leaves no folder it made: the missing parents of --out included.
    _fails(capsys, _args(tmp_path / "missing-data", tmp_path / "new" / "run"), "missing-data")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; see the unit test below")
def test_out_in_a_read_only_folder(folder, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _fails(capsys, _args(folder, locked / "run"), f"cannot write in {locked} (Permission denied)")
    finally:
        locked.chmod(0o700)


def test_os_errors_become_one_line_naming_the_folder(tmp_path):
    target = tmp_path / "runs" / "run"
    denied = unwritable("--out", target, PermissionError(13, "Permission denied", str(tmp_path / "runs")))
    assert isinstance(denied, ReslabError)
    assert str(denied) == (f"--out {target}: cannot write in {tmp_path} (Permission denied); "
                           "choose a folder you can write")
    blocker = tmp_path / "f"
    blocker.write_text("")
    assert f"{blocker} is a file, not a folder" in str(unwritable("--out", blocker / "x", NotADirectoryError(20, "x")))
    # The lock itself translates its OSErrors the same way, and leaves no folder it made.
    with pytest.raises(ReslabError, match="is a file, not a folder"):
        RunLock(blocker / "run", "--out")


def test_a_folder_whose_lock_cannot_be_written(tmp_path, monkeypatch):
    # What a read-only folder does to a user who is not root: the lock file is the first write.
    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ReslabError) as refused:
        RunLock(tmp_path / "new" / "run", "--out")
    assert str(refused.value) == (f"--out {tmp_path / 'new' / 'run'}: cannot write in {tmp_path / 'new' / 'run'} "
                                  "(Permission denied); choose a folder you can write")
    assert not (tmp_path / "new").exists()
    (tmp_path / "run").mkdir()
    with pytest.raises(ReslabError, match="copy the run to a folder you can write"):
        RunLock(tmp_path / "run", "--resume")
    assert (tmp_path / "run").is_dir()  # not made by the lock, so not removed
