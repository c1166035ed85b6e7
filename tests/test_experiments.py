"""The paper's experiments at toy size: depths 8 and 14, 8x8 images, one epoch or a few steps."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reslab.cli import main
from reslab.errors import ReslabError
from reslab.experiments import (
    DegradationConfig,
    GradientsConfig,
    InceptionConfig,
    ResponsesConfig,
    Table6Config,
    run_degradation,
    run_gradients,
    run_inception,
    run_responses,
    run_table6,
)
from reslab.experiments.common import residual_branch_outputs, weight_layers
from reslab.experiments.inception import DEFAULT_MODELS, plain_twin
from reslab.experiments.responses import response_std
from reslab.models import create_model

TOY = ["plain8", "resnet8", "plain14", "resnet14"]


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny image folder (3 classes told apart by brightness) and a cache kept out of $HOME."""
    root = tmp_path_factory.mktemp("exp")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "shapes" / f"class{c}").mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 40, (8, 8, 3)) + 90 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / "shapes" / f"class{c}" / f"{i}.png")
    mp = pytest.MonkeyPatch()
    mp.setenv("RESLAB_DATA", str(root / "cache"))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def degradation(env):
    config = DegradationConfig(data=str(env / "shapes"), depths=[14, 8], epochs=2, batch_size=8, image_size=8,
                               precision="fp32", out=str(env / "degradation"), quiet=True)
    return config, run_degradation(config)


def test_degradation_writes_summary_metrics_and_figure(degradation):
    config, summary = degradation
    out = Path(config.out)
    assert list(summary["models"]) == TOY  # shallow first, plain before residual
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["models"].keys() == summary["models"].keys()
    for name, m in on_disk["models"].items():
        for key in ("final_train_error", "best_train_error", "train_error_eval", "final_val_error"):
            assert 0.0 <= m[key] <= 1.0, (name, key, m[key])
        assert m["best_train_error"] <= m["final_train_error"]
        assert m["test_error"] is None  # the folder has no test split
        assert m["seconds"] > 0 and m["depth"] == int(name.removeprefix("plain").removeprefix("resnet"))
        assert m["residual"] == name.startswith("resnet")
        assert (Path(m["run_dir"]) / "last.safetensors").is_file()
    assert set(on_disk["definitions"]) >= {"final_train_error", "train_error_eval", "test_error"}
    assert on_disk["settings"]["train_config"]["lr"] == 0.05  # one recipe for every net
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["epoch"]) for r in rows] == [(n, e) for n in TOY for e in ("1", "2")]
    last = {r["model"]: float(r["train_error"]) for r in rows if r["epoch"] == "2"}
    assert last == pytest.approx({n: m["final_train_error"] for n, m in on_disk["models"].items()}, abs=1e-5)
    width, height = png_size(out / "degradation.png")
    assert width > 1.8 * height  # two panels side by side: plain left, residual right


def test_degradation_refuses_bad_settings(env, degradation):
    with pytest.raises(ReslabError, match="6n\\+2"):
        DegradationConfig(depths=[10])
    with pytest.raises(ReslabError, match="twice"):
        DegradationConfig(depths=[20, 20])
    with pytest.raises(ReslabError, match="epochs"):
        DegradationConfig(epochs=0)
    with pytest.raises(ReslabError, match="already holds"):
        run_degradation(DegradationConfig(data=str(env / "shapes"), depths=[8], out=degradation[0].out))


def test_gradients_per_layer_at_init_and_after_steps(tmp_path):
    config = GradientsConfig(models=["plain14", "resnet14"], steps=2, batch_size=16, image_size=8,
                             out=str(tmp_path))
    summary = run_gradients(config)
    assert json.loads((tmp_path / "gradients.json").read_text()) == summary
    for m in summary["models"].values():
        assert m["depth"] == 14 and len(m["layers"]) == 14  # 13 convs and the fc: the paper's count
        assert m["layers"][0] == "conv1" and m["layers"][-1] == "fc"
        assert not any("downsample" in layer for layer in m["layers"])
        for key in ("init", "after"):
            assert len(m[key]) == 14 and all(math.isfinite(g) and g > 0 for g in m[key])
        assert m["init"] != m["after"]  # the steps changed the weights
    assert png_size(tmp_path / "gradients.png")[0] > 0


def test_gradients_without_steps_measure_the_same_net_twice(tmp_path):
    summary = run_gradients(GradientsConfig(models=["resnet8"], steps=0, batch_size=8, image_size=8,
                                            out=str(tmp_path)))
    m = summary["models"]["resnet8"]
    assert m["init"] == pytest.approx(m["after"], rel=1e-5)


def test_response_hooks_read_the_residual_function_output():
    """The measured std is that of F(x) (after the last BN, before the add or the in-place ReLU)."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    for name in ("resnet8", "plain8"):
        model = create_model(name, num_classes=3).eval()
        blocks, stds = response_std(model, x, lambda t: t, batch_size=4)  # two batches, one of 2
        assert blocks == ["layer1.0", "layer2.0", "layer3.0"]
        with torch.no_grad():
            first = model.layer1[0]
            response = first.residual_function(model.forward_stem(x))
        expected = response.transpose(0, 1).flatten(1).std(1, unbiased=False).mean()
        assert stds[0] == pytest.approx(float(expected), rel=1e-4)
        assert [how for _, _, how in residual_branch_outputs(model)] == ["pre" if name == "resnet8" else "post"] * 3


def test_responses_of_a_trained_run_and_an_initialized_model(degradation, tmp_path):
    config, summary = degradation
    run = summary["models"]["plain8"]["run_dir"]
    result = run_responses(ResponsesConfig(sources=[run, "resnet14"], data=None, image_size=8, max_images=50,
                                           out=str(tmp_path)))
    models = json.loads((tmp_path / "responses.json").read_text())["models"]
    assert list(models) == ["plain8", "resnet14"] and result["models"].keys() == models.keys()
    trained, initialized = models["plain8"], models["resnet14"]
    assert trained["trained"] and trained["source"] == run and trained["data"] == config.data
    assert trained["split"] == "val"  # the folder has no test split: the next one
    assert not initialized["trained"] and initialized["data"] == "digits" and initialized["split"] == "test"
    assert len(trained["std"]) == len(trained["blocks"]) == 3 and len(initialized["std"]) == 6
    assert all(s > 0 for m in models.values() for s in m["std"])
    assert png_size(tmp_path / "responses.png")[1] > 0


def test_weight_layers_skip_projection_shortcuts():
    model = create_model("resnet8", shortcut="B")
    names = [n for n, _ in weight_layers(model)]
    assert len(names) == 8 and not any("downsample" in n for n in names)


def test_cli_runs_gradients_and_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["experiment", "gradients", "plain8", "--steps", "1", "--batch-size", "8", "--image-size", "8",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "gradients.json").is_file() and (tmp_path / "gradients.png").is_file()
    capsys.readouterr()
    assert main(["experiment", "responses", "no-such-run", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-run" in err
    assert main(["experiment", "degradation", "--depths", "21", "--out", str(tmp_path / "d")]) == 2
    assert "21" in capsys.readouterr().err


INCEPTION_TOY = ["plain8", "resnet8", "inception_resnet_small_plain", "inception_resnet_small"]


def test_inception_experiment_writes_one_entry_per_net_and_the_figure(env, tmp_path):
    # 16 px: the smallest input that keeps inception_resnet_small's last grid above 1x1 (16 -> 7 -> 3).
    config = InceptionConfig(models=INCEPTION_TOY, data=str(env / "shapes"), epochs=2, batch_size=8, image_size=16,
                             precision="fp32", out=str(tmp_path), quiet=True)
    summary = run_inception(config)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert list(on_disk["models"]) == INCEPTION_TOY and on_disk["models"].keys() == summary["models"].keys()
    for name, m in on_disk["models"].items():
        assert m["model"] == name
        for key in ("final_train_error", "best_train_error", "mean_train_error", "train_error_eval",
                    "final_val_error"):
            assert 0.0 <= m[key] <= 1.0, (name, key, m[key])
        assert m["params"] > 0 and m["macs"] > 0 and m["seconds_per_epoch"] > 0
        assert m["residual"] == (name in ("resnet8", "inception_resnet_small"))
        assert m["precision"] == "fp32" and (Path(m["run_dir"]) / "last.safetensors").is_file()
        assert m["epochs_to_target"] is None or 1 <= m["epochs_to_target"] <= 2
    models = on_disk["models"]
    # Trained at the experiment's input: 3 classes, 3 channels, 16 px (the digits would be 1 channel).
    assert models["inception_resnet_small"]["macs"] < 136_461_696 / 3
    assert models["inception_resnet_small_plain"]["macs"] == models["inception_resnet_small"]["macs"]
    assert on_disk["pairs"] == [
        {"plain": "plain8", "residual": "resnet8",
         "final_train_error_gap": pytest.approx(models["plain8"]["final_train_error"]
                                                - models["resnet8"]["final_train_error"]),
         "mean_train_error_gap": pytest.approx(models["plain8"]["mean_train_error"]
                                               - models["resnet8"]["mean_train_error"])},
        {"plain": "inception_resnet_small_plain", "residual": "inception_resnet_small",
         "final_train_error_gap": pytest.approx(models["inception_resnet_small_plain"]["final_train_error"]
                                                - models["inception_resnet_small"]["final_train_error"]),
         "mean_train_error_gap": pytest.approx(models["inception_resnet_small_plain"]["mean_train_error"]
                                               - models["inception_resnet_small"]["mean_train_error"])},
    ]
    settings = on_disk["settings"]
    assert settings["image_size"] == 16 and settings["precision_resolved"] == "fp32"
    assert settings["train_config"]["lr"] == 0.05  # one recipe for every net
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["epoch"]) for r in rows] == [(n, e) for n in INCEPTION_TOY for e in ("1", "2")]
    for name, m in models.items():  # the area under the logged curve, per epoch
        errors = [float(r["train_error"]) for r in rows if r["model"] == name]
        assert m["mean_train_error"] == pytest.approx(sum(errors) / 2, abs=1e-5)
        assert m["final_train_error"] == pytest.approx(errors[-1], abs=1e-5)
    width, height = png_size(tmp_path / "inception.png")
    assert width > 2.5 * height  # three panels side by side
    with pytest.raises(ReslabError, match="already holds"):
        run_inception(config)


def test_inception_defaults_are_comparable_nets_at_their_native_input():
    config = InceptionConfig()
    assert config.models == DEFAULT_MODELS and config.resolved_image_size() == 32
    assert InceptionConfig(models=["resnet20", "googlenet"]).resolved_image_size() == 224
    assert [plain_twin(n) for n in DEFAULT_MODELS] == [None, "plain56", None, "inception_resnet_small_plain"]
    assert plain_twin("inception_small") is None and plain_twin("preact_resnet20") is None


def test_inception_experiment_refuses_bad_settings(capsys):
    with pytest.raises(ReslabError, match="unknown model 'resnet_57'"):
        InceptionConfig(models=["resnet_57"])
    with pytest.raises(ReslabError, match="epochs .*got 0"):
        InceptionConfig(epochs=0)
    with pytest.raises(ReslabError, match="image-size .*got 4"):
        InceptionConfig(image_size=4)
    with pytest.raises(ReslabError, match="between 0 and 1 .*got 5"):
        InceptionConfig(target_train_error=5)
    assert main(["experiment", "inception", "plain56", "plain56"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "plain56" in err


# --- CIFAR-10 at the paper's scale, in miniature: a fake archive in the real format -----------------


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A fake cifar-10-python.tar.gz (30 random images a batch: 150 to train on, 30 to test) given as
    a path, and extracted into the cache as the named `cifar10` would be after its download."""
    import hashlib

    import test_data_cifar
    from reslab.data import cifar as cifar_data

    root = tmp_path_factory.mktemp("cifar")
    mp = pytest.MonkeyPatch()
    mp.setattr(test_data_cifar, "PER_BATCH", 30)
    tarball, _ = test_data_cifar.make_cifar10_tarball()
    archive = dataclasses.replace(cifar_data.ARCHIVES["cifar10"], md5=hashlib.md5(tarball).hexdigest())
    mp.setitem(cifar_data.ARCHIVES, "cifar10", archive)
    mp.setenv("RESLAB_CACHE", str(root / "cache"))
    path = root / "cifar-10-python.tar.gz"
    path.write_bytes(tarball)
    cifar_data._extract(path, root / "cache", archive, "")
    yield path
    mp.undo()


def test_degradation_on_a_cifar_archive_continues_a_killed_experiment(cifar, tmp_path, one_thread):
    out = tmp_path / "killed"
    config = DegradationConfig(data=str(cifar), depths=[8], epochs=2, batch_size=32, image_size=8, precision="fp32",
                               out=str(out), quiet=True)
    trained = []

    def kill_resnet8_in_epoch_2(name, epoch, step):
        trained.append((name, epoch, step))
        return (name, epoch, step) == ("resnet8", 2, 1)

    with pytest.raises(ReslabError, match=f"resnet8 stopped at epoch 2 .*--resume {out}"):
        run_degradation(config, stop=kill_resnet8_in_epoch_2)
    assert not (out / "summary.json").exists() and (out / "resnet8" / "last.state.pt").is_file()
    plain_weights = (out / "plain8" / "last.safetensors").read_bytes()
    trained.clear()
    with pytest.raises(ReslabError, match="--epochs 3 differs from its 2"):
        DegradationConfig.resumed(str(out), epochs=3)
    with pytest.raises(ReslabError, match="already holds a degradation experiment; continue it with --resume"):
        run_degradation(config)

    summary = run_degradation(DegradationConfig.resumed(str(out), quiet=True),
                              stop=lambda *where: trained.append(where) and False)
    # plain8 finished before the kill: read back, not trained; resnet8 went on from its checkpoint.
    steps = 5  # 135 training images (the paper's 10 % held out) at batch 32; the last 7 are a batch too
    assert trained == [("resnet8", 2, s) for s in range(2, steps + 1)]
    assert (out / "plain8" / "last.safetensors").read_bytes() == plain_weights
    settings = summary["settings"]
    assert settings["val_split"] == 0.1 and settings["iterations_per_epoch"] == steps
    assert settings["train_config"]["val_split"] == 0.1
    for m in summary["models"].values():
        assert m["final_val_error"] is not None and m["test_error"] is not None  # bold curve, and the test pass
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["epoch"], r["iteration"]) for r in rows] == [
        (n, str(e), str(e * steps)) for n in ("plain8", "resnet8") for e in (1, 2)]
    # The dashed curves come from each net's steps.csv (epochs of 5 steps: one window each).
    with open(out / "steps.csv", newline="") as f:
        within = list(csv.DictReader(f))
    assert [(r["model"], r["iteration"]) for r in within] == [
        (n, str(e * steps)) for n in ("plain8", "resnet8") for e in (1, 2)]
    assert png_size(out / "degradation.png")[0] > 0


def stop_resnet8_in_epoch_2(name, epoch, step):
    """A stop hook that travels to a worker process (module level, so pickled by reference)."""
    return (name, epoch, step) == ("resnet8", 2, 1)


def test_degradation_side_by_side_trains_the_nets_it_would_train_in_turn(env, tmp_path, one_thread, capsys):
    from safetensors.torch import load_file

    settings = dict(data=str(env / "shapes"), depths=[8], epochs=2, batch_size=8, image_size=8, precision="fp32")
    in_turn = run_degradation(DegradationConfig(out=str(tmp_path / "in-turn"), quiet=True, **settings))
    out = tmp_path / "side"
    with pytest.raises(ReslabError, match=f"stopped at epoch 2 of 2 .*--resume {out}"):
        run_degradation(DegradationConfig(out=str(out), jobs=2, **settings), stop=stop_resnet8_in_epoch_2)
    printed = capsys.readouterr().out
    assert "resnet8: epoch 1/2  train loss" in printed
    assert "resnet8: epoch 2/2" not in printed and not (out / "summary.json").exists()
    assert (out / "resnet8" / "last.state.pt").is_file()
    side = run_degradation(DegradationConfig.resumed(str(out), jobs=2, quiet=True))
    assert side["settings"]["jobs"] == 2 and "jobs" not in json.loads((out / "experiment.json").read_text())["settings"]
    # One thread a net here as in turn: the very nets, bit for bit, though resnet8 was stopped and resumed.
    for name in ("plain8", "resnet8"):
        ours, theirs = (load_file(root / name / "last.safetensors") for root in (out, tmp_path / "in-turn"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert side["models"][name]["test_error"] == in_turn["models"][name]["test_error"]
    with pytest.raises(ReslabError, match="--jobs takes a positive integer .*got 0"):
        DegradationConfig(jobs=0)
    with pytest.raises(ReslabError, match="--jobs takes a positive integer .*got 1.5"):
        Table6Config(jobs=1.5)
    capsys.readouterr()
    assert main(["experiment", "table6", "--data", str(env / "shapes"), "--jobs", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--jobs takes a positive integer" in err


def test_side_by_side_nets_share_the_threads(monkeypatch):
    from reslab.experiments.parallel import worker_threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert [worker_threads(jobs) for jobs in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]


def test_degradation_paper_recipe_takes_its_own_lr():
    assert DegradationConfig().train_config("plain20", Path("x")).resolve().lr == 0.05
    assert DegradationConfig(recipe="paper").train_config("plain20", Path("x")).resolve().lr == 0.1
    assert DegradationConfig(data="digits").resolved_val_split() is None  # the digits' own split
    assert DegradationConfig(data="cifar10").resolved_val_split() == 0.1
    # The default schedule: 2 epochs on CIFAR (Figure 6 within 45 minutes on 2 cores), 8 on digits; a
    # folder of CIFAR images trains as the archive: the paper's split and augmentation.
    assert DegradationConfig(data="cifar10").resolved_epochs() == 2 and DegradationConfig().resolved_epochs() == 8
    assert DegradationConfig(data="cifar10", epochs=5).train_config("plain20", Path("x")).epochs == 5
    folder = DegradationConfig(data="some/folder").train_config("plain20", Path("x"))
    assert (folder.epochs, folder.val_split, folder.augment) == (2, 0.1, "cifar")
    assert DegradationConfig().train_config("plain20", Path("x")).augment is None  # the digits' own


def test_table6_on_cifar10_reports_each_depth_over_seeds_beside_the_paper(cifar, tmp_path, capsys, one_thread,
                                                                         monkeypatch):
    out = tmp_path / "t6"
    args = ["experiment", "table6", "--data", "cifar10", "--depths", "20", "8", "--seeds", "0", "1", "--epochs", "1",
            "--precision", "fp32", "--out", str(out), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "ResNet-20" in printed and "8.75%" in printed and "test err mean +- std" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated_on"] == "test" and summary["complete"]
    assert [d["depth"] for d in summary["depths"]] == [8, 20]
    runs = summary["runs"]
    assert [(r["depth"], r["seed"]) for r in runs] == [(8, 0), (8, 1), (20, 0), (20, 1)]
    for run in runs:
        run_dir = Path(run["run_dir"])
        assert run_dir.name == f"resnet{run['depth']}-seed{run['seed']}"
        trained = json.loads((run_dir / "summary.json").read_text())
        assert run["test_error"] == pytest.approx(1 - trained["test_acc"])
        assert run["weights"] == "end of schedule" and trained["best_weights"] == "model" and run["epochs"] == 1
        cfg = json.loads((run_dir / "config.json").read_text())["config"]
        # The paper's recipe, section 4.2, on every image of the training set.
        assert (cfg["recipe"], cfg["lr"], cfg["batch_size"], cfg["momentum"], cfg["nesterov"], cfg["weight_decay"],
                cfg["schedule"], cfg["augment"], cfg["val_split"], cfg["seed"], cfg["label_smoothing"]) == (
            "paper", 0.1, 128, 0.9, False, 1e-4, "step", "cifar", 0.0, run["seed"], 0.0)
        assert cfg["no_decay_norm_bias"] is False and cfg["model"] == f"resnet{run['depth']}"
    for entry in summary["depths"]:
        assert list(entry) == ["depth", "runs", "test_error_mean", "test_error_std", "test_error_min",
                               "test_error_max", "paper_test_error"]
        errors = [r["test_error"] for r in runs if r["depth"] == entry["depth"]]
        assert entry["runs"] == 2
        assert entry["test_error_mean"] == pytest.approx(sum(errors) / 2)
        assert entry["test_error_std"] == pytest.approx(abs(errors[0] - errors[1]) / math.sqrt(2))
        assert (entry["test_error_min"], entry["test_error_max"]) == (min(errors), max(errors))
    assert [d["paper_test_error"] for d in summary["depths"]] == [None, 0.0875]
    assert png_size(out / "table6.png")[0] > 0
    # With a validation split: the weights of the best validation epoch, tested once, after training.
    from reslab.train import steps

    evaluated = []  # the size of each split the trainer evaluates, in order
    real_evaluate = steps.evaluate
    monkeypatch.setattr(steps, "evaluate", lambda model, loader, *a, **k: evaluated.append(len(loader.split))
                        or real_evaluate(model, loader, *a, **k))
    chosen = run_table6(Table6Config(data="cifar10", depths=[8], seeds=[0], epochs=2, val_split=0.1, precision="fp32",
                                     out=str(tmp_path / "val"), quiet=True))
    (run,) = chosen["runs"]
    trained = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
    assert run["weights"] == f"best validation (epoch {trained['best_epoch']})"
    assert run["test_error"] == pytest.approx(1 - trained["test_acc"]) and trained["best_epoch"] in (1, 2)
    assert json.loads((Path(run["run_dir"]) / "config.json").read_text())["config"]["val_split"] == 0.1
    # The validation split (16 images) after each of the 2 epochs; the 30 test images once, last.
    assert len(evaluated) == 3 and evaluated[0] == evaluated[1] == 16 and evaluated[2] == 30

    # Resumed when finished: every run read back, nothing trained; a changed setting is refused.
    before = {r["run_dir"]: (Path(r["run_dir"]) / "last.safetensors").stat().st_mtime_ns for r in runs}
    assert main(["experiment", "table6", "--resume", str(out), "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["depths"] == summary["depths"]
    assert {d: (Path(d) / "last.safetensors").stat().st_mtime_ns for d in before} == before
    capsys.readouterr()
    assert main(["experiment", "table6", "--resume", str(out), "--seeds", "0"]) == 2
    assert "--seeds 0 differs from its 0 1" in capsys.readouterr().err


def test_table6_on_a_folder_without_test_split_reports_validation_error(tmp_path, one_thread):
    rng = np.random.default_rng(0)
    for c in range(3):  # 150 images: 135 to train on once 10 % are held out, more than one batch of 128
        (tmp_path / "data" / "train" / f"class{c}").mkdir(parents=True)
        for i in range(50):
            pixels = rng.integers(0, 40, (8, 8, 3)) + 90 * c
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "data" / "train" / f"class{c}" / f"{i}.png")
    config = Table6Config(data=str(tmp_path / "data"), depths=[8], seeds=[3], epochs=1, precision="fp32",
                          out=str(tmp_path / "t6"), quiet=True)
    assert config.evaluated_on == "validation" and config.resolved_val_split() == 0.1
    summary = run_table6(config)
    assert summary["evaluated_on"] == "validation" and "no test split" in summary["definitions"]["test_error"]
    (run,) = summary["runs"]
    assert run["weights"] == "end of schedule" and run["test_error"] == run["final_val_error"] is not None
    cfg = json.loads((Path(run["run_dir"]) / "config.json").read_text())["config"]
    assert cfg["val_split"] == 0.1 and cfg["augment"] == "cifar" and cfg["seed"] == 3
    (entry,) = summary["depths"]
    assert entry["test_error_mean"] == run["test_error"] and entry["test_error_std"] is None and entry["runs"] == 1
    with pytest.raises(ReslabError, match="no test split, so --val-split 0 leaves no held-out image"):
        run_table6(dataclasses.replace(config, val_split=0.0, out=str(tmp_path / "none")))
    assert not (tmp_path / "none").exists()  # refused before the folder was claimed


def test_table6_warms_resnet110_up_and_refuses_bad_settings():
    config = Table6Config(depths=[20, 110], epochs=4, val_split=0.1)
    assert config.train_config(110, 0, Path("x")).resolve().warmup_epochs == 1.0
    assert config.train_config(20, 0, Path("x")).resolve().warmup_epochs == 0.0
    assert config.resolved_val_split() == 0.1 and Table6Config().resolved_val_split() == 0.0
    assert Table6Config().depths == [20, 32, 44, 56, 110] and Table6Config().epochs == 182
    with pytest.raises(ReslabError, match="6n\\+2"):
        Table6Config(depths=[21])
    with pytest.raises(ReslabError, match="twice"):
        Table6Config(seeds=[1, 1])
    with pytest.raises(ReslabError, match="no table6 experiment"):
        Table6Config.resumed("/nonexistent/folder")


def test_a_relative_data_path_is_recorded_absolute_so_resume_works_from_elsewhere(tmp_path, monkeypatch):
    from reslab.experiments.common import claim_experiment_dir
    from reslab.train import TrainConfig

    (tmp_path / "photos" / "cats").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    claim_experiment_dir(Table6Config(data="photos", depths=[20], out="t6"), "table6")
    absolute = str(tmp_path / "photos")
    assert json.loads((tmp_path / "t6" / "experiment.json").read_text())["settings"]["data"] == absolute
    assert TrainConfig(data="photos").resolve().data == absolute and TrainConfig().resolve().data == "digits"
    assert Table6Config.resumed("t6", data="./photos/").data == absolute  # the same folder, spelled otherwise
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert Table6Config.resumed(str(tmp_path / "t6")).data == absolute
    with pytest.raises(ReslabError, match="--data photos differs"):
        Table6Config.resumed(str(tmp_path / "t6"), data="photos")  # not a folder here: another data set


def test_budget_on_a_cifar_archive_replans_and_reads_the_test_split_once_at_the_end(cifar, tmp_path, monkeypatch,
                                                                                    one_thread):
    from reslab.train import TrainConfig, steps, train
    from reslab.train.budget import BUDGET_AIM
    from test_recipe import FakeClock

    clock = FakeClock(monkeypatch)  # 1 s a step and 0.25 s an evaluation pass while the budget measures
    evaluated = []
    timed_evaluate = steps.evaluate
    monkeypatch.setattr(steps, "evaluate", lambda model, loader, *a, **k: evaluated.append(len(loader.split))
                        or timed_evaluate(model, loader, *a, **k))

    def slow_down(epoch, step):  # the real steps take 2 s: the first plan overruns
        clock.STEP = 2.0
        return False

    summary = train(TrainConfig(model="resnet8", data=str(cifar), val_split=0.1, budget=80.0, batch_size=32,
                                image_size=8, precision="fp32", out=str(tmp_path / "run"), quiet=True), stop=slow_down)
    plan = summary["budget"]
    assert plan["replans"] and summary["epochs"] < plan["measured_epochs"]
    assert plan["used_seconds"] <= BUDGET_AIM * 80.0 < plan["used_seconds"] + 5 * 2.0 + 0.25
    # The validation split after every epoch, the 30 test images once, after the last.
    assert evaluated == [16] * summary["epochs"] + [30] and summary["test_acc"] is not None
