"""Execute the course notebooks in a fresh kernel of this Python (the project's venv).

    python notebooks/run_notebooks.py            # `make notebooks`: full size, outputs written back
    python notebooks/run_notebooks.py --small    # what the tests do: small data, copies, nothing written back

Each notebook runs in a kernel started from `sys.executable`, not from whatever kernel named
"python3" a user's Jupyter set-up happens to list, so the notebooks import the reslab of this
checkout. The kernel's working directory (where a notebook writes its runs and photos) and
reslab's cache are a temporary folder: nothing lands in the repository but the outputs.
`tests/test_notebooks.py` imports this module and uses `execute`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SMALL_ENV = "RESLAB_NOTEBOOK_SMALL"  # the notebooks read it to shrink epochs and data (tests)
KERNEL = "reslab-notebooks"
# Tags and metadata by which a notebook could hide a failure from its executor: none is allowed.
HIDING_TAGS = ("raises-exception", "skip-execution")


def notebooks() -> list[Path]:
    """The course in its order: 01_... to 06_..."""
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def hidden_failures(path: Path) -> list[str]:
    """What in a notebook would let an error pass: cell tags, `allow_errors` in its metadata."""
    nb = json.loads(path.read_text())
    found = []
    for key in ("allow_errors", "allow_error_names"):
        if key in json.dumps(nb.get("metadata", {})):
            found.append(f"{path.name}: notebook metadata sets {key}")
    for i, cell in enumerate(nb["cells"]):
        tags = cell.get("metadata", {}).get("tags", [])
        for tag in tags:
            if tag in HIDING_TAGS:
                found.append(f"{path.name}: cell {i} is tagged {tag!r}")
        if "allow_errors" in json.dumps(cell.get("metadata", {})):
            found.append(f"{path.name}: cell {i} metadata sets allow_errors")
    return found


def _kernel_dir(root: Path) -> Path:
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "reslab (this venv)",
        "language": "python",
    }))
    return root / "kernels"


def execute(path: Path, *, small: bool, workdir: Path, write_to: Path | None = None, timeout: int = 600):
    """Run `path` top to bottom in a fresh kernel with `workdir` as its working directory; raise on
    the first error (nbclient's CellExecutionError names the cell). Returns the executed notebook,
    written to `write_to` when given."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    workdir.mkdir(parents=True, exist_ok=True)
    specs = KernelSpecManager(kernel_dirs=[str(_kernel_dir(workdir / ".kernel"))], ensure_native_kernel=False)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
    # The reader's environment as it is (no colour switched off for the test's sake): what rich and
    # matplotlib do in a kernel is what the committed outputs show. Only the cache is our own.
    env = {**os.environ, "RESLAB_CACHE": str(workdir / ".cache")}
    env.pop(SMALL_ENV, None)
    if small:
        env[SMALL_ENV] = "1"
    client = NotebookClient(nb, km=km, kernel_name=KERNEL, timeout=timeout, record_timing=False,
                            force_raise_errors=True, resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute(env=env)
    finally:
        # A kernel manager handed to nbclient stays ours to stop: else each notebook leaves a kernel
        # (a Python with torch loaded) running until this process ends.
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    # The kernel spec is ours, not the reader's: the committed notebook names the usual one.
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    if write_to is not None:
        nbformat.write(nb, write_to)
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all), e.g. 02_the_residual_block")
    parser.add_argument("--small", action="store_true", help=f"small data ({SMALL_ENV}=1); outputs not written back")
    args = parser.parse_args(argv)
    paths = [p for p in notebooks() if not args.names or any(n in p.name for n in args.names)]
    failed = []
    for path in paths:
        problems = hidden_failures(path)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            failed.append(path.name)
            continue
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="reslab-nb-") as tmp:
                execute(path, small=args.small, workdir=Path(tmp), write_to=None if args.small else path)
        except Exception as err:  # the next notebooks still run; the exit code says that one failed
            print(f"{path.name}: FAILED\n{err}", file=sys.stderr, flush=True)
            failed.append(path.name)
            continue
        print(f"{path.name}: {time.perf_counter() - started:.1f} s{' (small)' if args.small else ''}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
