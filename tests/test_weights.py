"""Pretrained weights by name (issue 13): a test catalog entry served from 127.0.0.1, TORCH_HOME in a
temporary folder: download through torch.hub's folder, hash check, reuse offline, the offline message,
recognition of a renamed file by its hash, a foreign file with --model, and the CLI on catalog names."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from reslab import create_model, list_models
from reslab.cli import main
from reslab.errors import ReslabError
from reslab.weights import (
    Preprocessing,
    WeightsEntry,
    checkpoints_dir,
    default_weights,
    get_weights,
    list_weights,
    load_pretrained_model,
    load_source,
    register_weights,
    unregister_weights,
)
from test_train import make_folder

CLASSES = ("circle", "square", "stripes")


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Server:
    """Serves a folder on 127.0.0.1 and counts the requests."""

    def __init__(self, root: Path):
        self.requests = 0
        server = self

        class Counting(Quiet):
            def do_GET(self):  # noqa: N802
                server.requests += 1
                super().do_GET()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Counting, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _foreign_state(seed: int) -> dict:
    """A resnet8's weights as the CIFAR repositories save them: `module.` prefix, classifier `linear`."""
    torch.manual_seed(seed)
    state = create_model("resnet8", num_classes=len(CLASSES)).state_dict()
    return {"state_dict": {"module." + k.replace("fc.", "linear."): v for k, v in state.items()}}


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """TORCH_HOME in tmp_path; a served file `resnet8-<sha256 prefix>.th` and its catalog entry."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    served = tmp_path / "served"
    served.mkdir()
    staged = tmp_path / "w.th"
    torch.save(_foreign_state(0), staged)
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()
    name = f"resnet8-{digest[:8]}.th"
    shutil.move(staged, served / name)
    server = Server(served)
    entry = WeightsEntry("resnet8.test_shapes", server.url + name, digest[:8], "sha256", "reslab tests", "MIT",
                         0.5, None, Preprocessing(16, 16, mean=(0.5,) * 3, std=(0.25,) * 3), CLASSES)
    register_weights(entry)
    yield entry, server, served / name
    unregister_weights(entry.name)
    server.close()


def test_download_goes_to_torch_hub_checkpoints_and_is_reused_offline(hub):
    entry, server, served = hub
    model, meta = load_pretrained_model(entry.name, quiet=True)
    local = checkpoints_dir() / served.name  # torchvision's and timm's folder, under the URL's file name
    assert local.read_bytes() == served.read_bytes() and server.requests == 1
    assert meta.classes == list(CLASSES) and meta.model == "resnet8" and meta.extra["head"] == "loaded"
    assert meta.preprocessing["mean"] == [0.5] * 3 and meta.preprocessing["image_size"] == 16
    expected = _foreign_state(0)["state_dict"]["module.linear.weight"]
    assert torch.equal(model.fc.weight, expected)
    server.close()  # no network from here on: the file in the checkpoints folder is enough
    again = create_model(entry.name, pretrained=True)
    assert torch.equal(again.fc.weight, expected) and server.requests == 1
    fresh = create_model(entry.name, pretrained=True, num_classes=2)  # a new head for 2 classes, body kept
    assert fresh.fc.out_features == 2 and torch.equal(fresh.conv1.weight, model.conv1.weight)


def test_offline_without_the_file_names_the_url_and_the_exact_path(hub):
    entry, server, _ = hub
    server.close()
    with pytest.raises(ReslabError) as err:
        load_pretrained_model(entry.name)
    text = str(err.value)
    assert entry.url in text and str(checkpoints_dir() / entry.local_name) in text
    assert not (checkpoints_dir() / entry.local_name).exists()


def test_a_hash_mismatch_keeps_nothing_and_a_bad_placed_file_is_refused(hub):
    entry, server, served = hub
    unregister_weights(entry.name)
    register_weights(WeightsEntry(**{**entry.__dict__, "hash": "00000000"}))
    with pytest.raises(ReslabError, match="does not match"):
        load_pretrained_model(entry.name)
    assert not any(checkpoints_dir().iterdir())  # neither the file nor a partial download stays
    checkpoints_dir().joinpath(served.name).write_bytes(b"placed by hand, but not the file")
    requests = server.requests
    with pytest.raises(ReslabError, match="delete it"):
        load_pretrained_model(entry.name)
    assert server.requests == requests  # a placed file is checked, never silently replaced


def test_a_renamed_catalog_file_is_recognised_by_its_hash(hub, tmp_path):
    entry, _, served = hub
    renamed = tmp_path / "my-weights.pth"
    shutil.copy(served, renamed)
    model, meta = load_source(renamed)
    assert meta.model == "resnet8" and meta.classes == list(CLASSES) and meta.extra["weights"] == entry.name
    assert meta.preprocessing["std"] == [0.25] * 3


def test_a_foreign_file_needs_model_and_takes_classes(tmp_path):
    foreign = tmp_path / "theirs.pth"
    torch.save(_foreign_state(1), foreign)
    with pytest.raises(ReslabError, match="--model NAME"):
        load_source(foreign)
    model, meta = load_source(foreign, model="resnet8")
    assert meta.classes == ["0", "1", "2"] and meta.extra["preprocessing"] == "assumed"
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    _, meta = load_source(foreign, model="resnet8", classes=names)
    assert meta.classes == ["a", "b", "c"]
    names.write_text("a\nb\n")
    with pytest.raises(ReslabError, match="2 names but .* 3 classes"):
        load_source(foreign, model="resnet8", classes=names)
    with pytest.raises(ReslabError, match="does not fit resnet14"):
        load_source(foreign, model="resnet14")


def test_cli_predict_evaluate_and_models_on_a_catalog_name(hub, tmp_path, capsys):
    entry, _, _ = hub
    folder = make_folder(tmp_path / "shapes", per_class=4)
    image = str(next((folder / "square").iterdir()))
    assert main(["predict", entry.name, image, "--json", "--backend", "torch"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert {t["class"] for t in top} == set(CLASSES)
    subset = tmp_path / "subset"
    shutil.copytree(folder / "circle", subset / "circle")
    shutil.copytree(folder / "stripes", subset / "Stripes")
    out = tmp_path / "eval"
    assert main(["evaluate", entry.name, "--data", str(subset), "--out", str(out), "--backend", "torch"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["n"] == 8 and set(result["per_class"]) == set(CLASSES)
    capsys.readouterr()
    assert main(["models", "--pretrained", "--family", "cifar", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[entry.name]["top1"] == 0.5 and rows[entry.name]["downloaded"] is True
    assert rows["resnet56.akamaster_cifar10"]["top1"] == pytest.approx(0.9339)
    assert rows["resnet20.akamaster_cifar10"]["params"] == 269_722 and not any("tv_in1k" in n for n in rows)


def test_unknown_tags_get_close_matches():
    with pytest.raises(ReslabError, match="did you mean resnet50.tv2_in1k"):
        get_weights("resnet50.tv2_in1")
    assert default_weights("resnet50").name == "resnet50.tv2_in1k"  # measured at its own input size
    with pytest.raises(ReslabError, match="no imagenet1k weights for resnet8"):
        default_weights("resnet8")


def test_the_catalog_is_consistent():
    names = {e.local_name for e in list_weights()}
    assert len(names) == len(list_weights())  # no two entries share a file in the checkpoints folder
    registered = set(list_models())
    for e in list_weights():
        assert e.model in registered, e.name
        assert (len(e.hash) == 32) if e.hash_algorithm == "md5" else (8 <= len(e.hash) <= 64), e.name
        assert int(e.hash, 16) >= 0 and e.top1 is None or 0 < e.top1 < 1
        if e.hash_algorithm == "sha256" and len(e.hash) < 64:  # torch.hub's rule: the prefix is in the name
            assert f"-{e.hash}." in e.local_name, e.name
    assert len(get_weights("resnet50.tv_in1k").class_names()) == 1000
    assert get_weights("resnet20.akamaster_cifar10").class_names()[3] == "cat"
    assert set(list_models(pretrained=True)) == {e.name for e in list_weights()}


def test_keras_caffe_weights_read_rgb_after_load(hub, monkeypatch):
    """The BGR order of Keras's caffe weights is folded into conv1 (its input channels reversed)."""
    entry, _, _ = hub
    bgr = WeightsEntry(**{**entry.__dict__, "name": "resnet8.test_bgr", "bgr_input": True})
    register_weights(bgr)
    try:
        rgb_model, _ = load_pretrained_model(entry.name, quiet=True)
        flipped, _ = load_pretrained_model(bgr.name, quiet=True)
    finally:
        unregister_weights(bgr.name)
    assert torch.equal(flipped.conv1.weight, rgb_model.conv1.weight.flip(1))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(flipped.eval()(x), rgb_model.eval()(x.flip(1)), atol=1e-5)


def test_export_of_catalog_weights_keeps_their_classes_and_preprocessing(hub, tmp_path, capsys):
    entry, _, _ = hub
    out = tmp_path / "shapes.onnx"
    assert main(["export", entry.name, "--format", "onnx", "--out", str(out)]) == 0
    assert "max abs difference" in capsys.readouterr().out
    from reslab.inference.export import read_exported_meta

    meta = read_exported_meta(out)
    assert meta.classes == list(CLASSES) and meta.preprocessing["std"] == [0.25] * 3
