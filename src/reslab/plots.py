"""Every figure reslab draws, with one look.

matplotlib runs headless (Agg): figures are written to files, never shown. Each public function
takes data and a path, writes a PNG and returns the path.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

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


def save(fig, path: str | os.PathLike) -> Path:
    """Write atomically (see reslab.io) so a reader never sees half a PNG."""
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
        fig.suptitle(f"{title}  (layer {layer})", fontsize=10)
    return save(fig, path)
