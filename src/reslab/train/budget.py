"""A `--budget` run's plan, and the measurements that end a run.

A budget run measures its step, evaluation and checkpoint times on copies of the model and
optimizer (`measure`), then fixes the epochs that fit (`plan`): the real model, optimizer and RNG
are untouched by the measurement, so the run is the very run `--epochs N` would be (but for its
last epoch, which the plan shortens to the steps that fit when a tenth of an epoch or more does:
`budget_fit`, "last_epoch_steps" in config.json, reslab.train.run.Run.epoch_steps). A few seconds
of steps do not always predict the epochs (a photo folder's were 1.7x too slow in one run, a CIFAR
folder's 10-20 % too fast in another), so before each epoch after the first the plan is fitted
again to the epochs really run (`replan`): it ends within a few steps of BUDGET_AIM of the budget.
A re-plan changes the schedule's length from that epoch on (the lr follows the new length; the
warm-up stays); config.json records the new length before the epoch starts, so a killed run
resumes exactly. A resumed run keeps its last plan (its budget's clock ended with the first process).

The end of a run measures test-time flipping on the validation split (`measure_tta`, ruled by
`choose_tta`); the plan counts its passes.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from reslab.checkpoint import BEST, read_weights, save_weights
from reslab.errors import ReslabError
from reslab.train import records, steps
from reslab.train.config import format_duration
from reslab.train.run import BudgetClock, Run
from reslab.train.state import EpochRow, Progress

if TYPE_CHECKING:
    from reslab.train.bar import EpochBar

# The wall clock of budgets and epoch times (a test replaces it with a fake one).
clock = time.perf_counter
# A budget's measurement: steps run before timing (the first ones build kernels and allocate), and
# how long the timed steps run: this share of the budget, within the bounds, at least 3 steps.
BUDGET_WARMUP_STEPS = 2
BUDGET_MEASURE_SHARE, BUDGET_MEASURE_BOUNDS = 0.01, (1.0, 30.0)
BUDGET_MEASURE_EPOCHS = 10  # the most epochs of batches the measurement may run through
# The plan ends the run by this share of the budget: what follows the last evaluation (the summary,
# the process's exit) and the epochs' noise take the rest.
BUDGET_AIM = 0.98
# The last epoch of a plan may be shortened to the steps that fit, down to this share of an epoch.
MIN_LAST_EPOCH = 0.1
# curves.png is redrawn after an epoch only when it is this old (seconds), and when the run stops.
CURVES_EVERY = 30.0


def budget_epochs(budget: float, spent: float, epoch_seconds: float, final_seconds: float) -> int:
    """The most whole epochs of `epoch_seconds` (steps, evaluation, checkpoint) that fit in what is
    left of BUDGET_AIM x `budget` after the `spent` seconds (loading, measuring, the epochs so far)
    and the `final_seconds` (the test pass) still to come; may be 0 or less: nothing fits."""
    return int((BUDGET_AIM * budget - spent - final_seconds) // max(epoch_seconds, 1e-9))


def budget_fit(budget: float, spent: float, epoch_seconds: float, fixed_seconds: float, steps_per_epoch: int,
               final_seconds: float) -> tuple[int, int]:
    """(epochs, steps of the last one): budget_epochs' whole epochs, then, when at least
    MIN_LAST_EPOCH of an epoch's steps fit in what they leave (after the last epoch's own evaluation
    and files, `fixed_seconds`), one more epoch shortened to those steps. Whole epochs alone leave up
    to one epoch of the budget unused: a CIFAR epoch of 45k images is 14 % of 15 minutes here."""
    whole = budget_epochs(budget, spent, epoch_seconds, final_seconds)
    if whole < 0:
        return whole, steps_per_epoch
    step_seconds = max(epoch_seconds - fixed_seconds, 1e-9) / steps_per_epoch
    rest = BUDGET_AIM * budget - spent - final_seconds - whole * epoch_seconds - fixed_seconds
    steps = min(int(rest // step_seconds), steps_per_epoch) if rest > 0 else 0
    if steps >= MIN_LAST_EPOCH * steps_per_epoch:
        return whole + 1, steps
    return whole, steps_per_epoch


def plan(run: Run, started: float, bar: EpochBar) -> None:
    """Fix the epochs of a --budget run from this machine's measured step, evaluation and checkpoint
    times: as many whole epochs as fit before the budget ends, the test pass (and the measure of
    test-time flipping) included."""
    cfg, ctx = run.cfg, run.ctx
    times = measure(run)
    steps_per_epoch = len(run.loader)
    test = len(run.test_loader.split) if run.test_loader is not None else 0
    fixed = (2 if run.ema else 1) * times["eval_pass"] + times["overhead"]  # an epoch's evaluation and files
    epoch_seconds = steps_per_epoch * times["step"] + fixed
    final_seconds = test * times["eval_image"] + (2 * times["eval_pass"] if flips(run) else 0.0)  # + tta
    spent = clock() - started
    epochs, last = ctx.broadcast(budget_fit(cfg.budget, spent, epoch_seconds, fixed, steps_per_epoch,
                                            final_seconds))  # rank 0's decides
    budget = format_duration(cfg.budget)
    if epochs <= cfg.head_epochs:
        least = (spent + (cfg.head_epochs + 1) * epoch_seconds + final_seconds) / BUDGET_AIM
        raise ReslabError(f"--budget {budget}: one epoch of {cfg.model} on {cfg.data} takes about "
                          f"{epoch_seconds:.0f} s on this machine (measured; {spent:.0f} s went to loading and "
                          f"measuring), so no {'training' if not cfg.head_epochs else 'epoch after the head epochs'} "
                          f"fits; give at least --budget {format_duration(60 * -(-least // 60))}, or --epochs")
    run.cfg = cfg.with_epochs(epochs)
    run.budget = {"seconds": cfg.budget, "epochs": epochs, "last_epoch_steps": last, "measured_epochs": epochs,
                  "steps_per_epoch": steps_per_epoch, "step_seconds": round(times["step"], 4),
                  "epoch_seconds": round(epoch_seconds, 2), "fixed_seconds": round(fixed, 2),
                  "final_seconds": round(final_seconds, 2), "setup_seconds": round(spent, 1),
                  "planned_seconds": round(spent + _epochs_seconds(epochs, last, steps_per_epoch, epoch_seconds,
                                                                   fixed) + final_seconds, 1),
                  "measured_steps": times["steps"], "aim": BUDGET_AIM, "replans": []}
    run.budget_clock = BudgetClock(started)
    bar.print(f"budget {budget}: {epochs_words(epochs, last, steps_per_epoch)} ({times['step']:.3g} s a step over "
              f"{times['steps']} measured steps, {epoch_seconds:.1f} s an epoch with evaluation and checkpoint; "
              f"{spent:.0f} s to load and measure); re-planned from the real epochs as they run")


def replan(run: Run, bar: EpochBar) -> None:
    """Before an epoch: fit the epochs still to run to the real epochs so far (their mean wall time,
    evaluation and files included), if the plan would end past BUDGET_AIM of the budget or leave a
    whole epoch of it unused. A plan with no epoch left ends the run ("completed")."""
    watch, p = run.budget_clock, run.progress
    if watch is None:  # not a budget run, or a resumed one
        return
    now = clock()
    if watch.epochs_started is None:
        watch.epochs_started = now
        return
    if p.epoch < 1 or p.stopped != "running":
        return
    epoch_seconds = (now - watch.epochs_started) / p.epoch  # a new run's whole epochs, all timed here
    final_seconds, per_epoch = run.budget["final_seconds"], len(run.loader)
    fixed = min(run.budget["fixed_seconds"], epoch_seconds)  # the measured evaluation and files, within an epoch
    more, last = budget_fit(run.budget["seconds"], now - watch.started, epoch_seconds, fixed, per_epoch,
                            final_seconds)
    epochs, last = run.ctx.broadcast((p.epoch + max(more, 0), last if more > 0 else per_epoch))  # rank 0's decides
    if (epochs, last) == (run.cfg.epochs, run.budget["last_epoch_steps"]):
        return
    if epochs == run.cfg.epochs and p.epoch + 1 < epochs and (
            abs(last - run.budget["last_epoch_steps"]) < MIN_LAST_EPOCH * per_epoch):
        return  # the last epoch moves by less than a tenth of an epoch: settled before it begins
    before = epochs_words(run.cfg.epochs, run.budget["last_epoch_steps"], per_epoch)
    # A line when the epochs change or the run ends; a last epoch that only grows or shrinks (an
    # hour's plan drifts with the host: 16 re-plans in one run) is recorded in config.json alone.
    told = epochs != run.cfg.epochs or epochs == p.epoch
    run.cfg = run.cfg.with_epochs(epochs)
    planned = now - watch.started + _epochs_seconds(epochs - p.epoch, last, per_epoch, epoch_seconds,
                                                    fixed) + final_seconds
    run.budget.update(epochs=epochs, last_epoch_steps=last, planned_seconds=round(planned, 1))
    run.budget["replans"].append({"after_epoch": p.epoch, "epochs": epochs, "last_epoch_steps": last,
                                  "epoch_seconds": round(epoch_seconds, 2),
                                  "elapsed_seconds": round(now - watch.started, 1)})
    records.write_config(run)
    now_words = epochs_words(epochs, last, per_epoch)
    ends = "no further epoch fits: the run ends" if epochs == p.epoch else f"{now_words} now, not {before}"
    if told:
        bar.print(f"budget {format_duration(run.budget['seconds'])}: real epochs take {epoch_seconds:.1f} s, not the "
                  f"{run.budget['epoch_seconds']:.1f} s measured: {ends} (planned end at {format_duration(planned)})")
    if epochs == p.epoch:
        p.stopped = "completed"


def _epochs_seconds(epochs: int, last: int, steps_per_epoch: int, epoch_seconds: float, fixed: float) -> float:
    """The seconds of `epochs` epochs of `epoch_seconds`, the last of them shortened to `last` steps."""
    if epochs <= 0:
        return 0.0
    return (epochs - 1) * epoch_seconds + fixed + (epoch_seconds - fixed) * last / steps_per_epoch


def epochs_words(epochs: int, last: int, steps_per_epoch: int) -> str:
    """"6 epochs of 704 steps", or "7 epochs of 704 steps (the last 420)" when the plan shortens the last."""
    words = f"{epochs} epochs of {steps_per_epoch} steps"
    return words if last >= steps_per_epoch else f"{words} (the last {last})"


def measure(run: Run) -> dict:
    """Seconds per training step (augmentation, forward, backward, step, EMA), of one validation
    pass, per evaluated image, and of one epoch's files (checkpoint, best weights, records), timed
    on copies: the run's model, optimizer, EMA, RNG and files are left as they were."""
    cfg = run.cfg
    model, optimizer = copy.deepcopy((run.model, run.optimizer))  # one memo: the copy optimizes the copy
    ema = copy.deepcopy(run.ema)
    step = steps.make_step(model, optimizer, precision=run.precision, grad_clip=cfg.grad_clip, loss_fn=run.loss_fn)
    rng = torch.get_rng_state()
    window = min(max(BUDGET_MEASURE_SHARE * cfg.budget, BUDGET_MEASURE_BOUNDS[0]), BUDGET_MEASURE_BOUNDS[1])
    model.train()

    def batches():  # epoch 0's batches, then epoch 1's ...: short epochs are measured over several
        for epoch in range(BUDGET_MEASURE_EPOCHS):
            run.loader.set_epoch(epoch)
            yield from run.loader

    timed, start = 0, clock()
    for i, (x, y) in enumerate(batches()):
        if i == BUDGET_WARMUP_STEPS:
            timed, start = 0, clock()
        step(x, y)
        if ema is not None:
            ema.update(model, i)
        timed += 1
        if i >= BUDGET_WARMUP_STEPS and timed >= 3 and clock() - start >= window:
            break
    step_seconds = (clock() - start) / timed
    eval_loader = run.val_loader or run.test_loader
    eval_pass = eval_image = 0.0
    if eval_loader is not None:
        steps.evaluate_sums(model, [next(iter(eval_loader))], run.precision)  # the first batch builds kernels
        t = clock()
        steps.evaluate_sums(model, eval_loader, run.precision)
        eval_pass = clock() - t
        eval_image = eval_pass / len(eval_loader.split)
    with tempfile.TemporaryDirectory() as tmp:
        # What _end_epoch writes, written by a shadow of the run into a scratch folder.
        rows = [EpochRow(e, 0.1, 1 / e, 0.5, 1 / e, 0.5, 1.0) for e in range(1, 21)]
        shadow = dataclasses.replace(run, dir=Path(tmp), model=model, optimizer=optimizer, ema=ema,
                                     progress=Progress(epoch=len(rows), rows=rows))
        t = clock()
        save_weights(shadow.dir / BEST, model, shadow.meta(1, 0.5))
        records.checkpoint(shadow)
        records.write_records(shadow, curves=False)
        files = clock() - t
        records.draw_curves(shadow)
        curves = clock() - t - files
    torch.set_rng_state(rng)
    epoch = len(run.loader) * step_seconds + (2 if ema else 1) * eval_pass + files
    return {"step": step_seconds, "eval_pass": eval_pass if run.val_loader is not None else 0.0,
            "eval_image": eval_image, "steps": timed,
            # The curves are drawn after at most every CURVES_EVERY seconds' epochs.
            "overhead": files + curves * min(1.0, epoch / CURVES_EVERY)}


# Test-time flip must beat no flip by more than this many standard errors of the paired difference,
# and by more than TTA_MIN_IMAGES images (see choose_tta).
TTA_MIN_SE, TTA_MIN_IMAGES = 2.0, 2


def choose_tta(gained: int, lost: int) -> bool:
    """Whether test-time flipping pays, from the validation images it turned right (`gained`) and
    wrong (`lost`) against no flipping (the images both get right or both get wrong say nothing).

    Flipping doubles the cost of every later prediction, so it has to pay clearly, not by chance.
    If it made no difference in expectation, each of the g + l images on which the two disagree
    would go either way with probability 1/2 (McNemar's test), so g - l has mean 0 and standard
    deviation sqrt(g + l). Flip is chosen when g - l exceeds TTA_MIN_SE = 2 of those standard
    errors (a chance gain that large is about 2% likely) and TTA_MIN_IMAGES = 2 images (with few
    disagreements the normal approximation fails, and one or two images are noise whatever the
    ratio). E.g. 12 gained and 5 lost: 7 > max(2, 2 x 4.1) is false, flip not chosen; 40 and 15: 25
    > 2 x 7.4, chosen."""
    return gained - lost > max(TTA_MIN_IMAGES, TTA_MIN_SE * (gained + lost) ** 0.5)


def flip_sums(model: nn.Module, loader, precision: str) -> torch.Tensor:
    """[count, correct without flip, correct with flip, gained, lost] over a loader, as sums so ranks
    can add them; "with flip" is reslab.inference.Predictor's --tta flip (flip_probabilities), from
    the same plain logits: two passes over the images, not three."""
    from reslab.inference.predictor import flip_average

    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(x)
                plain = logits.argmax(1) == y
                flipped = flip_average(logits, model(x.flip(-1))).argmax(1) == y
            sums += torch.stack([torch.tensor(float(len(y)), dtype=torch.float64, device=device),
                                 plain.sum().double(), flipped.sum().double(), (flipped & ~plain).sum().double(),
                                 (plain & ~flipped).sum().double()])
    return sums


def flips(run: Run) -> bool:
    """Whether test-time flipping is worth measuring: a photo folder with a validation split, trained
    with mirrored images (a model that never saw a mirror image is not asked about one)."""
    from reslab.data.folder import is_image_folder

    return run.val_loader is not None and bool(run.record.get("flip")) and is_image_folder(run.cfg.data)


def measure_tta(run: Run) -> dict:
    """Validation accuracy of the best weights (loaded in run.model) without and with "flip", and the
    images flipping turned right and wrong. If flipping pays by choose_tta's margin, best.safetensors
    records it (extra "tta") and evaluate/predict/serve use it by default; the accuracies are recorded
    either way (extra "tta_val_acc")."""
    keys = ("count", "none", "flip", "gained", "lost")
    sums = dict(zip(keys, flip_sums(run.model, run.val_loader, run.precision).tolist()))
    sums = run.ctx.all_reduce_sums(sums)
    gained, lost = round(sums["gained"]), round(sums["lost"])
    accs = {mode: sums[mode] / sums["count"] for mode in ("none", "flip")}
    chosen = "flip" if choose_tta(gained, lost) else "none"
    if run.ctx.is_main and (run.dir / BEST).is_file():
        meta = read_weights(run.dir / BEST)[1]
        meta.extra.update(tta=chosen, tta_val_acc=accs, tta_gained_lost=[gained, lost])
        save_weights(run.dir / BEST, run.model, meta)
    return {"tta": chosen, "tta_val_acc": accs, "tta_gained_lost": [gained, lost]}

