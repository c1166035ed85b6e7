"""The paper's experiments at toy size: depths 8 and 14, 8x8 images, one epoch or a few steps."""

from __future__ import annotations

import csv
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
    run_degradation,
    run_gradients,
    run_inception,
    run_responses,
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
