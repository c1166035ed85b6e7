"""Every bad input of issue 4 gets one line on stderr, a non-zero exit, no traceback, nothing damaged."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from reslab.checkpoint import CheckpointMeta, save_weights
from reslab.cli import main
from reslab.errors import ReslabError
from reslab.models import create_model
from reslab.train import train
from test_train import make_folder, tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder = make_folder(root / "shapes", per_class=6)
    run = root / "run"
    train(tiny_config(folder, run, epochs=1, batch_size=6))
    return root, folder, run


def _fails(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


def test_bad_training_input(setup, capsys, tmp_path):
    root, folder, run = setup
    common = ["train", "--model", "resnet8", "--image-size", "8", "--quiet", "--data-dir", str(root / "cache")]
    out = tmp_path / "out"
    _fails(capsys, [*common, "--data", str(tmp_path / "missing"), "--out", str(out)], "missing")
    _fails(capsys, [*common, "--data", str(folder), "--recipe", "slow", "--out", str(out)], "unknown recipe 'slow'")
    _fails(capsys, [*common, "--data", str(folder), "--epochs", "0", "--out", str(out)], "--epochs")
    _fails(capsys, [*common, "--data", str(folder), "--batch-size", "0", "--out", str(out)], "--batch-size")
    _fails(capsys, [*common, "--data", str(folder), "--batch-size", "1000", "--out", str(out)],
           "larger than the training set")
    assert not out.exists(), "a refused run must not leave a run directory"
    _fails(capsys, ["train", "--resume", str(tmp_path)], "holds no run")


def test_refused_resume_and_reused_out_leave_the_run_intact(setup, capsys):
    _, folder, run = setup
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    _fails(capsys, ["train", "--model", "resnet8", "--data", str(folder), "--out", str(run)], "already holds a run")
    _fails(capsys, ["train", "--resume", str(run), "--lr", "1"], "--lr")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_bad_checkpoints(setup, capsys, tmp_path):
    root, folder, run = setup
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00not a checkpoint at all")
    _fails(capsys, ["evaluate", str(junk)], "junk.safetensors")
    _fails(capsys, ["predict", str(junk), str(next(folder.rglob("*.png")))], "junk.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": create_model("resnet8").fc.weight.detach().contiguous()}, str(foreign))
    _fails(capsys, ["evaluate", str(foreign)], "not a reslab checkpoint")
    _fails(capsys, ["evaluate", str(tmp_path)], "holds no run")
    _fails(capsys, ["evaluate", str(tmp_path / "nothing")], "no run directory or weights file")

    # Weights of another architecture under resnet8's name.
    meta = CheckpointMeta(model="resnet8", model_options={"in_channels": 3}, classes=["a", "b", "c"],
                          extra={"data": str(folder)})
    lying = tmp_path / "lying.safetensors"
    save_weights(lying, create_model("resnet14", num_classes=3), meta)
    _fails(capsys, ["evaluate", str(lying), "--out", str(tmp_path / "o")], "does not match")

    # Classes the data has and the weights do not.
    meta.classes = ["a", "b"]
    two = tmp_path / "two.safetensors"
    save_weights(two, create_model("resnet8", num_classes=2), meta)
    _fails(capsys, ["evaluate", str(two), "--out", str(tmp_path / "o")], "the weights do not know (circle")
    assert not (tmp_path / "o").exists()
    _fails(capsys, ["predict", str(run), str(tmp_path / "no.png")], "no.png")


# --- issue 12: hostile input a new user tries --------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A folder and a run-like directory holding reslab weights for it, made without training."""
    root = tmp_path_factory.mktemp("hostile")
    folder = make_folder(root / "shapes", per_class=6)
    meta = CheckpointMeta(model="resnet8", model_options={"in_channels": 3}, classes=["circle", "square", "stripes"],
                          preprocessing={"image_size": 8, "in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
                                         "resize": "center_crop"},
                          extra={"data": str(folder), "seed": 0, "val_split": 0.25})
    save_weights(root / "run" / "best.safetensors", create_model("resnet8", num_classes=3), meta)
    return root, folder, root / "run"


def _train(root, folder, out, *extra):
    return ["train", "--model", "resnet8", "--data", str(folder), "--image-size", "8", "--epochs", "1",
            "--batch-size", "4", "--quiet", "--data-dir", str(root / "cache"), "--out", str(out), *extra]


def test_class_folders_without_images(weights, capsys, tmp_path):
    """Today: NotImplementedError "bitwise_and_cpu" from the data layer, for train and for evaluate."""
    root, folder, run = weights
    notes = tmp_path / "notes"
    for cls in ("a", "b"):
        (notes / cls).mkdir(parents=True)
        (notes / cls / "readme.txt").write_text("no image here")
        (notes / cls / "labels.csv").write_text("x,y\n")
    out = tmp_path / "out"
    line = _fails(capsys, _train(root, notes, out), "holds no readable image, only 2 other files")
    assert "notes/a" in line and "labels.csv" in line and "add JPEG, PNG" in line
    _fails(capsys, ["evaluate", str(run), "--data", str(notes), "--out", str(out)], "holds no readable image")
    split = tmp_path / "split"  # evaluate's other layout: test/ with class subfolders
    for cls in ("circle", "square", "stripes"):
        (split / "test" / cls).mkdir(parents=True)
        (split / "test" / cls / "notes.txt").write_text("no image here")
    _fails(capsys, ["evaluate", str(run), "--data", str(split), "--out", str(out)], "test/circle holds no readable")
    assert not out.exists()


def test_broken_symbolic_links_are_skipped_like_corrupt_images(weights, capsys, tmp_path):
    """Today: OSError "Too many levels of symbolic links" / FileNotFoundError in the cache key."""
    import shutil
    import warnings

    from reslab.data import DataWarning, load_data

    root, folder, run = weights
    linked = tmp_path / "linked"
    shutil.copytree(folder, linked)
    (linked / "circle" / "self.png").symlink_to("self.png")  # a link to itself
    (linked / "square" / "ping.png").symlink_to("pong.png")  # a loop of two
    (linked / "square" / "pong.png").symlink_to("ping.png")
    (linked / "stripes" / "gone.png").symlink_to(tmp_path / "deleted.png")  # dangling
    with pytest.warns(DataWarning, match="skipped 4 files") as caught:
        bundle = load_data(str(linked), image_size=8, val_split=0.0, data_dir=str(tmp_path / "cache"), quiet=True)
    message = str(caught[0].message)
    assert "circle/self.png (symbolic link loop)" in message and "square/ping.png (symbolic link loop)" in message
    assert len(bundle.train) == 3 * 6 and bundle.source["skipped"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert main(["evaluate", str(run), "--data", str(linked), "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "eval.json").exists()


def test_devices_and_seeds_are_checked_before_the_run(weights, capsys, tmp_path, monkeypatch):
    """Today: AssertionError (cuda without CUDA), RuntimeError (tpu), ValueError (seeds)."""
    import torch

    root, folder, _ = weights
    out = tmp_path / "out"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    _fails(capsys, _train(root, folder, out, "--device", "cuda"),
           "--device cuda: no CUDA device is available; use --device cpu")
    _fails(capsys, _train(root, folder, out, "--device", "tpu"), "unknown device type 'tpu'; use one of cpu, cuda")
    _fails(capsys, _train(root, folder, out, "--device", "cuda:x"), "is not a device name")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _fails(capsys, _train(root, folder, out, "--device", "cuda:5"), "only 2 CUDA devices visible (cuda:0..cuda:1)")
    for seed in ("-1", "99999999999999999999999", str(2**63)):
        _fails(capsys, _train(root, folder, out, "--seed", seed),
               f"--seed must be an integer in [0, 2**63), got {seed}")
    assert not out.exists()


def test_image_size_that_cannot_fit_in_memory(weights, capsys, tmp_path, monkeypatch):
    """Today: RuntimeError from DefaultCPUAllocator (ENOMEM) while resizing."""
    from reslab import hardware

    root, folder, _ = weights
    out = tmp_path / "out"
    digits = ["train", "--data", "digits", "--quiet", "--out", str(out), "--device", "cpu"]
    # Real memory: no machine holds 1797 digits at 100000x100000 (16 TiB), nor one such float batch.
    _fails(capsys, [*digits, "--image-size", "100000"], "of memory but")
    monkeypatch.setattr(hardware, "available_memory", lambda: 50 * 2**20)
    line = _fails(capsys, [*digits, "--image-size", "200", "--batch-size", "1"], "digits at image size 200")
    assert "(1797 images of 1x200x200 bytes) needs 68.6 MiB of memory but 50.0 MiB is available" in line
    assert line.endswith("use --image-size 120 or less")  # 1797 x 120 x 120 bytes fit in half of 50 MiB
    line = _fails(capsys, [*digits, "--image-size", "200", "--batch-size", "512"], "one float batch")
    assert "--batch-size 54 or a smaller --image-size" in line
    _fails(capsys, ["train", "--data", str(folder), "--image-size", "2000", "--out", str(out),
                    "--data-dir", str(root / "cache"), "--batch-size", "1"], "shapes at image size 2000")
    assert not out.exists()


def test_allocator_failure_in_the_data_layer_is_translated(monkeypatch):
    from reslab.data import digits, load_data

    def refuse(images, size):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 17970000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(digits, "resize_images", refuse)
    with pytest.raises(ReslabError, match=r"digits at image size 64 does not fit in memory \(DefaultCPUAllocator"):
        load_data("digits", image_size=64)


def _with_metadata(path, **fields):
    """A reslab weights file of resnet8 (3 classes) whose metadata fields are replaced by `fields`."""
    model = create_model("resnet8", num_classes=3)
    meta = CheckpointMeta(model="resnet8", model_options={"in_channels": 3}, classes=["circle", "square", "stripes"],
                          preprocessing={"image_size": 8, "in_channels": 3, "mean": [0.5] * 3, "std": [0.2] * 3})
    metadata = {**meta.to_metadata(), **fields}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("field, value, match", [
    ("model_options", "[1, 2]", "model_options must be a JSON object, got [1, 2]"),
    ("model_options", '{"num_classes": 3}', "model_options holds num_classes (3)"),
    ("preprocessing", '{"mean": "abc"}', "preprocessing mean must be a list of 1 or 3 finite numbers, got 'abc'"),
    ("preprocessing", '{"std": [0]}', "preprocessing std must be a list of 1 or 3 finite numbers above 0"),
    ("preprocessing", '{"image_size": "big"}', "image_size must be a positive integer, got 'big'"),
    ("classes", '"abc"', "classes must be a list of names"),
    ("extra", "[]", "extra must be a JSON object"),
])
def test_weights_with_metadata_of_wrong_types(weights, capsys, tmp_path, field, value, match):
    """Today: TypeError in checkpoint.py (model_options) or data/loader.py (mean)."""
    root, folder, _ = weights
    bad = _with_metadata(tmp_path / "bad.safetensors", **{field: value})
    image = str(next(folder.rglob("*.png")))
    line = _fails(capsys, ["predict", str(bad), image], match)
    assert line.startswith(f"reslab predict: error: {bad}: bad reslab metadata: ")
    _fails(capsys, ["evaluate", str(bad), "--data", str(folder), "--out", str(tmp_path / "o")], match)
    _fails(capsys, _train(root, folder, tmp_path / "out", "--pretrained", str(bad)), match)
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()


def test_h5_that_is_not_a_keras_resnet(weights, capsys, tmp_path):
    """Today: "create_model('resnet20'): stride_in_1x1 places the stride ...", naming neither file nor problem."""
    h5py = pytest.importorskip("h5py")
    root, folder, _ = weights
    vgg = tmp_path / "vgg16.h5"
    with h5py.File(vgg, "w") as f:
        for layer in ("block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2", "fc1"):
            f[f"{layer}/{layer}/kernel:0"] = [[0.0]]
    out = tmp_path / "out"
    line = _fails(capsys, _train(root, folder, out, "--model", "resnet20", "--pretrained", str(vgg)),
                  f"{vgg} is not the weights of a Keras applications ResNet50, ResNet101 or ResNet152 (it holds "
                  "block1_conv1, block1_conv2, block2_conv1, block2_conv2, ...)")
    assert "stride_in_1x1" not in line and "--model resnet50/101/152" in line
    text = tmp_path / "weights.h5"
    text.write_text("not hdf5 at all")
    _fails(capsys, _train(root, folder, out, "--model", "resnet20", "--pretrained", str(text)),
           f"{text} is not a readable Keras weights file")
    assert not out.exists()
