"""`reslab lr-find`: the learning-rate range test of the run `reslab train` would start, with the
same options (reslab.train.lr_find); prints `suggested lr X (rule)`, writes lr_find.png and lr_find.json."""

from __future__ import annotations

import argparse

from reslab.errors import ReslabError

# Training options that mean nothing to a range test of --steps steps: refused, never ignored.
NOT_HERE = {"resume": "it tests a new run's setup", "lr_find": "it is the lr finder",
            "lr": "it sweeps the lr itself (--start-lr, --end-lr)", "budget": "it runs --steps steps",
            "epochs": "it runs --steps steps", "early_stop": "it runs --steps steps",
            "schedule": "it sets the lr of every step itself", "warmup_epochs": "it sets the lr of every step itself",
            "ema": "the weights' average does not change the training loss", "log": "it writes lr_find.json",
            "nproc": "it runs in one process", "sync_bn": "it runs in one process",
            "scale_lr": "it runs in one process", "dist_timeout": "it runs in one process"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from reslab.cli import train

    # Defaults stay None here: reslab.train.lr_find (START_LR, END_LR, STEPS) fills them, and importing
    # it would import torch, which building the parser must not (`reslab --help` stays instant).
    train.add_arguments(parser)  # the run to test: the same options as `reslab train`
    parser.set_defaults(out=None)
    for action in parser._actions:  # --out names a folder of two files here, not a run
        if action.dest == "out":
            action.help = "folder for lr_find.png and lr_find.json (default runs/lr-find-<model>-<data>-<time>/)"
    group = parser.add_argument_group("range test")
    group.add_argument("--start-lr", type=float, help="first lr (default 1e-07)")
    group.add_argument("--end-lr", type=float, help="last lr (default 10)")
    group.add_argument("--rule", help="how the suggestion is read off the curve: minimum (default: the lr at the "
                                      "lowest smoothed loss, for reslab's one-cycle SGD) or valley (fastai's)")
    group.add_argument("--steps", type=int, help="optimizer steps, the lr growing exponentially (default 100; fewer "
                                                 "when the loss diverges first)")


def run(args) -> int:
    from reslab.cli.train import config_from_args
    from reslab.train.lr_find import line

    for name, why in NOT_HERE.items():
        if getattr(args, name, None) is not None:
            raise ReslabError(f"--{name.replace('_', '-')} is a training option that lr-find does not take ({why}); "
                              "drop it")
    found, folder = run_range_test(config_from_args(args), start_lr=args.start_lr, end_lr=args.end_lr,
                                   steps=args.steps, rule=args.rule, out=args.out)
    print(f"{line(found)}: {found.steps} steps from lr {found.start_lr:g} to {found.lrs[-1]:.3g} ({found.stopped}); "
          f"{folder / 'lr_find.png'}, {folder / 'lr_find.json'}")
    return 0


def run_range_test(config, *, start_lr: float | None = None, end_lr: float | None = None, steps: int | None = None,
                   rule: str | None = None, out: str | None = None):
    """(LRFind, folder): set up as `reslab train` would (one process, reslab.train.loop's own set-up),
    run the test, write the files into `out` (default runs/lr-find-<model>-<data>-<time>/)."""
    from reslab.train import lr_find
    from reslab.train import state as run_files
    from reslab.train.distributed import DistContext
    from reslab.train.loop import _setup
    from reslab.train.steps import make_step

    start_lr = lr_find.START_LR if start_lr is None else start_lr
    end_lr = lr_find.END_LR if end_lr is None else end_lr
    steps = lr_find.STEPS if steps is None else steps
    rule = lr_find.DEFAULT_RULE if rule is None else rule
    lr_find.check_range(start_lr, end_lr, steps)
    lr_find.check_rule(rule)
    cfg = config.resolve()
    folder = run_files.new_run_dir(out, f"lr-find-{cfg.model}", cfg.data)
    run = _setup(cfg, DistContext(), folder, None)
    found = lr_find.find_lr(run, make_step, start_lr=start_lr, end_lr=end_lr, steps=steps, rule=rule)
    lr_find.write(folder, found, model=cfg.model)
    return found, folder
