"""reslab.io: whole-or-absent files with ordinary permissions, and the one cache folder."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from reslab.checkpoint import CheckpointMeta, save_weights
from reslab.io import atomic_path, cache_root, write_json
from reslab.models import create_model


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_weights_get_the_same_permissions_as_every_other_run_file(tmp_path):
    # safetensors' save_file swaps in a file of its own (0600); the run's other files are 0644.
    weights = save_weights(tmp_path / "best.safetensors", create_model("resnet8", num_classes=2),
                           CheckpointMeta(model="resnet8", classes=["a", "b"]))
    config = write_json(tmp_path / "config.json", {"model": "resnet8"})
    assert _mode(weights) == _mode(config)
    assert _mode(config) & 0o044, "group and others can read a run's files, as with open()"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "config.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_json(tmp_path / "summary.json", {"epoch": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == '{\n  "epoch": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_one_cache_root_for_every_cached_thing(tmp_path, monkeypatch):
    monkeypatch.delenv("RESLAB_CACHE", raising=False)
    monkeypatch.delenv("RESLAB_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "reslab"
    monkeypatch.setenv("RESLAB_DATA", str(tmp_path / "old"))  # the former name still works
    assert cache_root() == tmp_path / "old"
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "new"))  # and the documented one wins
    assert cache_root() == tmp_path / "new"
    assert cache_root(tmp_path / "given") == tmp_path / "given"  # --data-dir

    # Every user goes through it: the models table, the CIFAR archives, downloaded weights.
    from reslab.data import cifar
    from reslab.models import catalog
    from reslab.transfer import sources

    monkeypatch.setattr(catalog, "_measure_row", lambda name: {"name": name, "family": "any"})  # measuring is slow
    assert catalog.catalog(quiet=True)
    assert len(list((tmp_path / "new").glob("models-*.json"))) == 1
    assert sources._cache_path("https://example.org/w/a.pth").is_relative_to(tmp_path / "new" / "weights")
    assert cifar.cache_root is cache_root
