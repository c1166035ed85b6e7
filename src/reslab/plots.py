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
