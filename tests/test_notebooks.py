"""The course notebooks run top to bottom, and docs/course.md's Keras-to-reslab table holds.

Each notebook runs in a fresh kernel of this venv on small data (RESLAB_NOTEBOOK_SMALL=1), as a
copy in a temporary folder: its own asserts (equal outputs, counts equal to the registry's, trained
accuracies above chance) are the checks, and a failing cell fails the test. The committed files,
whose outputs `make notebooks` writes, are read but never written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
COURSE = ROOT / "docs" / "course.md"
# The course's parts, in its order (README, "The course as notebooks").
PARTS = [
    "01_plain_nets_and_degradation",
    "02_the_residual_block",
    "03_the_resnet_family",
    "04_training_on_images",
    "05_transfer_learning",
    "06_inception_beside_resnet",
]
TRAINING = {"01_plain_nets_and_degradation", "04_training_on_images", "05_transfer_learning",
            "06_inception_beside_resnet"}


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", NOTEBOOKS / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(name: str) -> dict:
    return json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())


def _text(output: dict) -> str:
    """What an output shows as text: a stream, a traceback, or a display's text/plain and text/html."""
    parts = [output.get("text", "")] + output.get("traceback", [])
    data = output.get("data", {})
    parts += [data.get("text/plain", ""), data.get("text/html", "")]
    return "".join("".join(p) if isinstance(p, list) else p for p in parts)


def test_the_course_is_all_there_in_order():
    assert [p.stem for p in _runner().notebooks()] == PARTS


@pytest.mark.parametrize("name", PARTS)
def test_notebook_opens_with_what_it_teaches_and_ends_with_what_next(name):
    cells = _read(name)["cells"]
    assert cells[0]["cell_type"] == "markdown" and "What this notebook teaches" in "".join(cells[0]["source"])
    assert cells[-1]["cell_type"] == "markdown" and "## What to try next" in "".join(cells[-1]["source"])
    if name in TRAINING:  # the small-data switch the tests rely on
        assert any("RESLAB_NOTEBOOK_SMALL" in "".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("name", PARTS)
def test_no_cell_may_skip_or_allow_errors(name):
    assert _runner().hidden_failures(NOTEBOOKS / f"{name}.ipynb") == []


def test_hidden_failures_are_found(tmp_path):
    nb = {"cells": [{"cell_type": "code", "source": "1/0", "metadata": {"tags": ["raises-exception"]}},
                    {"cell_type": "code", "source": "x", "metadata": {"tags": ["skip-execution"]}}],
          "metadata": {"execution": {"allow_errors": True}}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "bad.ipynb"
    path.write_text(json.dumps(nb))
    found = _runner().hidden_failures(path)
    assert len(found) == 3 and "raises-exception" in found[1] and "skip-execution" in found[2]


@pytest.mark.parametrize("name", PARTS)
def test_committed_outputs_read_cleanly(name):
    """Outputs are committed for reading on the web (`make notebooks`): every code cell ran, and
    no output holds an error, terminal escape codes, a warning about a missing widget library,
    or a progress line per step."""
    cells = [c for c in _read(name)["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in cells), "run `make notebooks` to write the outputs"
    for i, cell in enumerate(cells):
        for output in cell.get("outputs", []):
            text = _text(output)
            assert output["output_type"] != "error", f"cell {i}: {text[:200]}"
            assert "\x1b[" not in text and "\r" not in text, f"cell {i} holds terminal control codes"
            assert "ipywidgets" not in text, f"cell {i}: {text[:200]}"
        epoch_lines = sum(len(re.findall(r"^epoch \d+/\d+ ", _text(o), re.M)) for o in cell.get("outputs", []))
        steps = sum(len(re.findall(r"^step \d+", _text(o), re.M)) for o in cell.get("outputs", []))
        assert epoch_lines <= 40 and steps == 0, f"cell {i}: {epoch_lines} epoch lines, {steps} step lines"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("name", PARTS)
def test_notebook_runs(name, tmp_path):
    path = NOTEBOOKS / f"{name}.ipynb"
    before = _digest(path)
    _runner().execute(path, small=True, workdir=tmp_path)
    assert _digest(path) == before, "the test must run a copy, not write the committed notebook"


@pytest.mark.slow
def test_a_failing_cell_fails_the_run(tmp_path):
    from nbclient.exceptions import CellExecutionError

    nb = {"cells": [{"cell_type": "code", "source": "import os\nassert os.environ['RESLAB_NOTEBOOK_SMALL'] == '1'",
                     "metadata": {}, "outputs": [], "execution_count": None, "id": "a"},
                    {"cell_type": "code", "source": "assert 1 + 1 == 3, 'no longer holds'", "metadata": {},
                     "outputs": [], "execution_count": None, "id": "b"}],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "fails.ipynb"
    path.write_text(json.dumps(nb))
    with pytest.raises(CellExecutionError, match="no longer holds"):
        _runner().execute(path, small=True, workdir=tmp_path / "work")


def test_live_bars_only_where_they_can_draw(monkeypatch):
    """rich draws a live bar in Jupyter only through ipywidgets and warns on every refresh without
    it: there reslab's bars are off and the per-epoch lines are the progress."""
    import importlib.util as util

    from rich.console import Console

    from reslab.console import live_bars_work

    real_find_spec = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "ipywidgets" else real_find_spec(name, *a))
    assert live_bars_work(Console(force_jupyter=False)) is True
    assert live_bars_work(Console(force_jupyter=True)) is False


def test_plots_keep_a_notebooks_backend():
    """Importing reslab in a Jupyter kernel must not switch its inline backend to Agg (the
    notebook's own plots would stop showing); elsewhere reslab draws with Agg."""
    code = "import reslab.plots, matplotlib; print(matplotlib.get_backend())"
    inline = "module://matplotlib_inline.backend_inline"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    kept = subprocess.run([sys.executable, "-c", code], env={**env, "MPLBACKEND": inline}, capture_output=True,
                          text=True, check=True)
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert kept.stdout.strip() == inline
    assert default.stdout.strip().lower() == "agg"


def _course_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", COURSE.read_text(), re.S)


def test_course_table_python_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "cache"))
    blocks = _course_blocks()
    assert blocks
    for block in blocks:
        exec(compile(block, str(COURSE), "exec"), {})


def test_course_table_commands_parse():
    """Every `reslab ...` command in docs/course.md is accepted by reslab's own parser."""
    from reslab.cli import build_parser

    commands = re.findall(r"`(reslab [^`]+)`", COURSE.read_text())
    assert len(commands) >= 15
    parser = build_parser()
    for command in commands:
        try:
            parser.parse_args(shlex.split(command)[1:])
        except SystemExit:
            pytest.fail(f"docs/course.md: {command!r} is not a valid reslab command")


def test_readme_links_the_course():
    readme = (ROOT / "README.md").read_text()
    assert "docs/course.md" in readme
    for name in PARTS:
        assert f"notebooks/{name}.ipynb" in readme
