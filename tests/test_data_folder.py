"""Image folders: mixed formats and modes, skipped files, layouts, errors, splits, the decode cache."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reslab.data import DataWarning, load_data, preprocess_image
from reslab.data import folder as folder_module
from reslab.errors import ReslabError


def _rgb(value, size=(24, 20)):
    return Image.new("RGB", size, value)


def make_mixed_folder(root: Path) -> Path:
    """cats: 5 readable images + a text file; dogs: 5 readable images + a corrupt JPEG."""
    cats, dogs = root / "cats", root / "dogs"
    cats.mkdir(parents=True)
    dogs.mkdir()
    _rgb((200, 10, 10)).save(cats / "a.jpg")
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent -> white
    rgba.save(cats / "b.png")
    _rgb((10, 200, 10)).convert("P", palette=Image.Palette.ADAPTIVE).save(cats / "c.gif")
    Image.new("L", (30, 18), 77).save(cats / "d.bmp")
    Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)).save(cats / "e16.png")  # 16-bit grey
    (cats / "notes.txt").write_text("not an image")
    _rgb((10, 10, 200)).save(dogs / "f.webp")
    _rgb((100, 100, 100)).save(dogs / "g.tif")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(dogs / "h.jpg")  # red in CMYK
    exif_rotated = np.zeros((20, 40, 3), np.uint8)
    exif_rotated[:, :20] = (255, 0, 0)
    exif_rotated[:, 20:] = (0, 0, 255)
    img = Image.fromarray(exif_rotated)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": left half ends up on top
    img.save(dogs / "i.jpg", exif=exif)
    (dogs / "sub").mkdir()
    _rgb((50, 60, 70)).save(dogs / "sub" / "j.png")  # nested folders belong to their class too
    (dogs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (dogs / ".DS_Store").write_bytes(b"hidden files are ignored")
    return root


def _load(path, tmp_path, **kwargs):
    kwargs.setdefault("quiet", True)
    return load_data(str(path), data_dir=str(tmp_path / "cache"), **kwargs)


def test_mixed_formats_modes_and_one_warning(tmp_path):
    root = make_mixed_folder(tmp_path / "pets")
    with pytest.warns(DataWarning) as caught:
        bundle = _load(root, tmp_path, val_split=0.0, image_size=16)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped 2 files" in message and "broken.jpg" in message and "notes.txt" in message
    assert bundle.classes == ["cats", "dogs"]
    assert bundle.train.labels.tolist() == [0] * 5 + [1] * 5
    assert bundle.val is None and bundle.test is None
    assert bundle.train.images.shape == (10, 3, 16, 16) and bundle.train.images.dtype.is_floating_point is False
    assert bundle.source["skipped"] == 2 and bundle.in_channels == 3 and bundle.augment == "folder"

    px = {p.name: preprocess_image(p, **bundle.preprocessing()) for p in sorted(root.rglob("*.*"))
          if p.suffix not in (".txt",) and p.name not in ("broken.jpg", ".DS_Store")}
    assert px["b.png"].min() == 255  # transparent composited on white
    assert px["d.bmp"][:, 8, 8].tolist() == [77, 77, 77]  # grey replicated to RGB
    assert px["e16.png"].min() == 255  # 16-bit full scale -> 255, not clipped garbage
    red = px["h.jpg"][:, 8, 8].int()
    assert red[0] > 200 and red[1] < 60 and red[2] < 60  # CMYK converted, not inverted
    rotated = px["i.jpg"].int()
    assert rotated[0, 2, 8] > 200 and rotated[2, 2, 8] < 60  # top: red (was the left half)
    assert rotated[2, 13, 8] > 200 and rotated[0, 13, 8] < 60  # bottom: blue
    # Folder loading and preprocess_image are the same path: identical pixels.
    names = ["a.jpg", "b.png", "c.gif", "d.bmp", "e16.png"]
    for i, name in enumerate(names):
        assert bundle.train.images[i].equal(px[name]), name


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = make_mixed_folder(tmp_path / "pets")
    with pytest.warns(DataWarning):
        first = _load(root, tmp_path, val_split=0.0, image_size=16)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(folder_module, "_decode_all", no_decoding)
    with pytest.warns(DataWarning, match="skipped 2 files"):  # still reported on every load
        second = _load(root, tmp_path, val_split=0.0, image_size=16)
    assert second.train.images.equal(first.train.images)
    assert second.mean == first.mean
    monkeypatch.undo()
    _rgb((1, 2, 3)).save(root / "cats" / "new.png")
    with pytest.warns(DataWarning):
        third = _load(root, tmp_path, val_split=0.0, image_size=16)
    assert len(third.train) == 11


def test_worker_processes_give_the_same_pixels(tmp_path):
    root = tmp_path / "many"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    serial = folder_module.load_folder(str(root), image_size=16, val_split=0.0, seed=0,
                                       data_dir=str(tmp_path / "c1"), quiet=True, workers=1)
    parallel = folder_module.load_folder(str(root), image_size=16, val_split=0.0, seed=0,
                                         data_dir=str(tmp_path / "c2"), quiet=True, workers=2)
    assert parallel.train.images.equal(serial.train.images)
    assert parallel.train.labels.tolist() == [0] * 12 + [1] * 12


def test_split_is_seeded_stratified_and_deterministic(tmp_path):
    root = tmp_path / "ab"
    for cls, count in (("a", 20), ("b", 10)):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            _rgb((i * 10, 0, 0), (8, 8)).save(root / cls / f"{i:02d}.png")
    one = _load(root, tmp_path, seed=1, image_size=8)
    two = _load(root, tmp_path, seed=1, image_size=8)
    other = _load(root, tmp_path, seed=2, image_size=8)
    assert (len(one.train), len(one.val)) == (24, 6)  # default 0.2 of each class
    assert one.val.labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert one.val.images.equal(two.val.images) and one.train.images.equal(two.train.images)
    assert not one.val.images.equal(other.val.images)
    assert one.source["layout"] == "classes" and one.source["val_split"] == 0.2


def test_train_val_test_layout(tmp_path):
    root = tmp_path / "splits"
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for cls in ("x", "y"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                _rgb((i, 0, 0), (8, 8)).save(root / split / cls / f"{i}.png")
    bundle = _load(root, tmp_path, image_size=8)
    assert bundle.classes == ["x", "y"]
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (6, 4, 2)
    assert bundle.test.labels.tolist() == [0, 1]
    with pytest.raises(ReslabError, match="conflicts with .*val"):
        _load(root, tmp_path, image_size=8, val_split=0.5)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(ReslabError, match="not found"):
        _load(tmp_path / "nowhere", tmp_path)
    (tmp_path / "flat").mkdir()
    _rgb((0, 0, 0)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ReslabError, match=r"flat has no class subfolders"):
        _load(tmp_path / "flat", tmp_path)

    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir()
    _rgb((0, 0, 0)).save(tmp_path / "empty" / "a" / "1.png")
    with pytest.raises(ReslabError, match=r"class folder .*empty/b is empty"):
        _load(tmp_path / "empty", tmp_path)

    (tmp_path / "unreadable" / "a").mkdir(parents=True)
    (tmp_path / "unreadable" / "b").mkdir()
    _rgb((0, 0, 0)).save(tmp_path / "unreadable" / "a" / "1.png")
    (tmp_path / "unreadable" / "b" / "1.jpg").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(ReslabError, match=r"unreadable/b holds no readable image"):
            _load(tmp_path / "unreadable", tmp_path)

    root = tmp_path / "missing"
    for split, classes in (("train", ("cat", "dog")), ("val", ("cat",))):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            _rgb((0, 0, 0)).save(root / split / cls / "1.png")
    with pytest.raises(ReslabError, match=r"missing/val has no folder for class dog"):
        _load(root, tmp_path)


def test_preprocess_image_errors_and_modes(tmp_path):
    with pytest.raises(ReslabError, match="image not found"):
        preprocess_image(tmp_path / "nope.jpg", image_size=8, in_channels=3)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ReslabError, match="cannot read"):
        preprocess_image(tmp_path / "bad.png", image_size=8, in_channels=3)
    img = _rgb((255, 0, 0), (40, 20))
    grey = preprocess_image(img, image_size=8, in_channels=1, mean=[0.5], std=[0.5])  # extra keys ignored
    assert grey.shape == (1, 8, 8) and grey.dtype.itemsize == 1
    assert abs(int(grey[0, 4, 4]) - 76) <= 1  # ITU-R 601 luma of pure red
    with pytest.raises(ReslabError, match="resize must be one of"):
        preprocess_image(img, image_size=8, in_channels=3, resize="stretchy")


def test_center_crop_keeps_aspect_ratio():
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # white middle third
    out = preprocess_image(Image.fromarray(wide), image_size=10, in_channels=3, resize="center_crop")
    assert out[:, :, 1:9].min() == 255  # only the middle square remains (edges see the filter's reach)
    squashed = preprocess_image(Image.fromarray(wide), image_size=10, in_channels=3, resize="squash")
    assert squashed[:, :, 0].max() < 10 and squashed[:, :, 5].min() > 245


def test_large_jpeg_uses_draft_and_matches_size(tmp_path):
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8))
    big.save(tmp_path / "big.jpg", quality=90)
    out = preprocess_image(tmp_path / "big.jpg", image_size=64, in_channels=3)
    assert out.shape == (3, 64, 64)


def test_a_cache_disk_too_small_is_refused_before_decoding(tmp_path, monkeypatch):
    # The decoded cache is a memory map: a disk that fills up mid-decode would kill the process (SIGBUS).
    import collections

    root = make_mixed_folder(tmp_path / "pets")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(folder_module.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ReslabError, match=r"decoding .*pets at image size 16 needs 8.2 KiB in the cache .*folders, "
                                          r"which has 1000 bytes free; free some space, give --data-dir"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            _load(root, tmp_path, val_split=0.0, image_size=16)
    assert not list((tmp_path / "cache" / "folders").iterdir())
