"""Live progress bars where they can be drawn: a terminal, or a notebook with ipywidgets."""

from __future__ import annotations

import importlib.util


def live_bars_work(console=None) -> bool:
    """Whether a rich live display (a progress bar) can draw on `console` (default: rich's own).

    In a Jupyter kernel rich draws live displays only through ipywidgets; without it, it warns
    'install "ipywidgets"' on every refresh and draws nothing. There the bars are left off and the
    callers' plain lines (one per epoch) are the progress.
    """
    if console is None:
        from rich import get_console

        console = get_console()
    return not console.is_jupyter or importlib.util.find_spec("ipywidgets") is not None
