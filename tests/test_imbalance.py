"""Imbalanced folders (issue 22, item 4): the start line's warning, --class-weights balanced,
--sampler balanced (balanced, deterministic, exact on resume and sharded under DDP), best weights by
balanced accuracy, and balanced_accuracy / macro_f1 in summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.utils.class_weight import compute_class_weight

from reslab.checkpoint import read_weights
from reslab.cli import main
from reslab.data import BatchLoader
from reslab.data.balance import BalancedBatchLoader, scores
from reslab.data.bundle import Split
from reslab.errors import ReslabError
from reslab.models import create_model
from reslab.train import TrainConfig, train
from reslab.train import steps as train_steps
from reslab.train.distributed import DistContext, shard_indices


def write_folder(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    """Class subfolders of small noisy PNGs, class i a shade brighter than class i-1."""
    rng = np.random.default_rng(0)
    for shade, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 100, (size, size, 3)) + 120 * shade
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> Path:  # 10:1; with --val-split 0.25: 30 and 3 training images
    return write_folder(tmp_path_factory.mktemp("imbalance") / "pets", {"cats": 40, "dogs": 4})


def config(folder: Path, out: Path, **options) -> TrainConfig:
    values = dict(model="resnet8", data=str(folder), data_dir=str(folder.parent / "cache"), image_size=8, epochs=1,
                  batch_size=8, val_split=0.25, out=str(out), quiet=True, precision="fp32")
    return TrainConfig(**{**values, **options})


# --- the start line ---------------------------------------------------------------------------


def test_start_line_warns_on_an_imbalanced_folder_only(imbalanced, tmp_path, capsys, one_thread):
    train(config(imbalanced, tmp_path / "imbalanced", quiet=False))
    err = capsys.readouterr().err
    assert "imbalanced training split: 'cats' has 30 images, 'dogs' 3 (10.0x)" in err, err
    assert "--class-weights balanced or --sampler balanced" in err

    train(config(imbalanced, tmp_path / "on", quiet=False, sampler="balanced"))
    err = capsys.readouterr().err
    assert "'cats' has 30 images, 'dogs' 3 (10.0x); --sampler balanced is on" in err, err

    balanced = write_folder(tmp_path / "balanced", {"cats": 12, "dogs": 12})
    train(config(balanced, tmp_path / "balanced-run", quiet=False))
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "imbalanced" not in err, err


# --- --class-weights balanced -------------------------------------------------------------------


def _spy_loss(monkeypatch) -> list:
    seen = []
    make_step = train_steps.make_step

    def spy(*args, loss_fn, **kwargs):
        seen.append(loss_fn)
        return make_step(*args, loss_fn=loss_fn, **kwargs)

    monkeypatch.setattr(train_steps, "make_step", spy)
    return seen


def test_class_weights_reach_the_loss(imbalanced, tmp_path, monkeypatch, one_thread):
    seen = _spy_loss(monkeypatch)
    train(config(imbalanced, tmp_path / "weighted", class_weights="balanced"))
    record = json.loads((tmp_path / "weighted" / "config.json").read_text())
    assert record["config"]["class_weights"] == "balanced" and record["config"]["sampler"] == "none"
    counts = record["train_class_counts"]
    assert counts == {"cats": 30, "dogs": 3}
    y = np.repeat([0, 1], [counts["cats"], counts["dogs"]])
    expected = torch.tensor(compute_class_weight("balanced", classes=np.array([0, 1]), y=y), dtype=torch.float32)
    assert torch.allclose(seen[-1].weight, expected) and seen[-1].weight[1] / seen[-1].weight[0] == pytest.approx(10)

    train(config(imbalanced, tmp_path / "plain"))
    assert seen[-1].weight is None  # no option, no weights
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["config"]["class_weights"] == "none"


# --- --sampler balanced -----------------------------------------------------------------------


def _split(counts: list[int]) -> Split:
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return Split(torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8), labels)


def test_balanced_draw_is_balanced_and_a_pure_function_of_seed_and_epoch():
    split = _split([200, 20])  # 10:1
    loader = BalancedBatchLoader(split, 16, seed=3)
    drawn = []
    for epoch in range(5):
        loader.set_epoch(epoch)
        index = loader.indices()
        assert len(index) == len(split) == len(BatchLoader(split, 16).indices())  # the same epoch length
        drawn.append(index)
    share = (split.labels[torch.cat(drawn)] == 1).float().mean().item()
    assert 0.42 < share < 0.58, share  # 1/11 = 0.09 in a plain epoch; ~0.5 drawn (sd 0.015 over 1,100 draws)
    assert len(torch.cat(drawn).unique()) > 150  # the majority class is sampled, not a few images repeated

    again = BalancedBatchLoader(split, 16, seed=3)
    again.set_epoch(2)
    assert torch.equal(again.indices(), drawn[2])
    assert not torch.equal(drawn[2], drawn[3])
    other_seed = BalancedBatchLoader(split, 16, seed=4)
    other_seed.set_epoch(2)
    assert not torch.equal(other_seed.indices(), drawn[2])


def test_balanced_draw_is_sharded_over_ranks():
    split = _split([200, 20])
    one = BalancedBatchLoader(split, 8, seed=1)
    one.set_epoch(4)
    ranks = [BalancedBatchLoader(split, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(4)
    shards = [r.indices() for r in ranks]
    # Every rank a disjoint share (by position) of the very same epoch's draw.
    assert torch.equal(torch.stack(shards, 1).flatten(), one.indices())


def test_sampler_resume_draws_the_same_and_ends_on_the_same_weights(imbalanced, tmp_path, monkeypatch, one_thread):
    draws = []
    indices = BalancedBatchLoader.indices

    def logged(self):
        drawn = indices(self)
        draws.append((self.epoch, drawn))
        return drawn

    monkeypatch.setattr(BalancedBatchLoader, "indices", logged)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(config(imbalanced, whole, epochs=2, sampler="balanced"))
    by_epoch = dict(draws)
    assert sorted(by_epoch) == [0, 1]  # the balanced loader drew both epochs
    draws.clear()
    first = train(config(imbalanced, parts, epochs=2, sampler="balanced"),
                  stop=lambda epoch, step: (epoch, step) == (1, 2))
    assert first["interrupted"]
    draws.clear()
    train(TrainConfig(resume=str(parts), quiet=True))
    assert draws and all(torch.equal(drawn, by_epoch[epoch]) for epoch, drawn in draws)
    a, b = load_file(whole / "last.safetensors"), load_file(parts / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed balanced run's weights differ"
    assert json.loads((parts / "config.json").read_text())["config"]["sampler"] == "balanced"


# --- best weights, summary.json ---------------------------------------------------------------

# Validation scores scripted per epoch: plain accuracy is best at epoch 1 (a majority-class model),
# balanced accuracy at epoch 2.
SCRIPT = [{"acc": 0.9, "balanced_accuracy": 0.5, "macro_f1": 0.47},
          {"acc": 0.8, "balanced_accuracy": 0.75, "macro_f1": 0.7},
          {"acc": 0.85, "balanced_accuracy": 0.6, "macro_f1": 0.55}]


@pytest.mark.parametrize("option, best_epoch", [(None, 1), ("class_weights", 2), ("sampler", 2)])
def test_best_weights_follow_balanced_accuracy_when_on(imbalanced, tmp_path, monkeypatch, option, best_epoch,
                                                       one_thread):
    epochs = iter(SCRIPT)
    monkeypatch.setattr(train_steps, "evaluate", lambda *a, **k: {"loss": 0.3, "count": 11.0, **next(epochs)})
    run = tmp_path / "run"
    train(config(imbalanced, run, epochs=3, **({option: "balanced"} if option else {})))
    summary = json.loads((run / "summary.json").read_text())
    best = SCRIPT[best_epoch - 1]
    assert summary["best_epoch"] == best_epoch and summary["best_val_acc"] == best["acc"]
    assert summary["balanced_accuracy"] == best["balanced_accuracy"] and summary["macro_f1"] == best["macro_f1"]
    assert summary["best_by"] == ("balanced_accuracy" if option else "val_acc")
    assert read_weights(run / "best.safetensors")[1].extra["epoch"] == best_epoch


def test_validation_scores_are_the_confusion_summed_over_ranks(one_thread):
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=3).eval()
    labels = torch.tensor([0] * 20 + [1] * 6 + [2] * 4)
    split = Split(torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8), labels)
    x, _ = next(iter(BatchLoader(split, 30, shuffle=False)))
    with torch.no_grad():
        predicted = model(x).argmax(1)
    assert len(predicted.unique()) > 1  # a model that calls everything one class would test little

    whole = train_steps.evaluate(model, BatchLoader(split, 8, shuffle=False), "fp32")
    assert whole["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert whole["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))

    class Recorder:  # rank 1's sums, as they enter the reduction
        def all_reduce_sums(self, values):
            self.values = dict(values)
            return values

    class Rank0:  # rank 0's reduction: its sums plus rank 1's
        def all_reduce_sums(self, values):
            return {k: v + rank1.values[k] for k, v in values.items()}

    shards = [split.subset(shard_indices(len(split), DistContext(r, 2))) for r in range(2)]
    rank1 = Recorder()
    train_steps.evaluate(model, BatchLoader(shards[1], 8, shuffle=False), "fp32", rank1)
    reduced = train_steps.evaluate(model, BatchLoader(shards[0], 8, shuffle=False), "fp32", Rank0())
    alone = train_steps.evaluate(model, BatchLoader(shards[0], 8, shuffle=False), "fp32")
    assert reduced["balanced_accuracy"] == pytest.approx(whole["balanced_accuracy"])
    assert reduced["macro_f1"] == pytest.approx(whole["macro_f1"])
    assert reduced["count"] == 30 and alone["count"] == 15


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_scores_match_scikit_learn_with_a_class_missing_from_the_data():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.choice([0, 1, 3], 200, p=[0.7, 0.2, 0.1]), rng.integers(0, 4, 200)  # class 2 absent
    confusion = np.zeros((4, 4))
    np.add.at(confusion, (y_true, y_pred), 1)
    got = scores(confusion.ravel().tolist(), 4)
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert got["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=[0, 1, 3], average="macro"))


def test_summary_has_the_validation_scores_and_old_configs_still_load(imbalanced, tmp_path, one_thread):
    run = tmp_path / "run"
    train(config(imbalanced, run))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_by"] == "val_acc"
    assert 0 <= summary["balanced_accuracy"] <= 1 and 0 <= summary["macro_f1"] <= 1
    # A run saved before these options: config.json without them still resumes, as "none".
    record = json.loads((run / "config.json").read_text())
    for key in ("class_weights", "sampler"):
        record["config"].pop(key)
    (run / "config.json").write_text(json.dumps(record))
    train(TrainConfig(resume=str(run), epochs=2, quiet=True))
    assert json.loads((run / "config.json").read_text())["config"]["sampler"] == "none"


def test_bad_values_are_refused_in_one_line(imbalanced, tmp_path, capsys):
    for flag, value in (("--class-weights", "heavy"), ("--sampler", "oversample")):
        code = main(["train", "--model", "resnet8", "--data", str(imbalanced), "--image-size", "8", "--quiet",
                     flag, value, "--out", str(tmp_path / "out")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, lines
        assert f"{flag} must be balanced or none, got '{value}'" in lines[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(ReslabError, match="--sampler must be balanced or none"):
        TrainConfig(sampler="Balanced").resolve()


@pytest.mark.parametrize("option, stopped_after, said", [
    (None, 2, "no better validation accuracy for 1 epochs (best 0.9000 at epoch 1)"),
    ("sampler", 3, "no better validation balanced accuracy for 1 epochs (best 0.7500 at epoch 2)")])
def test_early_stopping_watches_the_same_score(imbalanced, tmp_path, monkeypatch, capsys, option, stopped_after,
                                               said, one_thread):
    epochs = iter(SCRIPT)
    monkeypatch.setattr(train_steps, "evaluate", lambda *a, **k: {"loss": 0.3, "count": 11.0, **next(epochs)})
    summary = train(config(imbalanced, tmp_path / "run", epochs=3, early_stop=1, quiet=False,
                           **({option: "balanced"} if option else {})))
    assert summary["stopped"] == "early_stop" and summary["epochs"] == stopped_after
    assert said in capsys.readouterr().err
