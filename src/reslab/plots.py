"""Every figure reslab draws, with one look.

matplotlib runs headless (Agg): figures are written to files, never shown. Each public function
takes data and a path, writes a PNG and returns the path.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

if not os.environ.get("MPLBACKEND"):
    # Files only, never a window. A backend chosen by the user stays: a Jupyter kernel sets the
    # inline one, and switching it to Agg would stop the notebook's own plots from showing
    # (reslab's figures are closed once saved, so they never show there either).
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from reslab.io import atomic_path  # noqa: E402

# One palette for the whole package; plain nets and residual nets keep the same colour per depth.
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "font.size": 10,
    "axes.titlesize": 11,
    "legend.frameon": False,
}


def figure(ncols: int = 1, nrows: int = 1, *, width: float = 5.0, height: float = 3.6, **kwargs):
    """A figure and its axes in reslab's look (`width`/`height` are per panel, in inches)."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kwargs
        )
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.spines["top"].set_visible(False)
        ax.spines["right"].set_visible(False)
    return fig, axes


def save(fig, path: str | os.PathLike, *, tight: bool = True) -> Path:
    """Write atomically (see reslab.io) so a reader never sees half a PNG; `tight=False` keeps a
    layout the caller has set (tight_layout would undo room left for a figure legend)."""
    if tight:
        fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def heatmap_overlay(image, heatmap, alpha: float = 0.45):
    """An RGB uint8 image (H x W x 3) with a [0, 1] heat map (any size) blended over it.

    The heat map is resized to the image (bilinear) and drawn with the perceptually even "turbo"
    map; its weight grows with the heat, so cold regions keep the photo's own colours.
    """
    import numpy as np
    from PIL import Image

    image = np.asarray(image, dtype=np.uint8)
    height, width = image.shape[:2]
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != (height, width):
        heat = np.asarray(Image.fromarray(heat).resize((width, height), Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    colours = matplotlib.colormaps["turbo"](heat)[..., :3] * 255.0
    weight = (alpha * (0.35 + 0.65 * heat))[..., None]
    blended = image.astype(np.float32) * (1.0 - weight) + colours * weight
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def gradcam(path: str | os.PathLike, image, overlay, top_k, *, explained: str, layer: str, title: str = "") -> Path:
    """Grad-CAM figure: the image, the heat map over it, and the top-k probabilities as bars."""
    fig, axes = figure(3, 1, width=3.6, height=3.6, gridspec_kw={"width_ratios": [1, 1, 1.25]})
    for ax, picture, caption in ((axes[0, 0], image, "input"), (axes[0, 1], overlay, f"Grad-CAM: {explained}")):
        ax.imshow(picture)
        ax.set_title(caption)
        ax.axis("off")
    ax = axes[0, 2]
    names = [name for name, _ in top_k][::-1]
    probs = [p for _, p in top_k][::-1]
    colours = [PALETTE[1] if name == explained else PALETTE[0] for name in names]
    ax.barh(range(len(names)), probs, color=colours)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    ax.set_title(f"top-{len(top_k)}")
    ax.grid(True, axis="x", alpha=0.3)
    ax.grid(False, axis="y")
    for i, p in enumerate(probs):
        ax.text(min(p + 0.02, 0.82), i, f"{p:.1%}", va="center", fontsize=9)
    if title:
        fig.suptitle(f"{title}: heat map from {layer}", fontsize=10)
    return save(fig, path)


# --- The paper's experiments (reslab.experiments) ------------------------------------------------


def depth_colours(depths) -> dict[int, str]:
    """One colour per depth, shared by the plain and the residual net of that depth (paper Fig. 6)."""
    return {d: PALETTE[i % len(PALETTE)] for i, d in enumerate(sorted(set(depths)))}


def _net_label(name: str, info: dict) -> str:
    return name if info.get("trained", True) else f"{name} (initialized)"


def degradation(curves: dict[str, dict], path: str | os.PathLike) -> Path:
    """Paper Figure 6: plain nets left, residual nets right; training error dashed, validation solid.

    `curves` maps a model name to {"depth", "residual", "epoch": [...], "train_error": [...],
    "val_error": [...]} with errors as fractions (drawn as percentages, as the paper does), and
    optionally "iteration": [...], the optimizer steps at each epoch's end: the paper's x axis, and
    "steps": {"iteration": [...], "train_error": [...]}, the training error within epochs (the
    trainer's steps.csv), which then draws the dashed curve.
    """
    colours = depth_colours(c["depth"] for c in curves.values())
    fig, axes = figure(2, 1, width=4.6, height=3.6, sharey=True)
    panels = {False: axes[0, 0], True: axes[0, 1]}
    by_iteration = all("iteration" in c for c in curves.values())
    for name, c in sorted(curves.items(), key=lambda kv: kv[1]["depth"]):
        ax, colour = panels[bool(c["residual"])], colours[c["depth"]]
        x = c["iteration"] if by_iteration else c["epoch"]
        within = c.get("steps") or {}
        if by_iteration and within.get("iteration"):
            ax.plot(within["iteration"], [100 * e for e in within["train_error"]], "--", color=colour, lw=1.2)
        else:
            ax.plot(x, [100 * e for e in c["train_error"]], "--", color=colour, lw=1.2)
        # A data set without a validation split has no bold line; the legend still names the net.
        val = [float("nan") if e is None else 100 * e for e in c["val_error"]]
        ax.plot(x, val, "-", color=colour, lw=2.4, label=name)
    for residual, ax in panels.items():
        ax.set_title("residual nets" if residual else "plain nets")
        ax.set_xlabel("iterations" if by_iteration else "epoch")
        ax.legend(loc="upper right")
    panels[False].set_ylabel("error (%)")
    fig.text(0.5, 0.005, "dashed: training error, bold: validation error", ha="center", fontsize=8)
    fig.subplots_adjust(bottom=0.2)
    return save(fig, path)


def table6(summary: dict, path: str | os.PathLike) -> Path:
    """Paper Table 6 as a figure: held-out error against depth; each seed's run a dot, the mean with
    a bar of one standard deviation, the paper's number a cross (`summary`: reslab.experiments.table6)."""
    held_out = "validation" if summary["evaluated_on"] == "validation" else "test"
    fig, axes = figure(1, 1, width=5.2, height=3.6)
    ax = axes[0, 0]
    depths = [d["depth"] for d in summary["depths"]]
    positions = {depth: i for i, depth in enumerate(depths)}  # one slot per depth: 110 does not squash 20-56
    for run in summary["runs"]:
        ax.plot(positions[run["depth"]] - 0.12, 100 * run["test_error"], "o", color=PALETTE[0], ms=3.5, alpha=0.6)
    mean = [100 * d["test_error_mean"] for d in summary["depths"]]
    std = [100 * (d["test_error_std"] or 0.0) for d in summary["depths"]]
    ax.errorbar(range(len(depths)), mean, yerr=std, fmt="s-", color=PALETTE[0], ms=5, lw=1.4, capsize=4,
                label=f"reslab: mean +- std over seeds ({held_out})")
    paper = [(positions[d["depth"]] + 0.12, 100 * d["paper_test_error"]) for d in summary["depths"]
             if d["paper_test_error"] is not None]
    if paper:
        ax.plot(*zip(*paper), "x", color=PALETTE[1], ms=7, mew=2, label="paper, Table 6 (test)")
    ax.set_xticks(range(len(depths)), [f"ResNet-{d}" for d in depths])
    ax.set_xlim(-0.5, len(depths) - 0.5)  # one slot per depth, also for a single depth (dots and cross beside it)
    ax.set_ylabel(f"{held_out} error (%)")
    ax.set_title(f"CIFAR-10 {held_out} error by depth")
    ax.legend(loc="best", fontsize=8)
    return save(fig, path)


def inception_curves(curves: dict[str, dict], path: str | os.PathLike) -> Path:
    """Szegedy et al. 2016, Figures 21-26: training curves of nets with and without residual adds.

    `curves` maps a model name to {"residual", "plain_twin" (the name of the same net without
    shortcuts, or None), "params", "epoch": [...], "train_error": [...], "train_loss": [...],
    "seconds": [...] (cumulative training time)}. A residual net and its plain twin share a colour;
    residual nets are drawn solid, plain ones dashed. Panels: training error against epochs and
    against seconds (errors as percentages), training loss against epochs (log scale).
    """
    # A plain net takes the colour of the residual net whose twin it is.
    groups = {name: next((r for r, c in curves.items() if c["plain_twin"] == name), name) for name in curves}
    colours = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(dict.fromkeys(groups.values()))}
    fig, axes = figure(3, 1, width=4.2, height=3.6)
    error, loss, timed = axes[0]
    for name, c in curves.items():
        style = dict(color=colours[groups[name]], lw=1.8 if c["residual"] else 1.4, ls="-" if c["residual"] else "--",
                     marker="o" if c["residual"] else "x", ms=3)
        label = f"{name} ({c['params'] / 1e6:.2f}M)"
        error.plot(c["epoch"], [100 * e for e in c["train_error"]], label=label, **style)
        loss.plot(c["epoch"], c["train_loss"], **style)
        timed.plot(c["seconds"], [100 * e for e in c["train_error"]], **style)
    error.set_title("training error")
    error.set_xlabel("epoch")
    error.set_ylabel("error (%)")
    loss.set_title("training loss")
    loss.set_xlabel("epoch")
    loss.set_yscale("log")
    timed.set_title("training error against time")
    timed.set_xlabel("training seconds")
    for ax in (error, loss):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    # Below the panels: inside one, the legend would hide a curve that has not come down yet.
    legend_rows = -(-len(curves) // 4)
    fig.tight_layout()
    fig.subplots_adjust(bottom=0.2 + 0.07 * legend_rows)
    fig.legend(*error.get_legend_handles_labels(), loc="lower center", bbox_to_anchor=(0.5, 0.05),
               ncol=min(len(curves), 4), fontsize=8, frameon=False)
    fig.text(0.5, 0.01, "solid: residual adds, dashed: none; one colour per net and its plain twin",
             ha="center", fontsize=8)
    return save(fig, path, tight=False)


def gradient_norms(summary: dict, path: str | os.PathLike) -> Path:
    """Gradient norm per weight layer (input side left), log scale; at initialization and after N steps."""
    models = summary["models"]
    colours = depth_colours(m["depth"] for m in models.values())
    steps = summary["settings"]["steps"]
    fig, axes = figure(2, 1, width=4.8, height=3.6, sharey=True)
    for ax, key, title in ((axes[0, 0], "init", "at initialization"),
                           (axes[0, 1], "after", f"after {steps} SGD steps")):
        for name, m in models.items():
            layer = range(1, len(m[key]) + 1)
            ax.plot(layer, m[key], "-" if m["residual"] else "--", color=colours[m["depth"]], lw=1.4,
                    marker="o" if m["residual"] else "x", ms=2.5, label=name)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("layer (input side -> output side)")
    axes[0, 0].set_ylabel("||dL/dW|| (L2)")
    axes[0, 1].legend(loc="best", fontsize=8)
    return save(fig, path)


def layer_responses(summary: dict, path: str | os.PathLike) -> Path:
    """Paper Figure 7: std of each block's residual-function output, in layer order and sorted."""
    models = summary["models"]
    colours = depth_colours(m["depth"] for m in models.values())
    fig, axes = figure(1, 2, width=7.0, height=2.8)
    for name, m in models.items():
        style = dict(color=colours[m["depth"]], lw=1.4, ls="-" if m["residual"] else "--",
                     marker="o" if m["residual"] else "x", ms=2.5, label=_net_label(name, m))
        index = range(1, len(m["std"]) + 1)
        axes[0, 0].plot(index, m["std"], **style)
        axes[1, 0].plot(index, sorted(m["std"], reverse=True), **style)
    axes[0, 0].set_xlabel("block (original order)")
    axes[1, 0].set_xlabel("block (sorted by magnitude)")
    for ax in axes.flat:
        ax.set_ylabel("std of response")
    axes[0, 0].legend(loc="best", fontsize=8)
    return save(fig, path)


def curves(path: str | os.PathLike, rows) -> Path:
    """Training curves from metrics rows (epoch, lr, train_loss, train_acc, val_loss, val_acc, ...):
    loss and accuracy, train against validation, one panel each."""
    fig, axes = figure(2, 1, width=4.6, height=3.4)
    epochs = [r[0] for r in rows]
    for ax, (train_i, val_i, name) in zip(axes[0], ((2, 4, "loss"), (3, 5, "accuracy"))):
        ax.plot(epochs, [r[train_i] for r in rows], marker="o", ms=3, label="train")
        val = [(e, r[val_i]) for e, r in zip(epochs, rows) if r[val_i] is not None]
        if val:
            ax.plot(*zip(*val), marker="o", ms=3, label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if name == "loss":  # early validation losses can be 100x the final ones (stale BN statistics)
            ax.set_yscale("log")
        ax.legend()
    if epochs:
        axes[0, 0].set_xlim(min(epochs) - 0.2, max(epochs) + 0.2)
    return save(fig, path)


def confusion(path: str | os.PathLike, matrix, classes, *, title: str = "confusion matrix") -> Path:
    """Row-normalized confusion matrix (rows: true class, columns: predicted), counts written in."""
    import numpy as np

    matrix = np.asarray(matrix)
    n = len(classes)
    side = min(max(3.2, 0.45 * n + 1.6), 14)
    fig, axes = figure(1, 1, width=side + 0.8, height=side)
    ax = axes[0, 0]
    ax.grid(False)
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90 if max(map(len, classes)) > 3 else 0)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return save(fig, path)


def _image_grid(images, ncols: int, *, width: float, height: float):
    """A figure of uint8 N x C x H x W `images` (C = 1 or 3), `ncols` to a row, axes off; returns it and
    the axes that hold an image, in order. Small images are drawn with nearest pixels, not blurred."""
    import numpy as np

    images = np.asarray(images)
    n = len(images)
    ncols = max(1, min(ncols, n))
    fig, axes = figure(ncols, max(1, -(-n // ncols)), width=width, height=height)
    cells = []
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            picture = images[k].transpose(1, 2, 0)
            gray = picture.shape[2] == 1
            ax.imshow(picture[..., 0] if gray else picture, cmap="gray" if gray else None, vmin=0, vmax=255,
                      interpolation="nearest" if picture.shape[0] < 64 else "antialiased")
            cells.append(ax)
    return fig, cells


def samples(path: str | os.PathLike, images, true, predicted, classes, *, probabilities=None, ncols: int = 8) -> Path:
    """A grid of images titled "true / predicted"; wrong predictions in red with a red frame.

    `images`: uint8 N x C x H x W (C = 1 or 3), as the data pipeline stores them.
    """
    fig, cells = _image_grid(images, ncols, width=1.55, height=1.75)
    for k, ax in enumerate(cells):
        wrong = true[k] != predicted[k]
        text = f"{classes[true[k]]} / {classes[predicted[k]]}"
        if probabilities is not None:
            text += f" {probabilities[k]:.2f}"
        ax.set_title(text, fontsize=7, color=PALETTE[1] if wrong else "black")
        if wrong:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color(PALETTE[1])
                spine.set_linewidth(2.5)
    fig.suptitle("true / predicted (wrong in red)", fontsize=9)
    return save(fig, path)


def top_losses(path: str | os.PathLike, images, entries, *, ncols: int = 4) -> Path:
    """The images a model is most confidently wrong about (fastai's plot_top_losses): each titled
    with its file, "true / predicted p", and its loss -log p(true); wrong predictions in red.

    `images`: uint8 N x C x H x W; `entries`: eval.json's `top_losses` rows, in the same order.
    """
    fig, cells = _image_grid(images, ncols, width=2.3, height=2.9)
    for k, ax in enumerate(cells):
        row = entries[k]
        # The class folder and the file name find the photo; the full path is in eval.json.
        shown = "/".join(Path(row["file"]).parts[-2:]) if not row["file"].startswith("#") else row["file"]
        shown = shown if len(shown) <= 32 else "..." + shown[-29:]
        wrong = row["true"] != row["predicted"]
        ax.set_title(f"{shown}\n{row['true']} / {row['predicted']} {row['p_predicted']:.2f}\n"
                     f"loss {row['loss']:.2f}", fontsize=7, color=PALETTE[1] if wrong else "black")
    fig.suptitle("top losses: file, true / predicted p, -log p(true)", fontsize=9)
    return save(fig, path)


def lr_find(path: str | os.PathLike, lrs, losses, suggestion: float, rule: str,
            others: dict[str, float] | None = None) -> Path:
    """The learning-rate range test (reslab.train.lr_find): smoothed loss against the lr on a log
    axis, the suggested lr marked, and what the `others` rules would suggest dotted."""
    fig, axes = figure(1, 1, width=5.0, height=3.6)
    ax = axes[0, 0]
    ax.plot(lrs, losses, label="smoothed training loss")
    ax.axvline(suggestion, color=PALETTE[1], linestyle="--", lw=1)
    nearest = min(range(len(lrs)), key=lambda i: abs(math.log(lrs[i] / suggestion)))
    ax.plot([suggestion], [losses[nearest]], "o", color=PALETTE[1], label=f"suggested lr {suggestion:.3g} ({rule})")
    for name, lr in (others or {}).items():
        if name != rule:
            ax.axvline(lr, color="grey", linestyle=":", lw=1, label=f"{name}: {lr:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (peak, --lr)")
    ax.set_ylabel("loss")
    ax.set_title("learning-rate range test")
    ax.legend(loc="best", fontsize=8)
    return save(fig, path)
