"""evaluate: eval.json and figures, agreement with predict, class and split checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from reslab.cli import main
from reslab.errors import ReslabError
from reslab.evaluate import evaluate, metrics, sample_indices
from reslab.inference import Predictor
from reslab.train import train
from test_train import CLASSES, make_folder, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    folder = make_folder(root / "shapes", per_class=8)
    run = root / "run"
    train(tiny_config(folder, run, epochs=1))
    return folder, run


def test_evaluate_writes_eval_json_and_figures_and_agrees_with_predict(trained, tmp_path, capsys):
    folder, run = trained
    result = evaluate(run, data=str(folder), out=tmp_path / "ev")
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert {"top1", "top5", "n", "per_class"} <= saved.keys()
    assert saved["n"] == 24 and saved["split"] == "all"  # class subfolders: evaluated whole
    assert saved["top5"] == 1.0  # 3 classes: top-5 covers them all
    assert set(saved["per_class"]) == set(CLASSES)
    assert sum(c["support"] for c in saved["per_class"].values()) == 24
    for name in ("confusion.png", "samples.png"):
        assert (tmp_path / "ev" / name).read_bytes()[:4] == b"\x89PNG"

    # The same files through `reslab predict --json`: the same top-1 answers.
    files = sorted(str(p) for p in folder.rglob("*.png"))
    assert main(["predict", str(run), *files, "--json", "--top-k", "1"]) == 0
    predicted = {r["image"]: r["top"][0]["class"] for r in json.loads(capsys.readouterr().out)}
    truth = {f: Path(f).parent.name for f in files}
    top1 = sum(predicted[f] == truth[f] for f in files) / len(files)
    assert top1 == pytest.approx(result["top1"])
    per_class_recall = {c: sum(predicted[f] == c for f in files if truth[f] == c) / 8 for c in CLASSES}
    assert per_class_recall == pytest.approx({c: saved["per_class"][c]["recall"] for c in CLASSES})


def test_predict_takes_any_size_and_mode(trained, tmp_path):
    from PIL import Image

    _, run = trained
    big = tmp_path / "big.jpg"
    Image.new("L", (300, 120), 200).save(big)
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (7, 9), (10, 20, 30, 128)).save(rgba)
    out = Predictor(run).predict([big, rgba], top_k=2)
    assert [len(r) for r in out] == [2, 2]
    assert all(name in CLASSES and 0 <= p <= 1 for r in out for name, p in r)


def test_default_out_is_in_the_run_and_split_folder_uses_test(trained, tmp_path):
    folder, run = trained
    layout = tmp_path / "layout"
    for split in ("train", "test"):
        shutil.copytree(folder, layout / split)
    result = evaluate(run / "best.safetensors", data=str(layout))
    assert result["split"] == "test" and result["n"] == 24
    assert Path(result["out"]) == run / "eval-layout" and (run / "eval-layout" / "eval.json").is_file()
    with pytest.raises(ReslabError, match="evaluated whole; drop --split"):
        evaluate(run, data=str(folder), split="val")


def test_classes_are_matched_by_name_a_subset_is_fine_an_unknown_one_refused(trained, tmp_path):
    folder, run = trained
    subset = tmp_path / "two"
    for c in CLASSES[:2]:
        # Another spelling of the same class (case, plural) is matched to it.
        shutil.copytree(folder / c, subset / (c.upper() + "s" if c == CLASSES[1] else c))
    result = evaluate(run, data=str(subset), out=tmp_path / "subset")
    assert result["n"] == sum(len(list((folder / c).iterdir())) for c in CLASSES[:2])
    assert set(result["per_class"]) == set(CLASSES)
    other = tmp_path / "other"
    shutil.copytree(folder / CLASSES[0], other / CLASSES[0])
    shutil.copytree(folder / CLASSES[1], other / "zebra")
    with pytest.raises(ReslabError, match="1 class.*zebra"):
        evaluate(run, data=str(other), out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_metrics_and_sample_choice():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]])
    labels = torch.tensor([0, 1, 1, 2])
    m = metrics(probs, labels, ["a", "b", "c"])
    assert m["top1"] == 0.75 and m["n"] == 4 and m["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert m["per_class"]["a"]["precision"] == 0.5 and m["per_class"]["b"]["recall"] == 0.5
    pick = sample_indices(torch.tensor([True] * 50 + [False] * 20).numpy(), count=10, wrong_max=3)
    assert len(pick) == 10 and (pick >= 50).sum() == 3


def test_tta_flip_averages_the_mirror_image_and_is_recorded(trained, tmp_path):
    from reslab.inference.predictor import Predictor

    folder, run = trained
    plain = Predictor(run, backend="torch", precision="fp32", tta="none")
    flip = Predictor(run, backend="torch", precision="fp32", tta="flip")
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = (plain.probabilities(images) + plain.probabilities(images.flip(-1))) / 2
    assert torch.allclose(flip.probabilities(images), expected, atol=1e-6)
    assert not torch.allclose(flip.probabilities(images), plain.probabilities(images), atol=1e-4)
    result = evaluate(run, data=str(folder), out=tmp_path / "tta", tta="flip", backend="torch", precision="fp32")
    assert json.loads((tmp_path / "tta" / "eval.json").read_text())["tta"] == "flip" and result["tta"] == "flip"
    assert evaluate(run, data=str(folder), out=tmp_path / "none", backend="torch")["tta"] == "none"
    with pytest.raises(ReslabError, match="--tta must be one of"):
        Predictor(run, tta="rotate")
