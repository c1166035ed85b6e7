"""The one way the commands print tables and lines: whole names in a terminal, whole lines in a pipe.

rich fits everything to the terminal's width; with stdout redirected it assumes 80 columns, so
`reslab models | grep inception` found `incept…`. Here a console that is not a terminal has no width
limit (nothing is wrapped, cut or cropped: a table is as wide as its contents), and in a terminal
the name column keeps its full width while the other columns fold. Every cell and title is taken
literally: names of classes, folders and files may contain `[...]`, which rich would read as markup.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

# Wider than any table or line the commands print, so none is wrapped or cropped; nothing pads to
# the console's width (tables take their contents' width, lines are not justified, and `heading`
# replaces rules). Not soft_wrap: rich then stops centering titles.
UNBOUNDED = 1_000_000


def console(stderr: bool = False, file=None) -> Console:
    """A console on stdout (stderr, or `file`) that fits a terminal, or has no width limit when it is
    not one (a pipe, a file): there every line comes out whole, whatever COLUMNS says."""
    fitted = Console(stderr=stderr, file=file)
    if fitted.is_terminal:
        return fitted
    return Console(stderr=stderr, file=file, width=UNBOUNDED)


def table(title: str, columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[str | Text]],
          **options) -> Table:
    """A rich Table of `rows` under `title`, every str shown literally (never parsed as markup).

    `columns`: (header, justify) pairs. The first column holds the names (models, classes, layers,
    peers, files): it never wraps and keeps the width of its longest cell even when the terminal is
    narrower, where the other columns fold. A cell given as rich Text keeps its style.
    `options` go to Table (box, show_lines, ...)."""
    rows = [[Text(cell) if isinstance(cell, str) else cell for cell in row] for row in rows]
    # At least as wide as the title, which rich would otherwise fold (a path in it too) to the
    # table's width; a terminal narrower than the title still wraps it.
    options.setdefault("min_width", cell_len(title))
    out = Table(title=escape(title), **options)
    for k, (header, justify) in enumerate(columns):
        if k == 0:
            # min_width: rich narrows even a no_wrap column (to `name…`) once the others are folded.
            widest = max([cell_len(header)] + [r[k].cell_len for r in rows])
            out.add_column(header, justify=justify, no_wrap=True, min_width=widest)
        else:
            out.add_column(header, justify=justify, overflow="fold")
    for row in rows:
        out.add_row(*row)
    return out


def heading(out: Console, text: str) -> None:
    """A section heading: a rule across a terminal, one plain line in a pipe (a rule there would be
    as wide as the unbounded console)."""
    if out.is_terminal:
        out.rule(Text(text, style="bold"))
    else:
        out.print(f"-- {text} --", markup=False, highlight=False)
