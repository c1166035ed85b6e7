"""The registry with measured parameters and MACs, for `reslab models` and the README.

Measuring all 34 nets takes tens of seconds on a laptop CPU (building 600-block nets is Python
work), so results are cached per version of the model code; the cache key is a hash of this
package's model sources, so an edited block never shows stale numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from reslab.io import cache_root, write_text
from reslab.models.registry import get_model_spec, list_models
from reslab.models.summary import measure


def _code_hash() -> str:
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _measure_row(name: str) -> dict:
    spec = get_model_spec(name)
    c = measure(name)
    return {
        "name": name,
        "family": spec.family,
        "block": spec.block,
        "depth": spec.depth,
        "image_size": spec.image_size,
        "params": c["params"],
        "macs": c["macs"],
        "residual_adds": c["residual_adds"],
    }


def catalog(family: str | None = None, quiet: bool = False) -> list[dict]:
    """One dict per registered model: name, family, block, depth, image_size, params, macs, residual_adds."""
    path = cache_root() / f"models-{_code_hash()}.json"
    rows = None
    if path.exists():
        try:
            rows = json.loads(path.read_text())
        except (OSError, ValueError):
            rows = None
    if rows is None:
        from rich.console import Console
        from rich.progress import track

        names = list_models()
        # The bar goes to stderr: stdout holds the table, and `reslab models | grep` must see only that.
        rows = [_measure_row(n) for n in track(names, description="measuring models", disable=quiet,
                                                transient=True, console=Console(stderr=True))]
        try:
            write_text(path, json.dumps(rows))
        except OSError:
            pass  # a read-only home still gets its table, just not cached
    return [r for r in rows if family is None or r["family"] == family]
