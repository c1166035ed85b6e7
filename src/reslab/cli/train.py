"""`reslab train`: fills a TrainConfig from the options and runs reslab.train.train."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reslab.errors import ReslabError

# Options that may accompany --resume: the rest come from the run's config.json.
RESUME_OPTIONS = {"resume", "epochs", "quiet", "device", "nproc", "dist_timeout"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", help="model name (default resnet20; a photo folder: resnet18, see README \"Train on your own "
                        "photos\"; `reslab models` lists them)")
    add("--data", help="digits (default), cifar10, cifar100, or an image folder")
    add("--data-dir", help="cache folder for downloads and decoded folders (default $RESLAB_CACHE or "
                           "~/.cache/reslab)")
    add("--recipe", help="paper (section 4.2: SGD 0.1, lr/10 at 50%% and 75%%), fast (default: one-cycle, "
                         "label smoothing) or finetune (--pretrained runs: the head alone first, then every layer "
                         "with lower lrs for earlier stages)")
    add("--epochs", type=int, help="epochs (recipe default: fast 6, paper 182; a photo folder from scratch: 30)")
    add("--budget", metavar="DURATION", help="wall-clock budget (15m, 900s, 1h30m): the epochs are chosen from "
                                             "this machine's measured speed so that training and evaluation fit; "
                                             "excludes --epochs")
    add("--batch-size", type=int, help="batch size (recipe default: fast 64, paper 128)")
    add("--lr", type=float, help="peak learning rate (recipe default)")
    add("--lr-find", nargs="?", const=True, default=None, metavar="RULE",
        help="run the learning-rate range test first (as `reslab lr-find`) and train at its suggested lr, every "
             "parameter group scaled with it; RULE: minimum (default) or valley; recorded as lr_find in "
             "config.json; excludes --lr and --resume")
    add("--optimizer", help="sgd, adam or adamw (default sgd)")
    add("--momentum", type=float, help="SGD momentum (default 0.9)")
    add("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov momentum (fast: on)")
    add("--weight-decay", type=float, help="weight decay (recipe default)")
    add("--schedule", help="step, onecycle, cosine or constant (recipe default)")
    add("--warmup-epochs", type=float, help="epochs of linear warm-up")
    add("--label-smoothing", type=float, help="label smoothing (fast 0.1, paper 0)")
    add("--image-size", type=int, help="input size (default: the model family's, 32 CIFAR / 224 ImageNet; a photo "
                                       "folder with no --model: 112)")
    add("--seed", type=int, help="seed of the split, the initial weights and the batch order, in [0, 2**63) "
                             "(default 0)")
    add("--precision", help="fp32, bf16 or auto (default: bf16 only where the hardware runs it fast)")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="channels-last memory format (default: on, measured faster on CPUs and GPUs; --no-channels-last for NCHW)")
    add("--compile", action="store_true", default=None, help="torch.compile the model")
    add("--grad-clip", type=float, help="clip the global gradient norm to this")
    add("--early-stop", type=int, metavar="PATIENCE", help="stop after this many epochs without a better val accuracy")
    add("--val-split", type=float, help="fraction of the training data held out for validation")
    add("--augment", help="augmentation policy: none, cifar, folder, keras, trivial (default: the data's; a photo "
                          "folder from scratch: trivial, or none for small gray images)")
    add("--flip", action=argparse.BooleanOptionalAction, default=None,
        help="mirror training images left to right at random (default: off for a folder of small gray images, 40 px "
             "or less, else the --augment policy's own: on for photos and CIFAR); --no-flip for data a mirror "
             "changes (digits, text); recorded in the weights, and evaluate, predict and serve then never flip "
             "by default")
    add("--random-erasing", type=float, metavar="P", help="erase a random rectangle of each training image with "
                                                          "probability P (default 0)")
    add("--mixup", type=float, metavar="ALPHA", help="mixup of each batch with itself reversed, lambda ~ "
                                                     "Beta(ALPHA, ALPHA) (default 0: off)")
    add("--cutmix", type=float, metavar="ALPHA", help="cutmix likewise (default 0: off; with --mixup, one of the "
                                                      "two per batch)")
    add("--ema", type=float, metavar="DECAY", help="keep an exponential moving average of the weights (decay per "
                                                   "step, e.g. 0.99), evaluated each epoch and kept as the best "
                                                   "weights when better (default 0: off)")
    add("--class-weights", metavar="balanced", help="weight each class's loss by n / (classes x its count) "
                                                    "(scikit-learn's \"balanced\"), for imbalanced folders; "
                                                    "the best weights are then chosen by balanced accuracy "
                                                    "(default none)")
    add("--sampler", metavar="balanced", help="balanced: each epoch draws as many images as the training split "
                                              "holds, every class equally often (with replacement); the best "
                                              "weights are then chosen by balanced accuracy (default none)")
    add("--shortcut", help="shortcut option A, B or C (paper section 3.3; default: the model's)")
    add("--stem", help="ResNet stem: imagenet (7x7/2 conv and max pool), deep (three 3x3 convs and max pool, "
                       "timm's resnet*d) or cifar (one 3x3 conv); default: the model's")
    add("--out", help="run directory (default runs/<model>-<data>-<time>/)")
    add("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    add("--pretrained", metavar="SRC", help="start from these weights: imagenet or cifar10 (the best catalog "
                                            "weights of --model), a catalog name (MODEL.TAG, `reslab models "
                                            "--pretrained`), a run, or a checkpoint file or URL")
    add("--pretrained-sha256", help="expected SHA-256 of the --pretrained file")
    add("--freeze", metavar="UNTIL", help="freeze pretrained layers up to this stage (e.g. layer3)")
    add("--head-lr-mult", type=float, help="learning-rate multiplier of the classifier (finetune: 5)")
    add("--head-epochs", type=int, help="epochs training only the new head, body frozen (finetune: 1)")
    add("--layer-decay", type=float, help="lr of each earlier stage / the next one's (finetune: 0.5)")
    add("--aux-logits", action="store_true", default=None,
        help="GoogLeNet / Inception-v3: train the auxiliary classifiers too (weighted as the papers do)")
    add("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add("--quiet", action="store_true", default=None, help="no progress bar or epoch lines (for logs)")
    add("--log", metavar="tensorboard", help="tensorboard: also write TensorBoard event files into the run "
                                             "directory (loss, accuracy, lr, curves, sample predictions; needs "
                                             "pip install 'reslab[tensorboard]')")
    dist = parser.add_argument_group("several processes (DDP; see docs/distributed.md)")
    dist.add_argument("--nproc", type=int, help="processes on this machine, launched through torchrun's API "
                      "(default 1; under torchrun, torchrun's own count)")
    dist.add_argument("--sync-bn", action="store_true", default=None,
                      help="BatchNorm statistics over the global batch (SyncBatchNorm)")
    dist.add_argument("--scale-lr", action="store_true", default=None,
                      help="--batch-size is per process and the lr is multiplied by the process count "
                           "(linear scaling rule); default: --batch-size is the global batch, split over processes")
    dist.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                      help="how long a collective may wait for a rank before the job fails "
                           "(default $RESLAB_DIST_TIMEOUT or 600)")


def config_from_args(args):
    from dataclasses import fields

    from reslab.train import TrainConfig
    from reslab.train.config import parse_duration
    from reslab.train.lr_find import check_new_run

    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "budget" in given:
        given["budget"] = parse_duration(given["budget"])
    if "resume" in given:
        check_new_run(TrainConfig(**given))  # --lr-find's own reason before the general one
        extra = sorted(set(given) - RESUME_OPTIONS)
        if extra:
            raise ReslabError(f"--resume continues a run with its own settings; drop "
                              f"{', '.join('--' + k.replace('_', '-') for k in extra)} (only --epochs may change)")
    if "pretrained" in given and "model" not in given:
        # `--pretrained resnet56.akamaster_cifar10` names its architecture: no need to repeat it.
        from reslab.weights import get_weights, is_weights_name

        if is_weights_name(given["pretrained"]) and not Path(given["pretrained"]).exists():
            given["model"] = get_weights(given["pretrained"]).model
    return TrainConfig(**given)


def run(args) -> int:
    from reslab.train import train
    from reslab.train.distributed import torchrun_env

    summary = train(config_from_args(args))
    run_dir = summary["run_dir"]
    # Under torchrun every rank runs this command; the job's lines are printed once, by rank 0.
    job = torchrun_env()
    if job is not None and job["rank"] != 0:
        return 130 if summary["interrupted"] else 0
    if summary["interrupted"]:
        print(f"reslab train: interrupted; checkpoint written. Continue with: reslab train --resume {run_dir}",
              file=sys.stderr)
        return 130

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    # Several processes: the job's time (each epoch its slowest rank's) and every rank's images in it.
    nproc = job["world_size"] if job is not None else args.nproc or 1
    processes = f" on {nproc} processes" if nproc > 1 else ""
    print(f"{summary['model']} on {summary['data']}: {summary['epochs']} epochs in {summary['train_seconds']:.1f}s"
          f"{processes} ({summary['images_per_second']} img/s), best val acc {pct(summary['best_val_acc'])}"
          f"{' (EMA weights)' if summary.get('best_weights') == 'ema' else ''}, "
          f"test acc {pct(summary['test_acc'])}; run in {run_dir}")
    if summary.get("best_by") == "balanced_accuracy":
        print(f"best weights chosen by validation balanced accuracy: {pct(summary['balanced_accuracy'])} "
              f"(macro F1 {pct(summary['macro_f1'])})")
    if summary.get("tta_val_acc"):
        accs = summary["tta_val_acc"]
        print(f"test-time flip on the validation split: {pct(accs['none'])} without, {pct(accs['flip'])} with: "
              + ("evaluate and predict use it by default (--tta none turns it off)" if summary["tta"] == "flip"
                 else "not used by default (--tta flip turns it on)"))
    if summary.get("budget"):
        print(budget_line(summary["budget"]))
    if summary.get("frozen_params"):
        print(f"parameters: {summary['trainable_params']:,} trainable, {summary['frozen_params']:,} frozen")
    return 0


def budget_line(budget: dict) -> str:
    """How a --budget run spent its time, in one line."""
    from reslab.train.config import format_duration

    used, seconds = budget.get("used_seconds"), budget["seconds"]
    spent = f"budget {format_duration(seconds)}"
    if used is not None:
        spent = f"used {format_duration(used)} of {format_duration(seconds)} ({100 * used / seconds:.0f}%)"
    replans = budget.get("replans") or []
    replanned = ""
    if replans:
        last = replans[-1]["epoch_seconds"]
        replanned = (f"; re-planned to {budget['epochs']} epochs from the real epochs ({last:.1f}s each, "
                     f"{len(replans)} re-plan{'s' if len(replans) > 1 else ''})")
    last, per_epoch = budget.get("last_epoch_steps"), budget.get("steps_per_epoch")
    if last and per_epoch and last < per_epoch:
        replanned += f"; the last epoch shortened to the {last} of its {per_epoch} steps that fit"
    return (f"{spent}: {budget['setup_seconds']:.0f}s loading and measuring ({budget['step_seconds']:.3g} s a step), "
            f"then {budget.get('measured_epochs', budget['epochs'])} epochs planned at {budget['epoch_seconds']:.1f}s "
            f"each with evaluation and checkpoint, and {budget['final_seconds']:.1f}s for the final evaluations "
            f"(test split, test-time flip){replanned} (planned {format_duration(budget['planned_seconds'])})")
