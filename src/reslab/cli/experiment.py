"""`reslab experiment degradation|gradients|responses|inception|table6`: the papers' figures and
tables, numbers in JSON."""

from __future__ import annotations

# Small nets leave CPU threads idle: side by side, each on its share of them, they finish sooner.
JOBS_HELP = ("nets trained at once, each in its own process with its share of the CPU threads (default 1; "
             "2 on 2 CPU cores: two ResNet-20s at once took 116 s an epoch a net, not 140)")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="experiment", metavar="NAME", required=True)

    deg = sub.add_parser("degradation", help="plain vs residual nets of each depth, same recipe (paper Fig. 6)")
    # Defaults are None here (and given in DegradationConfig) so that --resume can tell an option given.
    deg.add_argument("--data", default=None,
                     help="data set: digits (default), cifar10, cifar100, a CIFAR .tar.gz or an image folder")
    deg.add_argument("--depths", type=int, nargs="+", default=None, metavar="D",
                     help="6n+2 depths; a plain and a residual net of each (default 20 56; the paper's 20 32 44 56)")
    deg.add_argument("--epochs", type=int, default=None,
                     help="epochs per net (default 2 on CIFAR and image folders: within 45 minutes for the 4 "
                          "default nets on 2 CPU cores; 8 on the digits; the paper's 64k iterations: 182 at "
                          "batch 128 on 45k images)")
    deg.add_argument("--batch-size", type=int, default=None)
    deg.add_argument("--lr", type=float, default=None,
                     help="peak lr (default 0.05 with the fast recipe's one-cycle, the paper recipe's 0.1)")
    deg.add_argument("--recipe", choices=["paper", "fast"], default=None, help="training recipe (default fast)")
    deg.add_argument("--val-split", type=float, default=None, metavar="F",
                     help="held-out fraction for the bold curve (default 0.1: the paper's 45k/5k on CIFAR; "
                          "the digits' own split)")
    deg.add_argument("--image-size", type=int, default=None, help="input side (default 8 for digits, else 32)")
    deg.add_argument("--seed", type=int, default=None, help="one seed for every net (default 0)")
    deg.add_argument("--precision", choices=["fp32", "bf16", "auto"], default=None)
    deg.add_argument("--out", default=None, help="folder (default runs/experiment-degradation-<time>/)")
    deg.add_argument("--resume", default=None, metavar="DIR",
                     help="continue the experiment in DIR: finished nets are kept, a half-trained one resumes")
    deg.add_argument("--jobs", type=int, default=None, metavar="N", help=JOBS_HELP)
    deg.add_argument("--quiet", action="store_true", help="no per-epoch progress")

    t6 = sub.add_parser("table6", help="CIFAR-10 test error of ResNet-20..110 over seeds, paper recipe (Table 6)")
    t6.add_argument("--data", default=None, help="cifar10 (default), a CIFAR .tar.gz or an image folder")
    t6.add_argument("--depths", type=int, nargs="+", default=None, metavar="D",
                    help="6n+2 depths of ResNets (default 20 32 44 56 110)")
    t6.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S", help="seeds per depth (default 0 1)")
    t6.add_argument("--epochs", type=int, default=None,
                    help="epochs per net (default 182: 64k iterations on 45k images); the lr drops at 50%% and 75%%")
    t6.add_argument("--val-split", type=float, default=None, metavar="F",
                    help="hold out F and test the best-validation weights (default 0: all images, the weights at "
                         "the end; a folder without test/: 0.1, reported on it)")
    t6.add_argument("--precision", choices=["fp32", "bf16", "auto"], default=None)
    t6.add_argument("--out", default=None, help="folder (default runs/experiment-table6-<time>/)")
    t6.add_argument("--resume", default=None, metavar="DIR",
                    help="continue the experiment in DIR: finished runs are kept, a half-trained one resumes")
    t6.add_argument("--jobs", type=int, default=None, metavar="N", help=JOBS_HELP)
    t6.add_argument("--quiet", action="store_true", help="no per-epoch progress")

    grad = sub.add_parser("gradients", help="gradient norm reaching each layer, plain vs residual")
    grad.add_argument("models", nargs="*", metavar="MODEL",
                      help="CIFAR-family names (default plain20 resnet20 plain56 resnet56)")
    grad.add_argument("--data", default="digits")
    grad.add_argument("--steps", type=int, default=20, help="SGD steps between the two measurements (default 20)")
    grad.add_argument("--batch-size", type=int, default=64)
    grad.add_argument("--lr", type=float, default=0.1)
    grad.add_argument("--image-size", type=int, default=None,
                      help="input side (default 8 for digits, else 32)")
    grad.add_argument("--seed", type=int, default=0)
    grad.add_argument("--out", default=None, help="folder (default runs/experiment-gradients-<time>/)")

    resp = sub.add_parser("responses", help="std of each residual function's output (paper Fig. 7)")
    resp.add_argument("sources", nargs="*", metavar="RUN_OR_MODEL",
                      help="trained run directories or weights files, or model names for initialized nets "
                           "(default plain20 resnet20 plain56 resnet56)")
    resp.add_argument("--data", default=None, help="images to measure on (default: each run's own data; digits)")
    resp.add_argument("--split", choices=["test", "val", "train"], default="test")
    resp.add_argument("--max-images", type=int, default=1000)
    resp.add_argument("--image-size", type=int, default=None, help="model names only (default 8 for digits, else 32)")
    resp.add_argument("--seed", type=int, default=0)
    resp.add_argument("--out", default=None, help="folder (default runs/experiment-responses-<time>/)")

    inc = sub.add_parser("inception", help="plain, residual and inception nets with and without residual adds, "
                                           "same recipe (Szegedy et al. 2016, section 5)")
    inc.add_argument("models", nargs="*", metavar="MODEL",
                     help="registered names (default plain56 resnet56 inception_resnet_small_plain "
                          "inception_resnet_small)")
    inc.add_argument("--data", default="digits", help="data set: digits (default), cifar10, cifar100 or a folder")
    inc.add_argument("--epochs", type=int, default=None, help="epochs per net (default 8)")
    inc.add_argument("--batch-size", type=int, default=None)
    inc.add_argument("--lr", type=float, default=None, help="peak lr of the one-cycle schedule (default 0.05)")
    inc.add_argument("--recipe", choices=["paper", "fast"], default="fast")
    inc.add_argument("--image-size", type=int, default=None,
                     help="input side (default: the nets' native input, 32 for the defaults)")
    inc.add_argument("--target", type=float, default=None, dest="target_train_error", metavar="ERROR",
                     help="training error whose first epoch is reported (a fraction; default 0.05)")
    inc.add_argument("--seed", type=int, default=0)
    inc.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto")
    inc.add_argument("--out", default=None, help="folder (default runs/experiment-inception-<time>/)")
    inc.add_argument("--jobs", type=int, default=1, metavar="N", help=JOBS_HELP)
    inc.add_argument("--quiet", action="store_true", help="no per-epoch progress")


def _announce(console):
    from reslab.cli.tables import heading

    def progress(k: int, n: int, name: str) -> None:
        heading(console, f"model {k + 1} of {n}: {name}")

    return progress


def run(args) -> int:
    from reslab.cli.tables import console as stdout

    console = stdout()
    if args.experiment == "degradation":
        return _degradation(args, console)
    if args.experiment == "gradients":
        return _gradients(args, console)
    if args.experiment == "inception":
        return _inception(args, console)
    if args.experiment == "table6":
        return _table6(args, console)
    return _responses(args, console)


def _gradients(args, console) -> int:
    from reslab.cli.tables import table
    from reslab.experiments import GradientsConfig, run_gradients

    config = GradientsConfig(data=args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             image_size=args.image_size, seed=args.seed, out=args.out,
                             **({"models": args.models} if args.models else {}))
    summary = run_gradients(config, progress=_announce(console))
    columns = [(col, "left" if col == "model" else "right")
               for col in ("model", "layers", "init first", "init last", "after first", "after last")]
    rows = [[name, str(len(m["layers"])), f"{m['init'][0]:.3g}", f"{m['init'][-1]:.3g}", f"{m['after'][0]:.3g}",
             f"{m['after'][-1]:.3g}"] for name, m in summary["models"].items()]
    console.print(table(f"gradient norm ||dL/dW||: first layer / last layer (after {config.steps} steps)",
                        columns, rows))
    print(f"wrote {summary['settings']['out']}/gradients.json and gradients.png")
    return 0


def _responses(args, console) -> int:
    from reslab.cli.tables import table
    from reslab.experiments import ResponsesConfig, run_responses

    config = ResponsesConfig(data=args.data, split=args.split, max_images=args.max_images,
                             image_size=args.image_size, seed=args.seed, out=args.out,
                             **({"sources": args.sources} if args.sources else {}))
    summary = run_responses(config, progress=_announce(console))
    columns = [(col, "left" if col in ("net", "weights") else "right")
               for col in ("net", "weights", "blocks", "mean std", "max std", "images")]
    rows = [[name, "trained" if m["trained"] else "initialized", str(len(m["std"])),
             f"{sum(m['std']) / len(m['std']):.3f}", f"{max(m['std']):.3f}", f"{m['images']} {m['split']}"]
            for name, m in summary["models"].items()]
    console.print(table("std of residual-function responses (after the last BN, before the add)", columns, rows))
    print(f"wrote {summary['settings']['out']}/responses.json and responses.png")
    return 0


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _given(args, keys) -> dict:
    """The options given on the command line (argparse leaves the others None)."""
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _degradation(args, console) -> int:
    from reslab.cli.tables import table
    from reslab.experiments import DegradationConfig, run_degradation

    given = _given(args, ("data", "depths", "epochs", "batch_size", "lr", "recipe", "val_split", "image_size", "seed",
                          "precision", "out", "jobs"))
    if args.resume:
        config = DegradationConfig.resumed(args.resume, quiet=args.quiet, **given)
    else:
        config = DegradationConfig(quiet=args.quiet, **given)
    summary = run_degradation(config, progress=_announce(console))
    columns = [(col, "left" if col == "model" else "right") for col in
               ("model", "final train err", "train err (eval)", "best train err", "final val err", "test err",
                "seconds")]
    rows = [[name, _pct(m["final_train_error"]), _pct(m.get("train_error_eval")), _pct(m["best_train_error"]),
             _pct(m["final_val_error"]), _pct(m["test_error"]), f"{m['seconds']:.0f}"]
            for name, m in summary["models"].items()]
    console.print(table("degradation: errors after the last epoch (paper Figure 6)", columns, rows))
    print(f"wrote {summary['settings']['out']}/summary.json, metrics.csv and degradation.png")
    return 0


def _table6(args, console) -> int:
    from reslab.experiments import Table6Config, run_table6

    given = _given(args, ("data", "depths", "seeds", "epochs", "val_split", "precision", "out", "jobs"))
    config = (Table6Config.resumed(args.resume, quiet=args.quiet, **given) if args.resume
              else Table6Config(quiet=args.quiet, **given))
    summary = run_table6(config, progress=_announce(console))
    console.print(table6_table(summary))
    print(f"wrote {summary['settings']['out']}/summary.json and table6.png")
    return 0


def table6_table(summary: dict):
    """The paper's Table 6 beside ours: per depth, the runs' mean +- std, min and max."""
    from reslab.cli.tables import table

    held_out = summary["evaluated_on"]
    columns = [("net", "left"), ("runs", "right"), (f"{held_out} err mean +- std", "right"), ("min", "right"),
               ("max", "right"), ("paper (test)", "right")]

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    def spread(d) -> str:
        return "" if d["test_error_std"] is None else f" +- {100 * d['test_error_std']:.2f}"

    rows = [[f"ResNet-{d['depth']}", str(d["runs"]), pct(d["test_error_mean"]) + spread(d), pct(d["test_error_min"]),
             pct(d["test_error_max"]),
             pct(d["paper_test_error"]) + (" (best of 5)" if d["depth"] == 110 else "")]
            for d in summary["depths"]]
    settings = summary["settings"]
    weights = ("weights at the end of the schedule" if held_out == "validation" or not settings["val_split"]
               else f"best-validation weights (val split {settings['val_split']:g})")
    note = "; no test split: validation error" if held_out == "validation" else ""
    return table(f"CIFAR-10 {held_out} error over seeds (paper Table 6): {settings['epochs']} epochs, {weights}{note}",
                 columns, rows)


def _inception(args, console) -> int:
    from reslab.experiments import InceptionConfig, run_inception

    options = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "image_size", "target_train_error")
               if getattr(args, k) is not None}
    if args.models:
        options["models"] = args.models
    config = InceptionConfig(data=args.data, recipe=args.recipe, seed=args.seed, precision=args.precision,
                             out=args.out, quiet=args.quiet, jobs=args.jobs, **options)
    summary = run_inception(config, progress=_announce(console))
    console.print(_inception_table(summary))
    print(f"wrote {summary['settings']['out']}/summary.json, metrics.csv and inception.png")
    return 0


def _inception_table(summary: dict):
    from rich import box

    from reslab.cli.tables import table

    settings = summary["settings"]
    columns = [(col, "left" if col == "model" else "right")
               for col in ("model", "params", "final", "mean", "epoch", "s/epoch", "test err")]
    rows = [[name, f"{m['params'] / 1e6:.2f}M", _pct(m["final_train_error"]), _pct(m["mean_train_error"]),
             "-" if m["epochs_to_target"] is None else str(m["epochs_to_target"]), f"{m['seconds_per_epoch']:.1f}",
             _pct(m["test_error"])] for name, m in summary["models"].items()]
    # Without vertical rules and with one space between columns, the table fits 80 columns with the
    # longest default name (28 characters).
    return table(f"{settings['epochs']} epochs, {settings['image_size']} px, {settings['precision_resolved']}; "
                 f"train error: final, mean over the epochs, first epoch <= {_pct(settings['target_train_error'])}",
                 columns, rows, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
