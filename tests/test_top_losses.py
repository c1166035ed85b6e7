"""Top losses and F1 (issue 22, item 3): a photo filed under the wrong class is found by its file name
in eval.json's `top_losses` and `misclassified` and drawn in top_losses.png; per-class F1, the macro
and weighted averages, balanced_accuracy and macro_f1 are scikit-learn's."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_fscore_support

from reslab.cli import main
from reslab.errors import ReslabError
from reslab.evaluate import evaluate, metrics, rank_losses
from reslab.train import train
from test_train import tiny_config

CLASSES = ("red", "green", "blue")
ROW = {"file", "true", "predicted", "p_predicted", "loss"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def colour_folder(root: Path, per_class: int, seed: int) -> Path:
    """Noisy 16 px images, each class one bright colour channel: learnt for sure in two epochs."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (16, 16, 3))
            pixels[..., k] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """resnet8 trained on the colours; an evaluation folder where one red image is filed under green."""
    root = tmp_path_factory.mktemp("toplosses")
    run = root / "run"
    # lr 0.05: ten steps at the small-image default's 0.2 may not settle (benchmarks/RESULTS.md, issue 20).
    train(tiny_config(colour_folder(root / "colours", 12, seed=0), run, epochs=2, val_split=0.0, lr=0.05))
    check = colour_folder(root / "check", 6, seed=1)
    shutil.copy(check / "red" / "0.png", check / "green" / "filed_wrong.png")
    return run, check


def test_a_mislabelled_photo_is_found_by_its_file_name(trained, tmp_path, capsys):
    run, check = trained
    assert main(["evaluate", str(run), "--data", str(check), "--out", str(tmp_path / "ev"), "--top-losses", "4"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    wrong = check / "green" / "filed_wrong.png"
    # The net learned the colours (else the test proves nothing): the copy reads as the red it is.
    assert saved["n"] == 19 and saved["top1"] >= 17 / 19
    mistakes = {row["file"]: row for row in saved["misclassified"]}
    assert str(wrong.resolve()) in mistakes
    row = mistakes[str(wrong.resolve())]
    assert row.keys() == ROW and (row["true"], row["predicted"]) == ("green", "red")
    assert len(saved["misclassified"]) == round(saved["n"] * (1 - saved["top1"]))
    assert len(saved["top_losses"]) == 4 and all(r.keys() == ROW for r in saved["top_losses"])
    losses = [r["loss"] for r in saved["top_losses"]]
    assert losses == sorted(losses, reverse=True) and saved["top_losses"][0]["file"] == str(wrong.resolve())
    assert row["loss"] > -np.log(0.5) and 0.5 < row["p_predicted"] <= 1.0
    assert (tmp_path / "ev" / "top_losses.png").read_bytes()[:4] == b"\x89PNG"
    assert {"balanced_accuracy", "macro_f1", "average"} <= saved.keys()
    assert all("f1" in m for m in saved["per_class"].values()) and set(saved["per_class"]) == set(CLASSES)
    assert "macro avg" in printed and "weighted avg" in printed and "f1" in printed and "top_losses.png" in printed


def test_top_losses_default_to_16_for_folders_and_0_turns_them_off(trained, tmp_path):
    run, check = trained
    result = evaluate(run, data=str(check), out=tmp_path / "ev")
    assert len(result["top_losses"]) == 16 and (tmp_path / "ev" / "top_losses.png").exists()
    result = evaluate(run, data=str(check), out=tmp_path / "ev", top_losses=0)
    assert result["top_losses"] == [] and not (tmp_path / "ev" / "top_losses.png").exists()
    assert result["misclassified"]  # the mistakes are listed either way
    with pytest.raises(ReslabError, match="--top-losses must be a count"):
        evaluate(run, data=str(check), out=tmp_path / "ev", top_losses=-1)


def test_data_without_files_names_images_by_index():
    probabilities = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    top, wrong, index = rank_losses(probabilities, torch.tensor([0, 0, 1]), ["a", "b"], None, 2)
    assert index == [1, 2] and [r["file"] for r in top] == ["#1", "#2"]
    assert top[0] == {"file": "#1", "true": "a", "predicted": "b", "p_predicted": pytest.approx(0.8),
                      "loss": pytest.approx(-np.log(0.2))}
    assert [r["file"] for r in wrong] == ["#1", "#2"]


@pytest.mark.parametrize("num_classes, present", [(4, [0, 1, 2, 3]), (5, [0, 2, 3])])
def test_f1_averages_and_balanced_accuracy_are_sklearns(num_classes, present):
    rng = np.random.default_rng(0)
    labels = torch.tensor(rng.choice(present, 200))
    logits = torch.tensor(rng.normal(size=(200, num_classes))) + 2 * torch.nn.functional.one_hot(labels, num_classes)
    probabilities = logits.softmax(1)
    y_true, y_pred = labels.numpy(), probabilities.argmax(1).numpy()
    m = metrics(probabilities, labels, [f"c{i}" for i in range(num_classes)])
    _, _, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(range(num_classes)), zero_division=0)
    assert [m["per_class"][f"c{i}"]["f1"] for i in range(num_classes)] == pytest.approx(f1.tolist())
    # Averages over the classes the data has (a class it lacks is not a zero in the mean).
    macro = f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    assert m["macro_f1"] == pytest.approx(macro) and m["average"]["macro"]["f1"] == pytest.approx(macro)
    assert m["average"]["weighted"]["f1"] == pytest.approx(f1_score(y_true, y_pred, labels=present,
                                                                    average="weighted", zero_division=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # predictions of a class the data lacks
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["average"]["macro"]["support"] == 200
