"""Transfer learning: foreign checkpoints load strictly (except the head), freezing freezes."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch

from reslab.errors import ReslabError
from reslab.models import create_model
from reslab.transfer import freeze, load_pretrained, map_keys, model_options_for, unfreeze_step

SHARED = Path("/work/shared/data/pretrained-cifar10")


class NotAWeight:
    """Any class at all: a checkpoint pickling it is refused by torch.load(weights_only=True)."""


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_body(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in sa.items():
        if not key.startswith("fc."):
            assert torch.equal(value, sb[key]), key


def _x(n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_torchvision_layout_loads_with_same_outputs(tmp_path):
    src = create_model("resnet18", num_classes=1000).eval()
    path = tmp_path / "resnet18-weights.pth"
    torch.save(src.state_dict(), path)  # torchvision's layout: a flat state dict, no prefixes

    same = create_model("resnet18", num_classes=1000).eval()
    report = load_pretrained(same, str(path), model_name="resnet18", quiet=True)
    assert report["kind"] == "torch" and report["head"] == "loaded" and report["renamed"] == {}
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with torch.no_grad():
        assert torch.equal(same(_x(size=64)), src(_x(size=64)))

    new_head = create_model("resnet18", num_classes=5)
    report = load_pretrained(new_head, str(path), model_name="resnet18", quiet=True)
    assert report["head"] == "replaced (1000 -> 5 classes)"
    assert new_head.fc.weight.shape == (5, 512)
    _same_body(src, new_head)


@pytest.mark.parametrize(
    "prefix, head, nest",
    [
        ("module.", "linear", "state_dict"),  # DataParallel + the common CIFAR code (akamaster's)
        ("model.", "classifier", "model"),  # Lightning-style
        ("_orig_mod.", "head.fc", None),  # torch.compile, timm's head naming
        ("module._orig_mod.", "head", "model_state_dict"),
    ],
)
def test_wrapped_and_renamed_checkpoints_load(tmp_path, prefix, head, nest):
    src = create_model("resnet20", num_classes=10).eval()
    state = {}
    for key, value in src.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue  # old checkpoints lack the counters
        key = f"{head}.{key[3:]}" if key.startswith("fc.") else key
        state[prefix + key] = value
    obj = {nest: state, "best_prec1": 91.25, "epoch": 180} if nest else state
    path = tmp_path / "ckpt.th"
    torch.save(obj, path)

    model = create_model("resnet20", num_classes=10).eval()
    report = load_pretrained(model, str(path), model_name="resnet20", quiet=True)
    assert report["head"] == "loaded"
    assert report["renamed"][head] == "fc"
    assert all(p in report["renamed"] for p in ("module.", "model.", "_orig_mod.") if p in prefix)
    assert report.get("nested_under", None) == nest
    with torch.no_grad():
        assert torch.equal(model(_x()), src(_x()))


def test_map_keys_leaves_a_model_own_names_alone():
    state = {"linear.weight": torch.zeros(2, 2), "linear.bias": torch.zeros(2)}
    assert map_keys(state, {"linear.weight", "linear.bias"})[1] == {}
    assert set(map_keys(state, {"fc.weight"})[0]) == {"fc.weight", "fc.bias"}


@pytest.mark.skipif(not (SHARED / "resnet20-12fca82f.th").exists(), reason="shared pretrained-cifar10 absent")
def test_third_party_cifar_resnet20_loads():
    model = create_model("resnet20", num_classes=10).eval()
    report = load_pretrained(model, str(SHARED / "resnet20-12fca82f.th"), model_name="resnet20", quiet=True)
    assert report["renamed"] == {"module.": "", "linear": "fc"} and report["head"] == "loaded"
    assert report["sha256"].startswith("12fca82f")  # torch.hub-style name: the hash prefix
    raw = torch.load(SHARED / "resnet20-12fca82f.th", weights_only=True, map_location="cpu")["state_dict"]
    assert torch.equal(model.fc.weight, raw["module.linear.weight"])
    assert torch.equal(model.layer3[2].bn2.running_var, raw["module.layer3.2.bn2.running_var"])


def test_wrong_shape_fails_with_the_mismatch_table_and_loads_nothing(tmp_path):
    state = _state(create_model("resnet20", num_classes=10))
    state["layer2.0.conv1.weight"] = torch.zeros(32, 16, 5, 5)
    del state["layer3.1.bn2.running_mean"]
    state["layer9.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    model = create_model("resnet20", num_classes=10)
    before = _state(model)
    with pytest.raises(ReslabError) as info:
        load_pretrained(model, str(path), model_name="resnet20", quiet=True)
    msg = str(info.value)
    assert "1 missing, 1 unexpected, 1 shape" in msg and "nothing was loaded" in msg
    assert "layer2.0.conv1.weight" in msg and "32x16x3x3" in msg and "32x16x5x5" in msg
    assert "layer3.1.bn2.running_mean" in msg and "layer9.weight" in msg
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_other_architecture_table_is_compact(tmp_path):
    path = tmp_path / "r20.pth"
    torch.save(create_model("resnet20").state_dict(), path)
    with pytest.raises(ReslabError) as info:
        load_pretrained(create_model("resnet56"), str(path), model_name="resnet56", quiet=True)
    msg = str(info.value)
    assert "does not fit resnet56" in msg and "... and" in msg
    assert len(msg.splitlines()) <= 13  # the sentence, a header, 10 rows, the rest counted


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": create_model("resnet20").state_dict(), "extra": NotAWeight()}, path)
    with pytest.raises(ReslabError, match="pickled Python objects, not only weights"):
        load_pretrained(create_model("resnet20"), str(path), model_name="resnet20", quiet=True)


def test_truncated_and_unknown_files_fail_clearly(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(create_model("resnet20").state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ReslabError, match="not a readable torch checkpoint"):
        load_pretrained(create_model("resnet20"), str(path), model_name="resnet20", quiet=True)
    odd = tmp_path / "weights.xyz"
    odd.write_text("hello")
    with pytest.raises(ReslabError, match="unknown weights format"):
        load_pretrained(create_model("resnet20"), str(odd), model_name="resnet20", quiet=True)
    with pytest.raises(ReslabError, match="no run directory or weights file"):
        load_pretrained(create_model("resnet20"), str(tmp_path / "absent.pth"), model_name="resnet20")


def test_safetensors_foreign_and_reslab(tmp_path):
    from safetensors.torch import save_file

    from reslab.checkpoint import CheckpointMeta, save_weights

    src = create_model("resnet20", num_classes=3, shortcut="B").eval()
    foreign = tmp_path / "model.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(foreign))
    model = create_model("resnet20", num_classes=3, shortcut="B").eval()
    report = load_pretrained(model, str(foreign), model_name="resnet20", quiet=True)
    assert report["kind"] == "safetensors" and report["renamed"] == {"model.": ""}
    _same_body(src, model)

    run = tmp_path / "run"
    save_weights(run / "best.safetensors", src, CheckpointMeta("resnet20", {"shortcut": "B"}, ["a", "b", "c"]))
    assert model_options_for(str(run)) == {"shortcut": "B"}  # the trainer builds the same architecture
    model = create_model("resnet20", num_classes=2, **model_options_for(str(run)))
    report = load_pretrained(model, str(run), model_name="resnet20", quiet=True)
    assert report["kind"] == "reslab" and report["head"] == "replaced (3 -> 2 classes)"
    assert report["classes"] == ["a", "b", "c"]
    _same_body(src, model)


def test_num_classes_zero_gives_pooled_features(tmp_path):
    src = create_model("resnet20", num_classes=10).eval()
    path = tmp_path / "r20.pth"
    torch.save(src.state_dict(), path)
    features = create_model("resnet20", num_classes=0).eval()
    report = load_pretrained(features, str(path), model_name="resnet20", quiet=True)
    assert report["head"].startswith("dropped")
    with torch.no_grad():
        out = features(_x())
        assert out.shape == (2, 64)
        assert torch.equal(out, src.forward_head(src.forward_features(_x()), pre_logits=True))


def test_keras_file_needs_stride_in_1x1(tmp_path):
    h5py = pytest.importorskip("h5py")
    from reslab.transfer.keras import DEPTHS, _keras_layer_order

    # A legacy-layout Keras ResNet50 file with the right shapes, written directly with h5py.
    model = create_model("resnet50", num_classes=4, stride_in_1x1=True)
    convs, bns = _keras_layer_order(DEPTHS["resnet50"])
    from reslab.transfer import keras as kmod

    ours = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    path = tmp_path / "resnet50.h5"
    with h5py.File(path, "w") as f:
        for conv_name, bn_name in zip(convs, bns):
            conv = model.get_submodule(_torch_name(conv_name))
            g = f.create_group(f"{conv_name}/{conv_name}")
            g["kernel:0"] = conv.weight.detach().permute(2, 3, 1, 0).numpy()
            g["bias:0"] = torch.zeros(conv.out_channels).numpy()
            g = f.create_group(f"{bn_name}/{bn_name}")
            for var in ("gamma", "beta", "moving_mean", "moving_variance"):
                g[f"{var}:0"] = torch.ones(conv.out_channels).numpy()
        g = f.create_group("predictions/predictions")
        g["kernel:0"] = torch.zeros(2048, 4).numpy()
        g["bias:0"] = torch.zeros(4).numpy()
    assert len(ours) == len(convs)
    assert model_options_for(str(path)) == {"stride_in_1x1": True}
    assert model_options_for("https://example.org/w/resnet50.weights.h5") == {"stride_in_1x1": True}
    assert kmod.is_keras_file(path)
    report = load_pretrained(model, str(path), model_name="resnet50", quiet=True)
    assert report["kind"] == "keras" and report["architecture"] == "resnet50" and report["head"] == "loaded"
    assert torch.allclose(model.bn1.running_var, torch.full((64,), 1 + kmod.KERAS_BN_EPS - kmod.TORCH_BN_EPS))
    with pytest.raises(ReslabError, match="stride_in_1x1=True"):
        load_pretrained(create_model("resnet50", num_classes=4), str(path), model_name="resnet50", quiet=True)
    with pytest.raises(ReslabError, match="use --model resnet50"):
        load_pretrained(model, str(path), model_name="resnet152", quiet=True)  # checked before any tensor
    # Known before the model is built: a CIFAR net never receives stride_in_1x1.
    with pytest.raises(ReslabError, match=f"{path} holds Keras resnet50 weights, but the model is resnet20; "
                                          "use --model resnet50"):
        model_options_for(str(path), "resnet20")
    assert kmod.architecture(path) == "resnet50"


def _torch_name(keras_name: str) -> str:
    if keras_name.startswith("conv1_"):
        return "conv1" if keras_name.endswith("conv") else "bn1"
    stage, block, index, kind = keras_name[4], keras_name.split("_")[1][5:], keras_name.split("_")[2], "conv"
    prefix = f"layer{int(stage) - 1}.{int(block) - 1}"
    return f"{prefix}.downsample.0" if index == "0" else f"{prefix}.{kind}{index}"


# --- URLs: served from 127.0.0.1, downloaded once, hash checked ---------------------------------


@pytest.fixture
def server(tmp_path, monkeypatch):
    root = tmp_path / "www"
    root.mkdir()
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "cache"))
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):  # noqa: N802 - http.server's naming
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


def test_url_downloaded_once_and_hash_checked(server, tmp_path):
    root, base, hits = server
    src = create_model("resnet20", num_classes=10).eval()
    blob = tmp_path / "blob.pth"
    torch.save({"state_dict": src.state_dict()}, blob)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    name = f"resnet20-{digest[:8]}.pth"  # torch.hub-style name carrying a hash prefix
    (root / name).write_bytes(blob.read_bytes())

    url = f"{base}/{name}#sha256={digest}"
    for _ in range(2):
        model = create_model("resnet20", num_classes=10).eval()
        report = load_pretrained(model, url, model_name="resnet20", quiet=True)
        assert report["kind"] == "url" and report["format"] == "torch" and report["sha256"] == digest
        with torch.no_grad():
            assert torch.equal(model(_x()), src(_x()))
    assert hits == [f"/{name}"]  # the second load came from the cache
    assert Path(report["path"]).is_relative_to(tmp_path / "cache")

    bad = "0" * 64
    with pytest.raises(ReslabError, match="sha256"):
        load_pretrained(create_model("resnet20"), f"{base}/{name}", model_name="resnet20", sha256=bad, quiet=True)
    with pytest.raises(ReslabError, match="two different hashes"):
        load_pretrained(create_model("resnet20"), url, model_name="resnet20", sha256=bad, quiet=True)


def test_url_hub_style_name_is_checked(server):
    root, base, _ = server
    torch.save(create_model("resnet20").state_dict(), root / "resnet20-deadbeef.pth")
    with pytest.raises(ReslabError, match="expected deadbeef"):
        load_pretrained(create_model("resnet20"), f"{base}/resnet20-deadbeef.pth", model_name="resnet20",
                        quiet=True)
    assert not [p for p in (root.parent / "cache").rglob("*") if p.is_file()]  # a bad file is not kept


def test_url_bad_hash_keeps_nothing_and_a_later_run_fetches_again(server, tmp_path):
    root, base, hits = server
    torch.save(create_model("resnet20").state_dict(), root / "w.pth")
    digest = hashlib.sha256((root / "w.pth").read_bytes()).hexdigest()
    with pytest.raises(ReslabError) as caught:
        load_pretrained(create_model("resnet20"), f"{base}/w.pth", model_name="resnet20", sha256="ab" * 32,
                        quiet=True)
    message = str(caught.value)
    assert message.startswith(f"hash mismatch: {base}/w.pth sends a file with sha256 {digest}, expected {'ab' * 32}")
    assert "network" not in message
    assert len(hits) == 2  # the same wrong file twice: not retried as if the network were at fault
    cache = tmp_path / "cache"
    assert not [p for p in cache.rglob("*") if p.is_file()]
    # Without the (wrong) hash the file is fetched again, not taken from the cache.
    load_pretrained(create_model("resnet20"), f"{base}/w.pth", model_name="resnet20", quiet=True)
    assert len(hits) == 3


def test_url_unreadable_download_is_deleted_from_the_cache(server, tmp_path):
    root, base, hits = server
    (root / "cut.pth").write_bytes(b"PK\x03\x04 the first bytes of a zip, then nothing")
    for _ in range(2):
        with pytest.raises(ReslabError, match="not a readable torch checkpoint.*downloaded copy was deleted"):
            load_pretrained(create_model("resnet20"), f"{base}/cut.pth", model_name="resnet20", quiet=True)
    assert len(hits) == 2  # fetched again, never reused from the cache
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


# --- freezing -------------------------------------------------------------------------------------


def test_freeze_keeps_frozen_tensors_and_bn_statistics_bitwise():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=3)
    info = freeze(model, "layer2")
    total = sum(p.numel() for p in model.parameters())
    assert info["frozen_params"] + info["trainable_params"] == total
    assert info["frozen_params"] == sum(p.numel() for n, p in model.named_parameters()
                                        if n.split(".")[0] in ("conv1", "bn1", "layer1", "layer2"))
    before = _state(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()  # what every training loop does each epoch
    assert not model.layer2[0].bn1.training and model.layer3[0].bn1.training
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(_x(8)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for key, value in before.items():
        if key.split(".")[0] in ("conv1", "bn1", "layer1", "layer2"):
            assert torch.equal(value, after[key]), key
    for key in ("layer3.0.conv1.weight", "layer3.2.bn2.running_mean", "layer3.2.bn2.running_var", "fc.weight"):
        assert not torch.equal(before[key], after[key]), key  # the rest did train
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("layer1"))


def test_freeze_points_and_unfreezing():
    model = create_model("resnet20", num_classes=2)
    with pytest.raises(ReslabError, match="layer4"):
        freeze(model, "layer4")  # the CIFAR family has three stages
    assert freeze(model, "all-but-head")["trainable_params"] == 64 * 2 + 2
    steps = ["all-but-head"]
    while steps[-1] != "none":
        steps.append(unfreeze_step(model, steps[-1]))
    assert steps == ["all-but-head", "layer2", "layer1", "stem", "none"]
    assert freeze(model, "none")["frozen_params"] == 0
    assert type(model.bn1) is torch.nn.BatchNorm2d
    model.train()
    assert all(m.training for m in model.modules())
    imagenet = create_model("resnet18", num_classes=2)
    assert freeze(imagenet, "layer4")["trainable_params"] == 512 * 2 + 2
    preact = create_model("preact_resnet20", num_classes=2)
    assert freeze(preact, "all-but-head")["trainable_params"] == 64 * 2 + 2
    assert unfreeze_step(preact, "all-but-head") == "layer3"


# --- through the real trainer ---------------------------------------------------------------------


def test_finetune_freeze_layer3_leaves_frozen_tensors_bitwise_unchanged(tmp_path):
    from reslab.checkpoint import read_weights
    from reslab.train import TrainConfig, train

    torch.manual_seed(1)
    src = create_model("resnet20", num_classes=7, in_channels=1)  # the digits are grayscale
    with torch.no_grad():  # BN statistics away from their defaults, so "unchanged" means something
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "src.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)

    summary = train(TrainConfig(model="resnet20", data="digits", epochs=1, image_size=8, batch_size=64,
                                pretrained=str(path), freeze="layer3", head_lr_mult=10.0, out=str(tmp_path / "run"),
                                quiet=True))
    after, _ = read_weights(tmp_path / "run" / "last.safetensors")
    body = [k for k in after if not k.startswith("fc.")]
    assert any("running_mean" in k for k in body) and len(body) > 100
    for key in body:
        assert torch.equal(after[key], src.state_dict()[key]), key
    assert after["fc.weight"].shape == (10, 64)
    assert summary["frozen_params"] == sum(v.numel() for k, v in src.named_parameters() if not k.startswith("fc."))
    assert summary["trainable_params"] == 64 * 10 + 10
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["pretrained"]["source"] == str(path) and config["pretrained"]["head"] == "replaced (7 -> 10 classes)"
    assert config["pretrained"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert config["freeze"]["until"] == "layer3"
