"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates", section 3.3; fastai's `lr_find`).

    result = find_lr(run, make_step) # a Run from reslab.train.loop._setup, and steps.make_step
    result.suggestion, result.rule   # e.g. 0.0832, "minimum"

The lr grows exponentially from `start_lr` to `end_lr` over `steps` optimizer steps of the very
training the run would do (its loader, augmentation, loss, precision, optimizer and parameter
groups), on copies of the model and optimizer: the run's own weights, optimizer state and RNG are
left as they were. The lr swept is the peak lr (`--lr`): every parameter group keeps its ratio to
it, so the finetune recipe's head and earlier stages move together. The loss is smoothed as fastai
does (an exponential moving average with beta 0.98, debiased as Adam's moments are); the test stops
when the smoothed loss exceeds DIVERGE_FACTOR x its best so far, or a loss is NaN or infinite.

Two rules read a suggestion off the smoothed losses; both leave out the first tenth of the
planned steps (the average is still warming up: its first points are single batches).

- "minimum" (the default): the lr at the lowest smoothed loss. Smith ("A disciplined approach to
  neural network hyper-parameters", 2018) takes the peak of a one-cycle schedule where the
  range test's loss stops falling, and reslab's recipes are SGD with Nesterov momentum on a one-cycle
  schedule with a warm-up; the smoothing lags the raw loss a little, so this is about where the raw
  loss has begun to rise. Measured against the recipes' own lrs in benchmarks/RESULTS.md.
- "valley": fastai's (fastai.callback.schedule.valley, fastai 2.5, its default for Adam): less
  also the last VALLEY_SKIP_END points (the climb into divergence), the longest decreasing
  subsequence of the points (so a noisy step does not cut the descent short); the valley is that
  many points ending where it ends, and the suggestion the lr half way along it: past the flat
  start, well before the minimum, where the loss is still falling steadily. On reslab's SGD recipes
  it lands 10-140x below their lr and trains worse (RESULTS.md); for Adam it is fastai's choice.

When fewer than VALLEY_MIN_POINTS points are left for the rule (the loss diverged almost at once),
the rule is "minimum/10": a tenth of the lr at the lowest smoothed loss of the whole short curve.

`reslab train --lr-find` (`before_training`) runs it on rank 0 and trains at the suggestion;
`reslab lr-find` (reslab.cli.lr_find) writes lr_find.png and lr_find.json.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from reslab.errors import ReslabError

START_LR, END_LR, STEPS = 1e-7, 10.0, 100
SMOOTHING = 0.98  # fastai's Recorder: beta of the loss's moving average
DIVERGE_FACTOR = 4.0  # fastai's LRFinder: stop once the smoothed loss passes 4x its best
VALLEY_SKIP_END = 5  # fastai's lr_find leaves out the last 5 points and the first tenth
VALLEY_MIN_POINTS = 5
RULES = ("minimum", "valley")  # the rules a user can choose (--rule, --lr-find RULE)
DEFAULT_RULE = "minimum"
SHORT_CURVE_RULE = "minimum/10"
LR_FIND_PNG, LR_FIND_JSON = "lr_find.png", "lr_find.json"


@dataclass
class LRFind:
    """What a range test saw and suggests (lr_find.json's content)."""

    lrs: list[float]  # the peak lr of each step taken
    losses: list[float]  # the smoothed loss after each step
    raw_losses: list[float]
    suggestion: float
    rule: str  # the rule asked for (one of RULES), or SHORT_CURVE_RULE
    suggestions: dict[str, float]  # what every one of RULES suggests, for comparison
    stopped: str  # "diverged" (smoothed loss > DIVERGE_FACTOR x best), "not finite" or "completed"
    start_lr: float
    end_lr: float
    planned_steps: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def steps(self) -> int:
        return len(self.lrs)


def check_range(start_lr: float, end_lr: float, steps: int) -> None:
    if not (math.isfinite(start_lr) and math.isfinite(end_lr) and 0 < start_lr < end_lr):
        raise ReslabError(f"the lr range test needs 0 < --start-lr < --end-lr, got {start_lr:g} and {end_lr:g}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2 * VALLEY_SKIP_END + VALLEY_MIN_POINTS:
        raise ReslabError(f"--steps must be an integer of at least {2 * VALLEY_SKIP_END + VALLEY_MIN_POINTS} "
                          f"(the suggestion needs a curve), got {steps!r}")


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ReslabError(f"unknown lr finder rule {rule!r}: choose one of {', '.join(RULES)}")


def sweep(step: Callable[[float], float], *, start_lr: float = START_LR, end_lr: float = END_LR,
          steps: int = STEPS, rule: str = DEFAULT_RULE) -> LRFind:
    """The range test over `step(lr) -> loss`, which sets the lr, takes one optimizer step and
    returns its loss; stops early on divergence. See the module docstring for the rule."""
    check_range(start_lr, end_lr, steps)
    check_rule(rule)
    lrs, losses, raw = [], [], []
    average, best, stopped = 0.0, math.inf, "completed"
    for i in range(steps):
        lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
        loss = float(step(lr))
        if not math.isfinite(loss):
            stopped = "not finite"
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed = average / (1 - SMOOTHING ** (i + 1))
        lrs.append(lr)
        losses.append(smoothed)
        raw.append(loss)
        best = min(best, smoothed)
        if smoothed > DIVERGE_FACTOR * best:
            stopped = "diverged"
            break
    if not lrs:
        raise ReslabError(f"the loss was NaN or infinite at the first step of the lr range test (lr {start_lr:g}); "
                          "give a lower --start-lr, or --grad-clip 1")
    answers = {name: suggest(lrs, losses, steps, name) for name in RULES}  # (lr, rule used) of each rule
    suggestion, used = answers[rule]
    return LRFind(lrs, losses, raw, suggestion, used, {name: lr for name, (lr, _) in answers.items()}, stopped,
                  start_lr, end_lr, steps)


def suggest(lrs: list[float], losses: list[float], planned_steps: int, rule: str = DEFAULT_RULE) -> tuple[float, str]:
    """(lr, rule used): `rule` ("minimum" or "valley"), or "minimum/10" when the curve is too short
    for it (module docstring)."""
    first = planned_steps // 10
    kept = losses[first:len(losses) - (VALLEY_SKIP_END if rule == "valley" else 0)]
    if len(kept) < VALLEY_MIN_POINTS:
        return lrs[_lowest(losses)] / 10, SHORT_CURVE_RULE
    if rule == "minimum":
        return lrs[first + _lowest(kept)], rule
    # longest[i]: the length of the longest decreasing subsequence ending at point i. fastai's valley
    # is the `length` points ending where the longest one ends, and its lr is at int(length/3) +
    # int(length/6) into it (about half way): fastai.callback.schedule.valley, kept exactly.
    longest = [1] * len(kept)
    for i in range(1, len(kept)):
        longest[i] = 1 + max((longest[j] for j in range(i) if kept[i] < kept[j]), default=0)
    end = max(range(len(kept)), key=lambda i: (longest[i], -i))  # the first of the longest
    start = end - longest[end]
    return lrs[first + start + int(longest[end] / 3) + int(longest[end] / 6)], rule


def _lowest(losses: list[float]) -> int:
    return min(range(len(losses)), key=losses.__getitem__)


def _batches(loader) -> Iterator:
    """The loader's epochs one after another (epoch 0, 1, ...): a short loader is cycled."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def find_lr(run, make_step: Callable, *, start_lr: float = START_LR, end_lr: float = END_LR,
            steps: int = STEPS, rule: str = DEFAULT_RULE) -> LRFind:
    """The range test of a reslab.train.loop.Run: its loader, step and optimizer groups, on copies.

    The test trains as the run's first epoch would: with the finetune recipe, the new head alone
    with the body frozen, as fastai's lr_find runs on a frozen learner before `fine_tune`. The lr
    swept is still --lr (the head at head_lr_mult times it), and the suggestion then sets every
    group of both phases: the head's, and after the head epochs each stage's. `make_step` is
    reslab.train.steps' (passed in by the loop, which imports this module)."""
    from reslab.train import state as run_files

    check_range(start_lr, end_lr, steps)
    cfg = run.cfg
    model, optimizer = copy.deepcopy((run.model, run.optimizer))  # one memo: the copy optimizes the copy
    shadow = dataclasses.replace(run, model=model, train_model=model, optimizer=optimizer, ema=None)
    shadow.set_phase(0)
    model.train()
    step = make_step(model, optimizer, precision=run.precision, grad_clip=cfg.grad_clip, loss_fn=run.loss_fn)
    rng = run_files.rng_state()
    batches = _batches(run.loader)
    # Each group's base lr is the recipe's peak lr times the group's ratio (head, earlier stages).
    base = [group["base_lr"] / cfg.lr for group in optimizer.param_groups]

    def one_step(lr: float) -> float:
        for group, ratio in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr * ratio
        x, y = next(batches)
        return step(x, y)[0].item()

    try:
        return sweep(one_step, start_lr=start_lr, end_lr=end_lr, steps=steps, rule=rule)
    finally:
        run_files.set_rng_state(rng)


def scale_lr(run, lr: float) -> None:
    """Train `run` at peak lr `lr`: every parameter group's lr scaled by lr / the config's, so the
    finetune recipe's head and per-stage lrs keep their ratios."""
    factor = lr / run.cfg.lr
    for group in run.optimizer.param_groups:
        group["base_lr"] *= factor
        group["lr"] *= factor
    run.cfg = dataclasses.replace(run.cfg, lr=lr)


def rule_of(lr_find: bool | str) -> str:
    """The rule a config's `lr_find` asks for: True is DEFAULT_RULE, a string names one of RULES."""
    return DEFAULT_RULE if lr_find is True else lr_find


def check_new_run(config) -> None:
    """--lr-find chooses the lr of a new run (a TrainConfig as given, before resolve()): refused with
    --resume, and with an explicit --lr it would override."""
    if config.lr_find not in (False, True):
        check_rule(config.lr_find)
    if config.lr_find and config.resume:
        raise ReslabError(f"--lr-find chooses the lr of a new run, but --resume {config.resume} continues one at its "
                          "own lr; drop --lr-find")
    if config.lr_find and config.lr is not None:
        raise ReslabError(f"--lr-find chooses the lr itself, so --lr {config.lr:g} cannot come with it; drop one of "
                          "them")


def before_training(run, bar, make_step: Callable, saved: dict) -> None:
    """`train --lr-find`: rank 0 runs the range test, every rank trains at its suggestion, and
    config.json records it as "lr_find"; a resumed run keeps the record of its `saved` config.json."""
    cfg, ctx = run.cfg, run.ctx
    if cfg.resume:
        if saved.get("lr_find") is not None:
            run.record["lr_find"] = saved["lr_find"]
        return
    if not cfg.lr_find:
        return
    found = error = None
    if ctx.is_main:
        try:
            found = find_lr(run, make_step, steps=STEPS, rule=rule_of(cfg.lr_find))
        except ReslabError as err:  # every rank raises it, none is left waiting
            error = str(err)
    found, error = ctx.broadcast((found, error))
    if error is not None:
        raise ReslabError(error)
    recipe_lr = cfg.lr
    scale_lr(run, found.suggestion)
    run.record["lr_find"] = {"suggested_lr": found.suggestion, "rule": found.rule, "steps": found.steps,
                             "stopped": found.stopped, "start_lr": found.start_lr, "end_lr": found.end_lr,
                             "recipe_lr": recipe_lr, "lr": run.cfg.lr}
    if ctx.is_main:
        write(run.dir, found, model=cfg.model)
    bar.print(f"lr finder: {line(found)} over {found.steps} steps ({found.stopped}); training at --lr "
              f"{run.cfg.lr:.4g} instead of the recipe's {recipe_lr:g} ({run.dir / LR_FIND_PNG})")


def line(found: LRFind) -> str:
    return f"suggested lr {found.suggestion:.4g} ({found.rule})"


def write(folder: Path, found: LRFind, *, model: str) -> tuple[Path, Path]:
    """lr_find.json and lr_find.png in `folder`."""
    from reslab import plots
    from reslab.io import write_json

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / LR_FIND_JSON, {"model": model, **found.to_dict()})
    png = plots.lr_find(folder / LR_FIND_PNG, found.lrs, found.losses, found.suggestion, found.rule,
                      found.suggestions)
    return folder / LR_FIND_JSON, png
