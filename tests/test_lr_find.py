"""The learning-rate range test (issue 22): the rule, divergence, copies, `reslab lr-find`,
`reslab train --lr-find` and its record, the refusals, the finetune recipe's groups."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch

from reslab.cli import main
from reslab.errors import ReslabError
from reslab.train import TrainConfig, lr_find, train
from reslab.train import state as run_files
from reslab.train.distributed import DistContext
from reslab.train.loop import _setup
from reslab.train.lr_find import find_lr, suggest, sweep
from reslab.train.steps import build_optimizer, make_step
from test_train import make_folder, tiny_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data") / "shapes", per_class=8)


def valley_loss(lr: float) -> float:
    """A range test's textbook curve: flat up to 1e-4, falling to its lowest at 1, then exploding."""
    x = math.log10(lr)
    if x < -4:
        return 2.3
    if x < 0:
        return 2.3 - 0.45 * (x + 4)
    return 0.5 * 10 ** (4 * x)


def test_the_minimum_rule_is_the_lowest_smoothed_loss():
    found = sweep(valley_loss)
    assert found.rule == "minimum" and found.suggestion == found.suggestions["minimum"]
    lowest = min(range(found.steps), key=found.losses.__getitem__)
    assert found.suggestion == found.lrs[lowest]
    # The raw curve is lowest at lr 1; the smoothed one a little later, before the loss has tripled.
    assert 0.5 < found.suggestion < 3.0, found.suggestion
    assert found.suggestions["valley"] < found.suggestion / 10  # fastai's valley: far down the descent
    # The first tenth of the steps is left out: a single low first batch is not "the minimum".
    noisy = sweep(lambda lr: 0.6 if lr == 1e-7 else valley_loss(lr))
    assert min(noisy.losses) == noisy.losses[0]
    assert noisy.suggestion == found.suggestion
    with pytest.raises(ReslabError, match="unknown lr finder rule 'steep'"):
        sweep(valley_loss, rule="steep")


def test_the_valley_lies_inside_the_descent():
    found = sweep(valley_loss, rule="valley")
    assert found.rule == "valley" and found.suggestion == found.suggestions["valley"]
    assert found.start_lr <= found.suggestion <= found.end_lr
    assert found.suggestion in found.lrs
    # The smoothing lags by a few steps, so the valley ends a little after lr 1; its middle is on the descent.
    assert 1e-3 < found.suggestion < 1.0, found.suggestion
    lrs = [1e-7 * 10 ** (i / 10) for i in range(81)]
    losses = [valley_loss(lr) for lr in lrs]
    assert 1e-3 < suggest(lrs, losses, 81, "valley")[0] < 1e-1  # the exact curve: half way down
    assert suggest(lrs, losses, 81, "minimum") == (1.0, "minimum")


def test_divergence_stops_early():
    found = sweep(valley_loss, steps=100)
    assert found.stopped == "diverged" and found.steps < 100
    assert found.losses[-1] > 4 * min(found.losses) and found.lrs[-1] < 10
    nan = sweep(lambda lr: valley_loss(lr) if lr < 1e-2 else math.nan)
    assert nan.stopped == "not finite" and nan.lrs[-1] < 1e-2 and nan.rule == "minimum"
    early = sweep(lambda lr: 1.0 if lr < 2e-7 else 100.0)  # diverged at once: too short a curve for a valley
    assert early.steps == 5 and early.rule == "minimum/10" and early.suggestion < 2e-8
    with pytest.raises(ReslabError, match="first step"):
        sweep(lambda lr: math.inf)


def test_the_runs_model_optimizer_and_rng_are_untouched(folder, tmp_path):
    cfg = tiny_config(folder, tmp_path / "run").resolve()
    run = _setup(cfg, DistContext(), tmp_path / "run", None)
    x, y = next(iter(run.loader))
    run.step(x, y)  # momentum buffers in the optimizer's state
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    optimizer = run.optimizer.state_dict()
    momentum = {k: v["momentum_buffer"].clone() for k, v in optimizer["state"].items()}
    groups = [(g["lr"], g["base_lr"]) for g in run.optimizer.param_groups]
    rng = torch.get_rng_state()

    found = find_lr(run, make_step, steps=30)

    assert found.steps >= 20 and max(found.raw_losses) > min(found.raw_losses)  # it trained something
    assert all(torch.equal(weights[k], v) for k, v in run.model.state_dict().items())
    after = run.optimizer.state_dict()["state"]
    assert all(torch.equal(momentum[k], after[k]["momentum_buffer"]) for k in momentum)
    assert [(g["lr"], g["base_lr"]) for g in run.optimizer.param_groups] == groups
    assert torch.equal(torch.get_rng_state(), rng)


def _cli_args(folder, out, *extra):
    return ["lr-find", "--data", str(folder), "--data-dir", str(folder.parent / "cache"), "--model", "resnet8",
            "--image-size", "16", "--batch-size", "8", "--val-split", "0.25", "--quiet", "--out", str(out), *extra]


def test_cli_prints_the_suggestion_and_writes_the_plot_and_json(folder, tmp_path, capsys):
    out = tmp_path / "finder"
    assert main(_cli_args(folder, out, "--steps", "40", "--end-lr", "100")) == 0
    printed = capsys.readouterr().out
    match = re.match(r"suggested lr (\S+) \((minimum|minimum/10)\)", printed)
    assert match, printed
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved["rule"] == match.group(2) and float(match.group(1)) == pytest.approx(saved["suggestion"], rel=1e-3)
    assert saved["planned_steps"] == 40 and len(saved["lrs"]) == len(saved["losses"]) <= 40
    assert saved["lrs"][0] == pytest.approx(1e-7) and saved["lrs"][0] <= saved["suggestion"] <= saved["lrs"][-1]
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "config.json").exists()  # a test of the run, not a run

    assert set(saved["suggestions"]) == {"minimum", "valley"}

    assert main(_cli_args(folder, tmp_path / "valley", "--steps", "40", "--rule", "valley")) == 0
    printed = capsys.readouterr().out
    assert re.match(r"suggested lr \S+ \((valley|minimum/10)\)", printed), printed
    assert main(_cli_args(folder, tmp_path / "x", "--rule", "steep")) == 2
    assert "unknown lr finder rule 'steep'" in capsys.readouterr().err
    assert main(_cli_args(folder, tmp_path / "x", "--epochs", "3")) == 2
    assert "--epochs is a training option that lr-find does not take" in capsys.readouterr().err


@pytest.fixture
def short_tests(monkeypatch):
    monkeypatch.setattr(lr_find, "STEPS", 30)  # what `train --lr-find` runs; 100 in earnest


def test_train_lr_find_trains_at_the_suggestion_and_records_it(folder, tmp_path, short_tests):
    run = tmp_path / "run"
    recipe_lr = TrainConfig(model="resnet8", data=str(folder)).resolve().lr
    summary = train(tiny_config(folder, run, lr_find=True, schedule="constant", warmup_epochs=0))
    record = json.loads((run / "config.json").read_text())
    found = record["lr_find"]
    assert found["rule"] in ("minimum", "minimum/10") and found["steps"] <= 30 and found["recipe_lr"] == recipe_lr
    assert found["lr"] == found["suggested_lr"] == record["config"]["lr"] != recipe_lr
    assert record["config"]["lr_find"] is True
    assert list(record).index("lr_find") > list(record).index("config")
    assert (run / "lr_find.png").is_file() and (run / "lr_find.json").is_file()
    with open(run / "metrics.csv", newline="") as f:
        lrs = [float(row["lr"]) for row in csv.DictReader(f)]
    # constant schedule: the lr it trained at (metrics.csv keeps 6 significant digits)
    assert lrs == pytest.approx([found["lr"]] * summary["epochs"], rel=1e-5)

    # Resumed with more epochs: the same lr, the record kept, no second test.
    (run / "lr_find.json").unlink()
    train(TrainConfig(resume=str(run), epochs=3, quiet=True))
    again = json.loads((run / "config.json").read_text())
    assert again["lr_find"] == found and again["config"]["lr"] == found["lr"]
    assert not (run / "lr_find.json").exists()


def test_lr_find_is_refused_with_resume_and_with_an_explicit_lr(folder, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(folder, run, epochs=1))
    assert main(["train", "--resume", str(run), "--lr-find"]) == 2
    err = capsys.readouterr().err
    assert "--lr-find chooses the lr of a new run" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ReslabError, match="--lr-find chooses the lr of a new run"):
        train(TrainConfig(resume=str(run), lr_find=True))
    with pytest.raises(ReslabError, match="--lr 0.1 cannot come with it"):
        train(tiny_config(folder, tmp_path / "other", lr_find=True, lr=0.1))
    assert main(["train", "--data", str(folder), "--lr-find", "--lr", "0.1", "--out", str(tmp_path / "o")]) == 2
    assert "--lr-find chooses the lr itself" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_finetune_group_lrs_scale_together(folder, tmp_path, short_tests):
    source = tmp_path / "source"
    train(tiny_config(folder, source, epochs=1))
    run = tmp_path / "finetune"
    options = dict(pretrained=str(source), recipe="finetune", epochs=2, lr_find=True)
    train(tiny_config(folder, run, **options))
    found = json.loads((run / "config.json").read_text())["lr_find"]
    recipe = TrainConfig(model="resnet8", pretrained="x", recipe="finetune").resolve()
    assert found["recipe_lr"] == recipe.lr != found["lr"]

    # The groups of the trained optimizer: the recipe's (head 5x, each earlier stage half the next),
    # every one scaled by suggested / recipe lr.
    from reslab.models import create_model

    model = create_model("resnet8", num_classes=3)
    expected = sorted(g["base_lr"] * found["lr"] / recipe.lr for g in build_optimizer(model, recipe).param_groups)
    saved = run_files.load_state(run)["optimizer"]["param_groups"]
    assert len(set(expected)) >= 4  # head, last stage, earlier stages, stem
    assert sorted(g["base_lr"] for g in saved) == pytest.approx(expected)


def test_the_parsers_stated_defaults_are_the_finders():
    from reslab.cli import build_parser
    from reslab.train.lr_find import DEFAULT_RULE, END_LR, RULES, START_LR, STEPS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["lr-find"]
    helps = {a.dest: a.help for a in sub._actions}
    assert f"default {START_LR:g})" in helps["start_lr"] and f"default {END_LR:g})" in helps["end_lr"]
    assert f"default {STEPS};" in helps["steps"]
    assert f"{DEFAULT_RULE} (default" in helps["rule"] and set(RULES) <= set(re.findall(r"\w+", helps["rule"]))
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    assert f"{DEFAULT_RULE} (default)" in {a.dest: a.help for a in train._actions}["lr_find"]
    assert parser.parse_args(["train", "--lr-find"]).lr_find is True
    assert parser.parse_args(["train", "--lr-find", "valley", "--epochs", "2"]).lr_find == "valley"
    assert parser.parse_args(["train", "--epochs", "2"]).lr_find is None


def test_train_lr_find_takes_a_rule(folder, tmp_path, short_tests, capsys):
    run = tmp_path / "run"
    train(tiny_config(folder, run, lr_find="valley", epochs=1))
    assert json.loads((run / "config.json").read_text())["lr_find"]["rule"] in ("valley", "minimum/10")
    assert main(["train", "--data", str(folder), "--lr-find", "steep", "--out", str(tmp_path / "o")]) == 2
    assert "unknown lr finder rule 'steep'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
