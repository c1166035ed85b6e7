"""The training loop: set up once, then epochs of flat steps; a checkpoint is a plain dict.

    summary = train(TrainConfig(model="resnet20", data="digits"))

`train` claims the run directory, builds everything once (`_setup`: data, model, optimizer,
loaders, the resume state), then runs epochs: `train_one_epoch` (the steps), `evaluate` (loss
and accuracy over every rank's shard) and `_end_epoch` (metrics row, best weights, early stop,
files). The step itself is `make_step`: forward under autocast, loss, backward, step.

Exact resume: every random thing in an epoch is a pure function of (seed, epoch) (the loader,
mixup and cutmix included), the lr is a pure function of the step (schedule.py), and the state
holds the weights, the EMA weights, optimizer, partial-epoch sums and RNG; a run resumed at step k
then runs the very operations the uninterrupted run would have, so on the CPU the final weights
are bitwise equal.

Around it: the step and evaluation (steps.py), a `--budget` run's plan and re-plans and the
end-of-run measurements (budget.py), the run's files (records.py), the progress bar (bar.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from reslab.checkpoint import BEST, read_weights, save_weights
from reslab.data import balance
from reslab.data.augment import get_policy
from reslab.errors import ReslabError
from reslab.hardware import default_device, describe, resolve_precision, train_channels_last
from reslab.train import budget, distributed, lr_find, records, steps
from reslab.train import state as run_files
from reslab.train.bar import EpochBar, sigint_flag
from reslab.train.config import TrainConfig
from reslab.train.distributed import DistContext
from reslab.train.run import Run
from reslab.train.state import EpochRow, PartialEpoch, Progress
from reslab.train.tensorboard import event_log

# Host syncs (loss to Python for the progress bar and the NaN check) happen once per this many
# steps; a GPU step then never waits on the host.
SYNC_EVERY = 10
# steps.csv gets a row about this many times an epoch (at host syncs: a multiple of SYNC_EVERY steps).
POINTS_PER_EPOCH = 10



def train(config: TrainConfig, *, ctx: DistContext | None = None,
          stop: Callable[[int, int], bool] | None = None) -> dict:
    """Train as `config` says; returns the summary dict (also in summary.json) with "run_dir".

    `stop(epoch, step)` (1-based) is asked after every step; True acts as Ctrl-C would: finish the
    step, checkpoint, return with summary["interrupted"] set. Only rank 0 of `ctx` writes files.
    """
    lr_find.check_new_run(config)
    if ctx is None:  # this process alone, `nproc` launched ones, or this rank of torchrun's job
        return distributed.run(train, config, stop=stop)
    started = budget.clock()
    with _run_directory(config, ctx) as (cfg, run_dir, state), contextlib.ExitStack() as open_logs:
        run = _setup(cfg, ctx, run_dir, state)
        p = run.progress
        run.log = open_logs.enter_context(event_log(cfg.log, run_dir, p.global_step, ctx.is_main))
        with sigint_flag() as interrupted, EpochBar(ctx.is_main and not cfg.quiet) as bar:
            for line in _photo_lines(config, cfg) + balance.imbalance_lines(run.record["classes"],
                                                                            run.loader.split.labels, cfg):
                bar.print(line)
            saved = records.saved_record(run_dir) if cfg.resume else {}
            lr_find.before_training(run, bar, steps.make_step, saved)  # --lr-find
            if cfg.epochs is None:
                budget.plan(run, started, bar)
            records.write_config(run)

            def halt(step: int) -> bool:
                return interrupted.is_set() or (stop is not None and stop(p.epoch + 1, step))

            if state is None and cfg.resume:
                bar.print(f"{run_dir} holds no checkpoint yet ({run_files.CONFIG} only): starting at step 1")
            elif state is not None:
                bar.print(f"resuming {run_dir} at epoch {p.epoch + 1}, step {p.step_in_epoch}")
            while p.stopped == "running" and p.epoch < run.cfg.epochs:
                budget.replan(run, bar)  # a --budget run fits its plan to the epochs really run
                trained = train_one_epoch(run, halt, bar) if p.stopped == "running" else None
                if trained is None:  # stopped after a step, checkpointed
                    break
                val = steps.evaluate(run.model, run.val_loader, run.precision, ctx) if run.val_loader else None
                ema_val = steps.evaluate(run.ema.model, run.val_loader, run.precision, ctx) if (
                    run.ema and run.val_loader) else None
                _end_epoch(run, trained, val, ema_val, bar)
        return _finish(run, started)


def train_one_epoch(run: Run, halt: Callable[[int], bool], bar: EpochBar) -> dict[str, float] | None:
    """The epoch's steps (the rest of them when resuming mid-epoch); returns {"loss", "acc", "lr",
    "seconds"} over all ranks, or None when `halt(step)` stopped it (then progress holds the
    partial sums and the checkpoint is written)."""
    p, ctx = run.progress, run.ctx
    run.loader.set_epoch(p.epoch)
    run.train_model.train()
    run.set_phase(p.epoch)
    # An interrupted epoch's partial sums are all ranks' (see the end); rank 0 alone carries them on.
    before = p.partial
    loss_correct = torch.tensor([before.loss, before.correct] if ctx.is_main else [0.0, 0.0], dtype=torch.float64,
                                device=run.device)
    count = before.count if ctx.is_main else 0.0
    first_bad = torch.tensor(-1, device=run.device)  # step of the first non-finite loss; read every SYNC_EVERY
    steps_here = run.epoch_steps(p.epoch)  # the loader's batches, or fewer in a budget's shortened last epoch
    bar.start_epoch(f"{p.epoch + 1}/{run.cfg.epochs}", steps_here, p.step_in_epoch)
    every = SYNC_EVERY * max(1, round(len(run.loader) / POINTS_PER_EPOCH / SYNC_EVERY))
    window = [*loss_correct.tolist(), count]  # the sums when steps.csv's current window began
    start = budget.clock()
    lr, halted = run.set_lr(p.global_step), False
    for i, (x, y) in enumerate(itertools.islice(run.loader, steps_here)):
        if i < p.step_in_epoch:  # resuming mid-epoch: the same batches, already trained on
            continue
        lr = run.set_lr(p.global_step)
        loss, correct = run.step(x, y)
        if run.ema is not None:
            run.ema.update(run.model, p.global_step)
        loss_correct += torch.stack([loss.double() * len(y), correct.double()])
        count += len(y)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i + 1, first_bad)
        p.global_step, p.step_in_epoch = p.global_step + 1, i + 1
        halted = ctx.any(halt(i + 1))  # every rank stops at the same step
        if halted or (i + 1) % SYNC_EVERY == 0 or i + 1 == steps_here:
            _stop_if_not_finite(run, int(first_bad), lr)
            if run.log is not None:
                run.log.step_loss(p.global_step, loss)
            loss_sum, correct_sum = loss_correct.tolist()
            elapsed = before.seconds + budget.clock() - start
            bar.update(i + 1, loss_sum / count, correct_sum / count, count / max(elapsed, 1e-9))
            if ((i + 1) % every == 0 or i + 1 == steps_here) and count > window[2]:
                seen = count - window[2]
                p.points.append([p.global_step, p.epoch + (i + 1) / len(run.loader), (loss_sum - window[0]) / seen,
                                 (correct_sum - window[1]) / seen])
                window = [loss_sum, correct_sum, count]
        if halted:
            break
    # The job's time, the same on every rank: its slowest rank's (each rank's clock starts when it
    # enters the epoch, rank 0 after writing the last one's files).
    seconds = ctx.max(budget.clock() - start)
    loss_sum, correct_sum = loss_correct.tolist()
    totals = ctx.all_reduce_sums({"loss": loss_sum, "correct": correct_sum, "count": count})
    p.train_seconds += seconds
    p.train_images += totals["count"] - before.count
    seconds += before.seconds
    if halted:
        p.partial, p.stopped = PartialEpoch(totals["loss"], totals["correct"], totals["count"], seconds), "interrupted"
        if ctx.is_main:
            records.checkpoint(run)
        return None
    return {"loss": totals["loss"] / totals["count"], "acc": totals["correct"] / totals["count"], "lr": lr,
            "seconds": seconds}


def _stop_if_not_finite(run: Run, bad_step: int, lr: float) -> None:
    if run.ctx.any(bad_step >= 0):
        raise ReslabError(f"the loss became NaN or infinite at epoch {run.progress.epoch + 1}, step {bad_step} "
                          f"(lr {lr:.4g}); lower the lr (--lr, now {run.cfg.lr:g}) or add --grad-clip 1; "
                          f"the last good checkpoint in {run.dir} is untouched")


def _end_epoch(run: Run, trained: dict[str, float], val: dict[str, float] | None,
               ema_val: dict[str, float] | None, bar: EpochBar) -> None:
    """Record a finished epoch: its metrics row, the best weights (the EMA's when they are the
    better), early stopping, the run's files."""
    p, cfg = run.progress, run.cfg
    p.epoch, p.step_in_epoch, p.partial = p.epoch + 1, 0, PartialEpoch()
    row = EpochRow(epoch=p.epoch, lr=trained["lr"], train_loss=trained["loss"], train_acc=trained["acc"],
                   val_loss=val["loss"] if val else None, val_acc=val["acc"] if val else None,
                   seconds=round(trained["seconds"], 3), ema_val_loss=ema_val["loss"] if ema_val else None,
                   ema_val_acc=ema_val["acc"] if ema_val else None)
    p.rows.append(row)
    # Best weights by validation accuracy, or balanced accuracy when the run corrects for imbalance.
    key = balance.selection_metric(cfg)
    source, chosen = "model", val
    if ema_val is not None and ema_val[key] > val[key]:
        source, chosen = "ema", ema_val
    acc = chosen["acc"] if chosen else None
    best = p.best_balanced_accuracy if key == "balanced_accuracy" else p.best_val_acc
    improved = chosen is not None and (best is None or chosen[key] > best)
    if improved:
        p.best_val_acc, p.best_epoch, p.bad_epochs, p.best_weights = acc, row.epoch, 0, source
        p.best_balanced_accuracy, p.best_macro_f1 = chosen["balanced_accuracy"], chosen["macro_f1"]
    elif acc is not None:
        p.bad_epochs += 1
    if cfg.early_stop is not None and p.bad_epochs >= cfg.early_stop:
        p.stopped = "early_stop"
    elif p.epoch >= cfg.epochs:
        p.stopped = "completed"
    if run.val_loader is None:  # no validation data: the best weights are the last ones (the EMA's if kept)
        source = "ema" if run.ema else "model"
        p.best_weights = source
    if run.ctx.is_main:
        if improved or run.val_loader is None:
            weights = run.ema.model if source == "ema" else run.model
            save_weights(run.dir / BEST, weights, run.meta(row.epoch, acc, weights=source))
        records.checkpoint(run)
        # Drawing the curves costs a short epoch's worth of time: at most every CURVES_EVERY seconds,
        # and at the end.
        curves = p.stopped != "running" or run.curves_drawn is None or (
            budget.clock() - run.curves_drawn >= budget.CURVES_EVERY)
        records.write_records(run, curves=curves)
        if curves:
            run.curves_drawn = budget.clock()
        if run.log is not None:
            run.log.epoch(row, p.global_step, run.dir / run_files.CURVES if curves else None)

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    ema = f" (ema loss {fmt(row.ema_val_loss)} acc {fmt(row.ema_val_acc)})" if row.ema_val_acc is not None else ""
    bar.end_epoch(f"epoch {row.epoch}/{cfg.epochs}  lr {row.lr:.4g}  train loss {row.train_loss:.4f} "
                  f"acc {row.train_acc:.4f}  val loss {fmt(row.val_loss)} acc {fmt(row.val_acc)}{ema}  "
                  f"{row.seconds:.1f}s")
    if p.stopped == "early_stop":
        score, best = ("balanced accuracy", p.best_balanced_accuracy) if key == "balanced_accuracy" else (
            "accuracy", p.best_val_acc)
        bar.print(f"early stop: no better validation {score} for {cfg.early_stop} epochs "
                  f"(best {best:.4f} at epoch {p.best_epoch})")


def _finish(run: Run, started: float) -> dict:
    """The summary, also in summary.json; a run that reached its end is first tested on its best weights."""
    p, ctx = run.progress, run.ctx
    test = tta = None
    measure_tta = budget.flips(run)
    if p.stopped != "interrupted" and (run.test_loader is not None or measure_tta):
        if ctx.broadcast(p.best_epoch is not None and (run.dir / BEST).is_file()):
            if ctx.is_main:
                run.model.load_state_dict(read_weights(run.dir / BEST)[0])
            ctx.broadcast_state(run.model)
        if measure_tta:
            tta = budget.measure_tta(run)
        if run.test_loader is not None:
            test = steps.evaluate(run.model, run.test_loader, run.precision, ctx)
    result = {**records.summary(run, test), **(tta or {})}
    if run.budget is not None:
        result["budget"]["used_seconds"] = round(budget.clock() - started, 1)
    if ctx.is_main and p.rows and p.stopped == "interrupted" and run.curves_drawn is not None:
        records.draw_curves(run)  # the epochs since the last drawing
    if ctx.is_main:
        records.write_summary(run, result)
    if run.log is not None and (run.val_loader or run.test_loader) is not None:
        run.log.samples(run.model, run.val_loader or run.test_loader, run.weights_meta["classes"], p.global_step)
    return result



# --- set-up ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _run_directory(config: TrainConfig, ctx: DistContext) -> Iterator[tuple[TrainConfig, Path, dict | None]]:
    """The resolved config, the run directory and its resume state (None: start at step 1), while
    rank 0 holds the directory's lock (reslab.train.state.RunLock)."""
    with contextlib.ExitStack() as held:
        if config.resume:
            run_dir = Path(config.resume)
            saved = None
            if ctx.is_main:
                saved = run_files.read_config(run_dir)  # refuses a folder that holds no run
                held.enter_context(run_files.RunLock(run_dir, "--resume"))
                run_files.remove_partial_writes(run_dir)
            cfg = _resumed_config(config, ctx.broadcast(saved), run_dir)
            state = run_files.load_state(run_dir)  # every rank, once rank 0 holds the lock
        else:
            cfg, state, run_dir = config.resolve(), None, None
            if ctx.is_main:  # rank 0 names the run (a timestamp) and checks --out; every rank uses its answer
                run_dir, lock = run_files.claim_run_dir(cfg.out, cfg.model, cfg.data)
                held.enter_context(lock)
            run_dir = ctx.broadcast(run_dir)
        yield cfg, run_dir, state


def _resumed_config(config: TrainConfig, saved: dict, run_dir: Path) -> TrainConfig:
    """The run's saved config, with what --resume may change (reslab.cli.train.RESUME_OPTIONS)."""
    if "ema" not in saved:  # saved before the photo-folder defaults existed: it ran without them
        saved = {"random_erasing": 0.0, "mixup": 0.0, "cutmix": 0.0, "ema": 0.0, **saved}
        if saved.get("augment") is None and saved.get("recipe", "fast") == "fast" and not saved.get("pretrained"):
            saved["augment"] = records.saved_record(run_dir).get("augment")
    if "flip" not in saved:  # saved before --flip: it ran with its policy's own mirror, whatever today's defaults
        augment = saved.get("augment") or records.saved_record(run_dir).get("augment")
        saved = {**saved, "flip": get_policy(augment).flip if augment else None}
    cfg = TrainConfig.from_dict(saved)
    cfg.resume, cfg.quiet, cfg.out = str(run_dir), config.quiet, str(run_dir)
    cfg.nproc, cfg.dist_timeout = config.nproc, config.dist_timeout  # may differ from the first run's
    if config.device is not None:
        cfg.device = config.device
    if config.epochs is not None and config.epochs != cfg.epochs:
        # A new length: the lr schedule stretches to it (so this resume is not exact by design).
        cfg.epochs = config.epochs
        cfg.warmup_epochs = min(cfg.warmup_epochs, cfg.epochs)
    return cfg.resolve()


def _setup(cfg: TrainConfig, ctx: DistContext, run_dir: Path, state: dict | None) -> Run:
    """Data, model, optimizer, step and loaders, built once; the resume state loaded; config.json written."""
    device = ctx.device(cfg.device or default_device())
    precision = resolve_precision(cfg.precision, device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else train_channels_last(precision, device)
    bundle = _load_data(cfg, ctx)
    model, model_options, reports, normalization = _build_model(cfg, bundle, quiet=cfg.quiet or not ctx.is_main)
    preprocessing = {**bundle.preprocessing(), **(normalization or {})}
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # --batch-size is global (split over ranks) unless --scale-lr: see reslab.train.distributed.
    plan = distributed.plan_batches(cfg.batch_size, cfg.lr, ctx.world_size, scale_lr=cfg.scale_lr)
    optimizer = steps.build_optimizer(model, dataclasses.replace(cfg, lr=plan.lr))
    train_model = model
    if ctx.enabled and ctx.world_size > 1:
        # The head epochs leave the body without gradients: DDP must expect unused parameters.
        train_model = distributed.wrap(model, ctx, sync_bn=cfg.sync_bn, find_unused_parameters=cfg.head_epochs > 0)
    if cfg.compile:
        train_model = torch.compile(train_model)
    loss_fn = balance.criterion(cfg, bundle.train.labels, len(bundle.classes), device)  # --class-weights
    step = steps.make_step(train_model, optimizer, precision=precision, grad_clip=cfg.grad_clip, loss_fn=loss_fn)
    ema = steps.WeightEMA(model, cfg.ema) if cfg.ema else None

    progress = Progress()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.model.load_state_dict(state["ema"])
        run_files.set_rng_state(state["rng"])
        progress = Progress.from_state(state)
        # An interrupted run goes on; so does a completed one given more --epochs.
        if progress.stopped == "interrupted" or (progress.stopped == "completed" and progress.epoch < cfg.epochs):
            progress.stopped = "running"
    augment = cfg.augment or bundle.augment
    flip = get_policy(augment, cfg.flip).flip  # what the training images really get (--flip/--no-flip)
    loaders = _loaders(cfg, ctx, bundle, plan.per_rank_batch, augment=augment, device=device,
                       channels_last=channels_last, mean=preprocessing["mean"], std=preprocessing["std"])
    record = {"data": bundle.source, "classes": list(bundle.classes), "preprocessing": preprocessing,
              "augment": augment, "flip": flip, "precision": precision, "channels_last": channels_last,
              "hardware": describe(), "world_size": ctx.world_size, **reports,
              "train_class_counts": dict(zip(bundle.classes, balance.class_counts(bundle.train.labels,
                                                                                  len(bundle.classes))))}
    weights_meta = dict(model=cfg.model, model_options=model_options, classes=list(bundle.classes),
                        preprocessing=preprocessing)
    saved_budget = records.saved_record(run_dir).get("budget") if cfg.resume else None
    return Run(cfg=cfg, ctx=ctx, dir=run_dir, progress=progress, model=model, train_model=train_model,
               optimizer=optimizer, step=step, loss_fn=loss_fn, **loaders, device=device, precision=precision,
               channels_last=channels_last, weights_meta=weights_meta, ema=ema, record=record, budget=saved_budget)


def _photo_lines(given: TrainConfig, cfg: TrainConfig) -> list[str]:
    """What the photo-folder defaults chose for a new run, and why (nothing when none applied)."""
    from reslab.train.config import data_choice

    if given.resume:
        return []
    defaults, why, source = data_choice(given)
    chosen = {k: v for k, v in defaults.items() if getattr(given, k) is None}
    if not chosen:
        return []
    parts = []
    if "model" in chosen:
        stem = f" ({cfg.stem} stem)" if cfg.stem else ""
        parts.append(f"{cfg.model}{stem} at {cfg.image_size} px")
    if "epochs" in chosen:
        parts.append(f"{cfg.epochs} epochs")
    if "lr" in chosen:
        parts.append(f"--lr {cfg.lr:g}")
    parts += [f"--augment {cfg.augment}"] if "augment" in chosen else []
    parts += ["--no-flip"] if chosen.get("flip") is False else []
    parts += [f"--{k.replace('_', '-')} {getattr(cfg, k):g}" for k in ("random_erasing", "mixup", "cutmix", "ema")
              if k in chosen]
    where = "Train on your own photos" if source == "photo folder" else "CIFAR-10"
    return [f"{source} from scratch ({why}): {', '.join(parts)}: what learned best within a time budget on "
            f"2 CPU cores (README, \"{where}\"); the options of the same names override them"]



def _load_data(cfg: TrainConfig, ctx: DistContext):
    from reslab.data import load_data
    from reslab.models import get_model_spec

    with ctx.local_main_first():  # one download or decode cache per machine
        bundle = load_data(cfg.data, image_size=cfg.image_size or get_model_spec(cfg.model).image_size,
                           val_split=cfg.val_split, seed=cfg.seed, data_dir=cfg.data_dir,
                           quiet=cfg.quiet or not ctx.is_main)
    if cfg.batch_size > len(bundle.train):
        raise ReslabError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(bundle.train)} "
                          f"images of {cfg.data}); give at most {len(bundle.train)}")
    if cfg.early_stop is not None and bundle.val is None:
        raise ReslabError(f"--early-stop watches validation accuracy but {cfg.data} has no validation split; "
                          "add --val-split (e.g. 0.1)")
    return bundle


def _loaders(cfg: TrainConfig, ctx: DistContext, bundle, batch: int, *, augment: str, **options) -> dict:
    """This rank's training loader (`batch` a step) and its validation and test shards."""
    from reslab.data import BatchLoader

    # A last batch of one example would make BatchNorm's batch variance undefined; drop just that.
    per_rank = -(-len(bundle.train) // ctx.world_size)
    loader = balance.loader_class(cfg.sampler)  # --sampler balanced: a class-balanced draw each epoch
    train = loader(bundle.train, batch, shuffle=True, seed=cfg.seed, augment=augment, flip=cfg.flip,
                   drop_last=per_rank % batch == 1, rank=ctx.rank, world_size=ctx.world_size,
                   erasing=cfg.random_erasing, mixup=cfg.mixup, cutmix=cfg.cutmix,
                   num_classes=len(bundle.classes), **options)

    def shard(split):
        if split is None:
            return None
        # Disjoint, unpadded shards: every example counted once (the sums are reduced afterwards).
        mine = split if ctx.world_size == 1 else split.subset(distributed.shard_indices(len(split), ctx))
        return BatchLoader(mine, max(batch, 256), shuffle=False, **options)

    return {"loader": train, "val_loader": shard(bundle.val), "test_loader": shard(bundle.test)}


def _build_model(cfg: TrainConfig, bundle, *, quiet: bool) -> tuple[nn.Module, dict, dict, dict | None]:
    """The model (seeded), its create_model options, the reports of pretrained loading and freezing,
    and the normalization the pretrained weights were trained with (None: the data's own)."""
    from reslab.models import create_model

    torch.manual_seed(cfg.seed)
    options = {"in_channels": bundle.in_channels}
    if cfg.shortcut is not None:
        options["shortcut"] = cfg.shortcut
    if cfg.stem is not None:
        options["stem"] = cfg.stem
    if cfg.aux_logits:
        options["aux_logits"] = True
    plan = None
    if cfg.pretrained:
        from reslab.weights import pretrained_plan

        # Keras weights need stride_in_1x1=True, torchvision's Inception weights transform_input...
        plan = pretrained_plan(cfg.pretrained, cfg.model)
        options = {**plan.model_options, **options}
    model = create_model(cfg.model, num_classes=len(bundle.classes), **options)
    reports, normalization = {}, None
    if plan is not None:
        from reslab.transfer import freeze

        reports["pretrained"] = plan.load(model, model_name=cfg.model, sha256=cfg.pretrained_sha256, quiet=quiet)
        if plan.normalization and len(plan.normalization["mean"]) == bundle.in_channels:
            normalization = plan.normalization  # the statistics the weights learned with, not the data's
        if cfg.freeze:
            reports["freeze"] = freeze(model, cfg.freeze)
    return model, options, reports, normalization


