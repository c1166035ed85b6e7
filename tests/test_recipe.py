"""The small-photo recipe (issue 14): --budget, the photo-folder defaults, and each ingredient
(TrivialAugment, random erasing, mixup, cutmix, EMA, the stem option) shown to act, to be
recorded in config.json, and to resume bitwise."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from safetensors.torch import load_file

from reslab.errors import ReslabError
from reslab.train import TrainConfig, train
from reslab.train import budget as train_budget
from reslab.train import steps as train_steps
from reslab.train.budget import BUDGET_AIM
from reslab.train.schedule import lr_multiplier
from reslab.train.state import load_state
from test_train import make_folder, tiny_config

# Every ingredient on at once (the exact-resume tests run with all of them).
ALL_ON = dict(augment="trivial", flip=True, random_erasing=0.5, mixup=0.4, cutmix=1.0, ema=0.9)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data") / "shapes")


class FakeClock:
    """Time that passes only as the trainer works: STEP seconds per training step, EVAL per
    evaluation pass (2 for the test-time flip measurement: the images, then their mirror images),
    nothing for anything else (loading, files)."""

    STEP, EVAL = 1.0, 0.25

    def __init__(self, monkeypatch):
        self.now = 0.0
        make_step, evaluate_sums = train_steps.make_step, train_steps.evaluate_sums
        flip_sums = train_budget.flip_sums

        def timed_make_step(*args, **kwargs):
            step = make_step(*args, **kwargs)

            def timed(x, y):
                self.now += self.STEP
                return step(x, y)

            return timed

        def timed_evaluate_sums(*args, **kwargs):
            self.now += self.EVAL
            return evaluate_sums(*args, **kwargs)

        def timed_flip_sums(*args, **kwargs):
            self.now += 2 * self.EVAL
            return flip_sums(*args, **kwargs)

        monkeypatch.setattr(train_budget, "clock", lambda: self.now)
        monkeypatch.setattr(train_budget, "flip_sums", timed_flip_sums)
        monkeypatch.setattr(train_steps, "make_step", timed_make_step)
        monkeypatch.setattr(train_steps, "evaluate_sums", timed_evaluate_sums)


def _weights(run):
    return load_file(run / "last.safetensors")


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- --budget ----------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [30.0, 100.0])
def test_budget_fits_the_epochs_to_a_fake_clock_and_records_them(folder, tmp_path, monkeypatch, budget):
    clock = FakeClock(monkeypatch)
    run = tmp_path / "run"
    summary = train(tiny_config(folder, run, epochs=None, budget=budget))
    # 27 training images in batches of 8: 4 steps an epoch, then one validation pass. Measuring ran
    # 2 warm-up and 3 timed steps and 2 validation passes (5.5 s), and the end will measure test-time
    # flipping (2 passes, 0.5 s), so (0.98 budget - 6) // 4.25 whole epochs fit (the plan aims at
    # BUDGET_AIM of the budget), and then a last one of the steps that fit after its validation pass:
    # 30 s -> 5 epochs + 1 step, 100 s -> 21 epochs + 2 steps.
    epoch_seconds, spent, final = 4 * clock.STEP + clock.EVAL, 5 * clock.STEP + 2 * clock.EVAL, 2 * clock.EVAL
    whole = int((BUDGET_AIM * budget - spent - final) // epoch_seconds)
    last = int((BUDGET_AIM * budget - spent - final - whole * epoch_seconds - clock.EVAL) // clock.STEP)
    assert (whole, last) == {30.0: (5, 1), 100.0: (21, 2)}[budget]
    assert summary["epochs"] == summary["planned_epochs"] == whole + 1
    used = summary["budget"]["used_seconds"]
    assert used <= BUDGET_AIM * budget < used + clock.STEP  # within one step of the aim, not one epoch
    assert summary["budget"]["replans"] == []  # the real epochs took what was measured
    assert summary["budget"]["step_seconds"] == pytest.approx(clock.STEP)
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["epochs"] == whole + 1 and record["config"]["budget"] is None
    assert record["budget"]["epochs"] == whole + 1 and record["budget"]["seconds"] == budget
    assert record["budget"]["last_epoch_steps"] == last
    # The schedule spans exactly the steps chosen: one-cycle ends at the last step of the short epoch.
    state = load_state(run)
    steps = 4 * whole + last
    assert state["global_step"] == steps
    warmup = round(record["config"]["warmup_epochs"] * 4)
    peak = record["config"]["lr"]  # the photo-folder default lr
    assert state["rows"][-1][1] == pytest.approx(peak * lr_multiplier("onecycle", steps - 1, steps, warmup))
    assert record["config"]["warmup_epochs"] == pytest.approx(0.25 * (whole + 1))
    with open(run / "steps.csv", newline="") as f:
        assert float(list(csv.DictReader(f))[-1]["epoch"]) == pytest.approx(whole + last / 4)


def test_budget_run_is_the_run_of_its_epochs_and_resumes_bitwise_with_every_ingredient(folder, tmp_path,
                                                                                     monkeypatch):
    FakeClock(monkeypatch)
    # (0.98 x 16 - 5.5 - 2 x 0.25 for flipping) // (4 + 2 x 0.25), EMA evaluated too: 2 epochs
    options = dict(epochs=None, budget=16.0, **ALL_ON)
    planned = train(tiny_config(folder, tmp_path / "planned", **options))
    assert planned["epochs"] == 2
    # Measuring touched neither the model, nor the optimizer, nor the RNG: --epochs 2 is the same run.
    fixed = train(tiny_config(folder, tmp_path / "fixed", epochs=2, **ALL_ON))
    assert _same_weights(_weights(tmp_path / "planned"), _weights(tmp_path / "fixed"))
    # Interrupted mid-epoch 2 and resumed from the directory alone: bitwise the same again, EMA included.
    cut = train(tiny_config(folder, tmp_path / "cut", **options), stop=lambda epoch, step: (epoch, step) == (2, 1))
    assert cut["interrupted"] and "ema" in load_state(tmp_path / "cut")
    resumed = train(TrainConfig(resume=str(tmp_path / "cut"), quiet=True))
    assert resumed["stopped"] == "completed" and resumed["budget"]["epochs"] == 2
    assert _same_weights(_weights(tmp_path / "planned"), _weights(tmp_path / "cut"))
    a, b = load_state(tmp_path / "planned"), load_state(tmp_path / "cut")
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert fixed["best_val_acc"] == resumed["best_val_acc"] and fixed["best_weights"] == resumed["best_weights"]


@pytest.mark.parametrize("real_step", [2.0, 0.5])
def test_budget_replans_from_the_real_epochs_and_ends_within_an_epoch_of_its_aim(folder, tmp_path, monkeypatch,
                                                                                 capsys, real_step):
    clock, budget = FakeClock(monkeypatch), 60.0

    def change_speed(epoch, step):  # measured at 1 s a step; from the first real step on, `real_step`
        clock.STEP = real_step
        return False

    summary = train(tiny_config(folder, tmp_path / "run", epochs=None, budget=budget, quiet=False),
                    stop=change_speed)
    plan = summary["budget"]
    # A line for each re-plan that changed the epochs; one that moved only the last epoch is recorded.
    counts = [p["epochs"] for p in [{"epochs": plan["measured_epochs"]}, *plan["replans"]]]
    changed = sum(a != b for a, b in zip(counts, counts[1:]))
    assert capsys.readouterr().err.count("real epochs take") == changed >= 1
    # (0.98 x 60 - 5.5) // 4.25 = 12 whole epochs and 2 steps: the measurement's plan; the real epochs
    # are 4 x real_step + 0.25 s (the first one's first step at the measured speed).
    assert (plan["measured_epochs"], plan["replans"][0]["after_epoch"]) == (13, 1)
    assert (summary["epochs"] < 13) if real_step > 1 else (summary["epochs"] > 13)
    assert summary["epochs"] == summary["planned_epochs"] == plan["epochs"] == plan["replans"][-1]["epochs"]
    # Within a step or two of the aim (the mean epoch counts the first one's faster or slower step).
    assert abs(BUDGET_AIM * budget - plan["used_seconds"]) < 2 * real_step
    assert plan["used_seconds"] <= budget
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"]["epochs"] == summary["epochs"] and record["budget"]["replans"] == plan["replans"]
    # The one-cycle schedule still ends at the last step; the warm-up is the first plan's.
    steps = 4 * (summary["epochs"] - 1) + plan["last_epoch_steps"]
    assert load_state(tmp_path / "run")["global_step"] == steps
    warmup = round(record["config"]["warmup_epochs"] * 4)
    assert record["config"]["warmup_epochs"] == pytest.approx(0.25 * 13)
    assert load_state(tmp_path / "run")["rows"][-1][1] == pytest.approx(
        record["config"]["lr"] * lr_multiplier("onecycle", steps - 1, steps, warmup))


def test_a_replanned_budget_run_resumes_bitwise(folder, tmp_path, monkeypatch):
    clock = FakeClock(monkeypatch)

    def slow(epoch, step):
        clock.STEP = 2.0
        return False

    whole = train(tiny_config(folder, tmp_path / "whole", epochs=None, budget=60.0), stop=slow)
    last = whole["epochs"]
    assert whole["budget"]["replans"] and last < whole["budget"]["measured_epochs"]
    clock.now, clock.STEP = 0.0, 1.0
    # Killed in the last epoch, after every re-plan; the resumed run keeps the re-planned length.
    cut = train(tiny_config(folder, tmp_path / "cut", epochs=None, budget=60.0),
                stop=lambda epoch, step: slow(epoch, step) or (epoch, step) == (last, 1))
    assert cut["interrupted"]
    resumed = train(TrainConfig(resume=str(tmp_path / "cut"), quiet=True))
    assert resumed["epochs"] == last and resumed["stopped"] == "completed"
    assert _same_weights(_weights(tmp_path / "whole"), _weights(tmp_path / "cut"))


def test_cli_end_line_says_how_the_budget_was_spent(folder, tmp_path, monkeypatch, capsys):
    from reslab.cli import main

    FakeClock(monkeypatch)
    args = ["train", "--data", str(folder), "--model", "resnet8", "--image-size", "16", "--batch-size", "8",
            "--val-split", "0.25", "--data-dir", str(folder.parent / "cache"), "--out", str(tmp_path / "run"),
            "--budget", "30s", "--flip", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    # (0.98 x 30 - 5.5 - 0.5) // 4.25 = 5 epochs, then a 6th of the 1 step that fits after its validation
    # pass; the end measures flipping on the validation split (2 passes: the images and their mirror
    # images): 5.5 + 5 x 4.25 + 0.25 + 1 + 0.5 = 28.5 s of the 30.
    assert out[-1].startswith("used 28.5s of 30s (95%): 6s loading and measuring (1 s a step), then 6 epochs "
                              "planned at 4.2s each with evaluation and checkpoint, and 0.5s for the final "
                              "evaluations"), out[-1]
    assert "the last epoch shortened to the 1 of its 4 steps that fit" in out[-1]


def test_budget_refusals_say_why(folder, tmp_path, monkeypatch):
    from reslab.cli import build_parser
    from reslab.cli.train import config_from_args
    from reslab.train.config import format_duration, parse_duration

    assert [parse_duration(t) for t in ("15m", "900s", "1h", "1h30m", "90")] == [900, 900, 3600, 5400, 90]
    assert format_duration(5400) == "1h30m" and format_duration(42.5) == "42.5s"
    for bad in ("soon", "15 minutes", "-5m", "0s"):
        with pytest.raises(ReslabError, match=f"--budget {bad}"):
            parse_duration(bad)
    args = build_parser().parse_args(["train", "--budget", "15m", "--epochs", "3"])
    with pytest.raises(ReslabError, match=r"--budget 15m chooses the number of epochs.*--epochs 3"):
        config_from_args(args).resolve()
    assert config_from_args(build_parser().parse_args(["train", "--budget", "1h30m"])).budget == 5400
    with pytest.raises(ReslabError, match="--resume"):
        config_from_args(build_parser().parse_args(["train", "--resume", str(tmp_path), "--budget", "5m"]))
    # Nothing fits: one line with the measured epoch time and a budget that would do.
    FakeClock(monkeypatch)
    with pytest.raises(ReslabError, match=r"--budget 6s: one epoch .* takes about 4 s .*give at least --budget 1m"):
        train(tiny_config(folder, tmp_path / "short", epochs=None, budget=6.0))


# --- photo-folder defaults ---------------------------------------------------------------------


def test_photo_folder_defaults_apply_to_folders_from_scratch_only(folder):
    from reslab.data.folder import PHOTO_DEFAULTS, SMALL_COLOUR_RECIPE, SMALL_IMAGE_RECIPE, SMALL_PHOTO_MODEL

    photos = make_folder(folder.parent / "photos", per_class=4, size=64)  # photos: resnet18 at 112 px
    photo = TrainConfig(data=str(photos)).resolve()
    for key, value in PHOTO_DEFAULTS.items():
        assert getattr(photo, key) == value, key
    small = TrainConfig(data=str(folder)).resolve()  # 16 px colour images: the CIFAR net at its own size
    assert (small.model, small.stem, small.image_size, small.augment, small.flip, small.lr) == (
        *SMALL_PHOTO_MODEL.values(), SMALL_COLOUR_RECIPE["augment"], None, PHOTO_DEFAULTS["lr"])
    gray = make_folder(folder.parent / "gray", per_class=4, size=16, gray=True)  # digits' kind: no mirror
    small = TrainConfig(data=str(gray)).resolve()
    assert (small.model, small.stem, small.image_size, small.augment, small.flip, small.lr) == (
        *SMALL_PHOTO_MODEL.values(), *SMALL_IMAGE_RECIPE.values(), TrainConfig().resolve().lr)
    # An explicit --model keeps its own stem and native input; --image-size or --augment win alone.
    assert TrainConfig(data=str(folder), model="resnet20").resolve().image_size is None
    explicit = TrainConfig(data=str(photos), image_size=64, augment="folder", ema=0.0).resolve()
    assert (explicit.model, explicit.image_size, explicit.augment, explicit.ema) == (
        PHOTO_DEFAULTS["model"], 64, "folder", 0.0)
    assert TrainConfig(data=str(folder), budget=60.0).resolve().epochs is None  # the budget decides
    assert TrainConfig(data=str(folder), optimizer="adamw").resolve().lr == 3e-3  # the photo lr is SGD's
    # Digits, a fine-tuning run and the paper recipe are as they were.
    for cfg in (TrainConfig(), TrainConfig(data=str(folder), pretrained="x.pt", recipe="finetune"),
                TrainConfig(data=str(folder), recipe="paper")):
        resolved = cfg.resolve()
        assert resolved.model == "resnet20" and resolved.image_size is None and resolved.augment is None
        assert (resolved.mixup, resolved.cutmix, resolved.ema, resolved.random_erasing) == (0, 0, 0, 0)


def test_small_colour_images_and_cifar_under_a_budget_take_the_quarter_width_resnet9(folder, tmp_path):
    """Measured on the CIFAR-10 JPEG copy's 45k/5k split (benchmarks/RESULTS.md, "CIFAR-10 in 30
    minutes: the net"): under a 30-minute budget myrtle_resnet9_quarter beat resnet20 (0.861 against
    0.838); a fixed number of epochs and small gray images keep resnet20."""
    from reslab.data.folder import PHOTO_DEFAULTS, SMALL_COLOUR_BUDGET_MODEL
    from reslab.train.loop import _photo_lines

    quarter = SMALL_COLOUR_BUDGET_MODEL["model"]
    budget = TrainConfig(data=str(folder), budget=600.0).resolve()  # 16 px colour images
    assert (budget.model, budget.image_size, budget.augment, budget.lr, budget.epochs) == (
        quarter, 32, "cifar", PHOTO_DEFAULTS["lr"], None)
    assert TrainConfig(data=str(folder), epochs=3).resolve().model == "resnet20"
    gray = make_folder(tmp_path / "gray", per_class=4, size=16, gray=True)
    assert TrainConfig(data=str(gray), budget=600.0).resolve().model == "resnet20"
    # The CIFAR data sets take the same choice under a budget, and only then.
    for data in ("cifar10", "cifar100"):
        cifar = TrainConfig(data=data, budget=600.0).resolve()
        assert (cifar.model, cifar.lr, cifar.augment) == (quarter, PHOTO_DEFAULTS["lr"], "cifar"), data
        plain = TrainConfig(data=data, epochs=2).resolve()
        assert (plain.model, plain.lr, plain.augment) == ("resnet20", TrainConfig().resolve().lr, None), data
    given = TrainConfig(data="cifar10", budget=600.0, model="resnet32", lr=0.1).resolve()
    assert (given.model, given.lr, given.image_size) == ("resnet32", 0.1, None)
    assert TrainConfig(data="digits", budget=600.0).resolve().model == "resnet20"
    # The start line says what the budget chose, and for which data.
    given = TrainConfig(data="cifar10", budget=600.0)
    cifar_line, = _photo_lines(given, given.resolve())
    assert cifar_line.startswith("CIFAR from scratch (CIFAR's 32 px colour images under a budget")
    assert f"{quarter} at 32 px, --lr 0.05, --augment cifar" in cifar_line and '"CIFAR-10"' in cifar_line
    folder_line, = _photo_lines(TrainConfig(data=str(folder), budget=600.0), budget)
    assert folder_line.startswith("photo folder from scratch (")
    assert "under a budget take Page's ResNet-9" in folder_line


@pytest.mark.parametrize("count, side, expected", [(1_800, 300, ("resnet18", 112, 30)),
                                                   (60_000, 28, ("resnet20", 32, 6)),
                                                   (6_000, 500, ("resnet18", 112, 10))])
def test_photo_defaults_follow_the_folders_image_size_and_count(monkeypatch, count, side, expected):
    from reslab.data import folder as folder_module

    monkeypatch.setattr(folder_module, "folder_facts", lambda spec: (count, side, False))
    chosen, why = folder_module.photo_choice("anything")
    assert (chosen["model"], chosen["image_size"], chosen["epochs"]) == expected
    assert why.startswith(f"{count:,} images of about {side} px")
    assert ("epochs show about" in why) == (expected[2] != 30)
    # Under --budget the budget fixes the epochs: the reason names none.
    assert "epochs" not in folder_module.photo_choice("anything", budget=True)[1]


def test_folder_facts_reads_headers_and_counts_images(folder):
    from reslab.data.folder import folder_facts

    assert folder_facts(str(folder)) == (36, 16, False)
    assert folder_facts(str(make_folder(folder.parent / "gray16", per_class=2, gray=True))) == (6, 16, True)


def test_photo_defaults_are_printed_with_the_reason(folder, tmp_path, capsys):
    from reslab.cli import main

    gray = make_folder(tmp_path / "gray", gray=True)
    args = ["train", "--data", str(gray), "--model", "resnet8", "--image-size", "16", "--epochs", "1",
            "--batch-size", "8", "--val-split", "0.25", "--data-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "run")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert ("photo folder from scratch (36 images of about 16 px: small gray images take the CIFAR net at 32 px, "
            "the recipe's lr, no augmentation and no mirror): --augment none, --no-flip") in err
    assert "override" in err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["augment"] == "none"


# --- each ingredient acts and is recorded --------------------------------------------------------


@pytest.mark.parametrize("option", [{"random_erasing": 1.0}, {"mixup": 1.0}, {"cutmix": 1.0},
                                    {"augment": "trivial"}, {"stem": "deep"}])
def test_each_ingredient_changes_training_and_is_recorded(folder, tmp_path, option):
    import dataclasses

    off = {"random_erasing": 0.0, "mixup": 0.0, "cutmix": 0.0, "augment": "folder"}
    base = tiny_config(folder, tmp_path / "off", epochs=1, **off)
    if "stem" in option:  # an ImageNet net's stem
        base = dataclasses.replace(base, model="resnet18", image_size=32)
    train(base)
    train(dataclasses.replace(base, out=str(tmp_path / "on"), **option))
    a, b = _weights(tmp_path / "off"), _weights(tmp_path / "on")
    assert not (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)), f"{option} changed nothing"
    key, value = next(iter(option.items()))
    assert json.loads((tmp_path / "on" / "config.json").read_text())["config"][key] == value


def test_ema_is_evaluated_and_kept_as_the_best_weights_when_better(folder, tmp_path):
    from reslab.checkpoint import load_model

    run = tmp_path / "run"
    summary = train(tiny_config(folder, run, epochs=3, ema=0.5))
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[-2:] == ["ema_val_loss", "ema_val_acc"]
    state = load_state(run)
    assert set(state["ema"]) == set(state["model"])
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    best_of_each = max(max(r[5], r[8]) for r in state["rows"])
    assert summary["best_val_acc"] == best_of_each and summary["best_weights"] in ("model", "ema")
    _, meta = load_model(run)
    assert meta.extra["weights"] == summary["best_weights"]
    assert json.loads((run / "config.json").read_text())["config"]["ema"] == 0.5
    # Without validation data the run's product is the average itself.
    plain = tmp_path / "noval"
    summary = train(tiny_config(folder, plain, epochs=2, ema=0.5, val_split=0.0))
    best, ema = load_file(plain / "best.safetensors"), load_state(plain)["ema"]
    assert summary["best_weights"] == "ema" and all(torch.equal(best[k], ema[k]) for k in best)


def test_training_measures_test_time_flipping_on_validation_and_records_what_pays(folder, tmp_path):
    from reslab.checkpoint import load_model
    from reslab.data import load_data
    from reslab.inference.predictor import Predictor

    run = tmp_path / "run"
    summary = train(tiny_config(folder, run, epochs=2, augment="folder", flip=True, precision="fp32"))
    accs, (gained, lost) = summary["tta_val_acc"], summary["tta_gained_lost"]
    assert summary["tta"] == ("flip" if train_budget.choose_tta(gained, lost) else "none")
    _, meta = load_model(run)
    assert meta.extra["tta"] == summary["tta"] and meta.extra["tta_val_acc"] == accs
    assert accs["flip"] - accs["none"] == pytest.approx((gained - lost) / 9)  # 9 validation images
    # The accuracies are the best weights' on the validation split, without and with the mirror image.
    assert accs["none"] == summary["best_val_acc"]
    val = load_data(str(folder), image_size=16, val_split=0.25, data_dir=str(folder.parent / "cache"), quiet=True).val
    for mode in ("none", "flip"):
        predicted = Predictor(run, backend="torch", precision="fp32", tta=mode).probabilities(val.images).argmax(1)
        assert (predicted == val.labels).double().mean().item() == pytest.approx(accs[mode])
    # Data that is not a photo folder (no mirrored training images) is not measured.
    assert "tta" not in train(tiny_config(folder, tmp_path / "plain", epochs=1, augment="none"))


def test_weight_ema_follows_the_update_rule():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = train_steps.WeightEMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(4, 3))  # BatchNorm statistics and its step count move too
    ema.update(model, step=100)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(ema.model.state_dict()[k], 0.9 * start[k] + 0.1 * v), k
        else:
            assert torch.equal(ema.model.state_dict()[k], v)
    ema.update(model, step=0)  # warm-up: min(decay, 1/10) keeps 10% of the average, 90% of the model
    assert all(not p.requires_grad for p in ema.model.parameters())


def test_cli_fills_every_new_option():
    from reslab.cli import build_parser
    from reslab.cli.train import config_from_args

    args = build_parser().parse_args(["train", "--mixup", "0.2", "--cutmix", "1", "--ema", "0.99", "--random-erasing",
                                      "0.25", "--stem", "deep", "--augment", "trivial", "--budget", "5m"])
    cfg = config_from_args(args)
    assert (cfg.mixup, cfg.cutmix, cfg.ema, cfg.random_erasing, cfg.stem, cfg.augment, cfg.budget) == (
        0.2, 1.0, 0.99, 0.25, "deep", "trivial", 300.0)
    for bad, match in (({"ema": 1.0}, "--ema"), ({"random_erasing": 1.5}, "--random-erasing"),
                       ({"mixup": -1.0}, "--mixup"), ({"stem": "tiny"}, "--stem must be one of")):
        with pytest.raises(ReslabError, match=match):
            TrainConfig(**bad).resolve()


# --- augmentation ops ------------------------------------------------------------------------


def _photo() -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :24]
    pixels = np.stack([xx * 9, yy * 7, (xx + yy) * 4], -1) + rng.integers(0, 30, (24, 24, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()


def test_trivial_colour_ops_match_pil():
    from reslab.data.augment import TRIVIAL_MAX, TRIVIAL_OPS, trivial_colour

    image = _photo()
    x = _tensor(image)

    def op(name, strength=0.5):
        return trivial_colour(x, torch.tensor([TRIVIAL_OPS.index(name)]), torch.tensor([strength], dtype=torch.float64))

    assert torch.equal(op("equalize"), _tensor(ImageOps.equalize(image)))
    assert (op("autocontrast") - _tensor(ImageOps.autocontrast(image))).abs().max() <= 1
    for name, enhance in (("brightness", ImageEnhance.Brightness), ("color", ImageEnhance.Color),
                          ("contrast", ImageEnhance.Contrast), ("sharpness", ImageEnhance.Sharpness)):
        factor = 1 + 0.5 * TRIVIAL_MAX[name]
        assert (op(name) - _tensor(enhance(image).enhance(factor))).abs().max() <= 1.5, name
    assert torch.equal(op("solarize", 0.5), _tensor(ImageOps.solarize(image, 128)))
    assert torch.equal(op("posterize", 0.5), _tensor(ImageOps.posterize(image, 6)))
    assert torch.equal(op("identity"), x) and torch.equal(op("rotate"), x)  # geometry is affine_matrices' job


def test_trivial_policy_is_a_pure_function_of_the_generator_and_changes_colours():
    from reslab.data.augment import POLICIES, augment

    flat = torch.full((256, 3, 16, 16), 100, dtype=torch.uint8)
    flat[:, 0] = 180
    a = augment(flat, POLICIES["trivial"], torch.Generator().manual_seed(3))
    b = augment(flat, POLICIES["trivial"], torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    geometric_only = augment(flat, POLICIES["folder"], torch.Generator().manual_seed(3))
    assert torch.allclose(geometric_only, flat.float(), atol=1e-3)  # a flat image stays flat under geometry
    changed = (a - flat.float()).abs().amax((1, 2, 3)) > 1
    assert 30 < int(changed.sum()) < 200  # colour ops hit some images; identity and geometry leave others


def test_random_erasing_sets_one_rectangle_to_the_mean():
    from reslab.data.augment import erase

    x = torch.ones(32, 3, 20, 20)
    assert torch.equal(erase(x, 0.0, torch.Generator().manual_seed(0)), x)
    out = erase(x, 1.0, torch.Generator().manual_seed(0))
    erased = out == 0
    assert erased.all(1).any((1, 2)).all()  # every image, all channels together
    area = erased[:, 0].float().mean((1, 2))
    assert ((area >= 0.01) & (area <= 0.45)).all()
    rows, cols = erased[:, 0].any(2), erased[:, 0].any(1)
    assert torch.equal(erased[:, 0].sum((1, 2)), rows.sum(1) * cols.sum(1))  # a rectangle


@pytest.mark.parametrize("mixup, cutmix", [(1.0, 0.0), (0.0, 1.0)])
def test_mix_makes_soft_targets_that_match_the_pixels(mixup, cutmix):
    from reslab.data.augment import mix

    n = 8
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 10, 10).clone()
    y = torch.arange(n) % 4
    mixed, target = mix(x, y, 4, mixup=mixup, cutmix=cutmix, generator=torch.Generator().manual_seed(5))
    assert target.shape == (n, 4) and torch.allclose(target.sum(1), torch.ones(n))
    # The share of image i in mixed image i is lambda, for pixels (mixup) or area (cutmix).
    own = (mixed == x).float().mean((1, 2, 3)) if cutmix else (mixed - x.flip(0)) / (x - x.flip(0))
    lam = float(own.flatten()[0]) if cutmix else float(own[0, 0, 0, 0])
    assert 0 <= lam <= 1
    expected = torch.nn.functional.one_hot(y, 4) * lam + torch.nn.functional.one_hot(y.flip(0), 4) * (1 - lam)
    assert torch.allclose(target, expected, atol=1e-6)


# --- the stem option -------------------------------------------------------------------------


def test_stem_option_builds_timms_deep_stem_and_keeps_torchvision_by_default():
    from reslab import create_model

    default = create_model("resnet18", num_classes=2)
    assert default.conv1.kernel_size == (7, 7) and default.maxpool is not None
    deep = create_model("resnet18", num_classes=2, stem="deep")
    keys = [k for k in deep.state_dict() if k.startswith("conv1.") and k.endswith("weight")]
    assert keys == ["conv1.0.weight", "conv1.1.weight", "conv1.3.weight", "conv1.4.weight", "conv1.6.weight"]
    assert [tuple(deep.state_dict()[k].shape[:2]) for k in keys[::2]] == [(32, 3), (32, 32), (64, 32)]
    assert deep(torch.randn(2, 3, 64, 64)).shape == (2, 2)
    assert create_model("resnet20", stem="cifar").state_dict().keys() == create_model("resnet20").state_dict().keys()
    with pytest.raises(ReslabError, match=r"stem must be one of .*got 'big'"):
        create_model("resnet18", stem="big")
    with pytest.raises(ReslabError, match="stem picks a ResNet's stem"):
        create_model("googlenet", stem="deep")
    with pytest.raises(ReslabError, match="belongs to the ImageNet nets"):
        create_model("resnet20", stem="deep")
