"""CIFAR: a fake archive in the real format, served from 127.0.0.1, downloaded, verified, parsed."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from reslab.data import cifar, download, load_data
from reslab.errors import ReslabError

PER_BATCH = 12
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _pickle(obj, protocol):
    payload = pickle.dumps(obj, protocol=protocol)
    if protocol == 2:
        # The official files were written by numpy 1.x, whose arrays name numpy.core.multiarray.
        payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return payload


def make_cifar10_tarball(seed=0, protocol=2):
    """Bytes of a tar.gz laid out as cifar-10-python.tar.gz, plus the arrays it holds."""
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, PER_BATCH)]
        batches[name] = (data, labels)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:

        def add(name, payload):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for name, (data, labels) in batches.items():
            add(name, _pickle({b"batch_label": name.encode(), b"data": data, b"labels": labels,
                               b"filenames": [b"x.png"] * PER_BATCH}, protocol))
        add("batches.meta", _pickle({b"label_names": [n.encode() for n in NAMES],
                                     b"num_vis": 3072, b"num_cases_per_batch": PER_BATCH}, protocol))
    return buf.getvalue(), batches


class Server:
    """Serves `responses` in turn for each GET (the last one repeats); counts requests."""

    def __init__(self, responses):
        self.responses = responses
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                body, claimed_length = server.responses[min(server.requests, len(server.responses) - 1)]
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(claimed_length))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def fake(monkeypatch):
    """The fake archive's bytes and arrays; reslab's cifar10 entry points at its md5."""
    tarball, batches = make_cifar10_tarball()
    md5 = hashlib.md5(tarball).hexdigest()
    monkeypatch.setitem(cifar.ARCHIVES, "cifar10", dataclasses.replace(cifar.ARCHIVES["cifar10"], md5=md5))
    return tarball, batches


def _check_round_trip(bundle, batches):
    train = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert bundle.classes == NAMES
    assert bundle.train.images.shape == (5 * PER_BATCH, 3, 32, 32)
    assert np.array_equal(bundle.train.images.numpy().reshape(-1, 3072), train)
    assert bundle.train.labels.tolist() == train_labels
    assert np.array_equal(bundle.test.images.numpy().reshape(-1, 3072), batches["test_batch"][0])
    assert bundle.test.labels.tolist() == batches["test_batch"][1]
    assert bundle.val is None and bundle.augment == "cifar" and bundle.in_channels == 3
    expected_mean = train.reshape(-1, 3, 1024).transpose(1, 0, 2).reshape(3, -1).mean(1) / 255
    assert np.allclose(bundle.mean, expected_mean, atol=1e-6)


def _leftovers(folder):
    """Files a failed download could leave behind: the target, temporary files, partial files."""
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def test_download_verify_parse(tmp_path, monkeypatch, fake):
    tarball, batches = fake
    with Server([(tarball, len(tarball))]) as server:
        monkeypatch.setenv("RESLAB_CIFAR_URL", server.url)
        bundle = load_data("cifar10", data_dir=str(tmp_path), quiet=True)
        assert server.requests == 1
        _check_round_trip(bundle, batches)
        # Second load: nothing fetched, the extracted folder (marked complete) is reused.
        again = load_data("cifar10", data_dir=str(tmp_path), quiet=True)
        assert server.requests == 1
    assert (tmp_path / "cifar-10-batches-py" / cifar.COMPLETE).exists()
    assert again.train.labels.equal(bundle.train.labels)
    assert _leftovers(tmp_path) == ["cifar-10-python.tar.gz"]  # no temporary file left beside it


def test_truncated_download_is_rejected_and_retried(tmp_path, monkeypatch, fake, capsys):
    tarball, batches = fake
    half = tarball[: len(tarball) // 2]
    # First: the connection drops early; second: a short file that claims to be whole; third: good.
    with Server([(half, len(tarball)), (half, len(half)), (tarball, len(tarball))]) as server:
        monkeypatch.setenv("RESLAB_CIFAR_URL", server.url)
        bundle = load_data("cifar10", data_dir=str(tmp_path), quiet=False)
        assert server.requests == 3
    _check_round_trip(bundle, batches)
    err = capsys.readouterr().err
    assert "truncated" in err and "md5" in err


def test_always_broken_transfer_is_a_network_error(tmp_path, monkeypatch, fake):
    tarball, _ = fake
    with Server([(tarball[:1000], len(tarball))]) as server:  # the connection always drops early
        monkeypatch.setenv("RESLAB_CIFAR_URL", server.url)
        with pytest.raises(ReslabError, match="could not download .*cifar-10-python.tar.gz.*truncated.*network"):
            load_data("cifar10", data_dir=str(tmp_path), quiet=True)
        assert server.requests == 3  # the first try and two retries
    assert _leftovers(tmp_path) == []


def test_same_wrong_file_twice_is_a_mismatch_not_a_network_error(tmp_path, monkeypatch, fake):
    tarball, _ = fake
    wrong = b"an html error page, say" * 40
    with Server([(wrong, len(wrong))]) as server:
        monkeypatch.setenv("RESLAB_CIFAR_URL", server.url)
        with pytest.raises(ReslabError) as caught:
            load_data("cifar10", data_dir=str(tmp_path), quiet=True)
        assert server.requests == 2  # a second identical file proves it is not the transfer
    message = str(caught.value)
    expected = cifar.ARCHIVES["cifar10"].md5
    assert message.startswith("hash mismatch: ") and "network" not in message
    assert f"md5 {hashlib.md5(wrong).hexdigest()}, expected {expected}" in message
    assert server.url + "cifar-10-python.tar.gz" in message
    assert _leftovers(tmp_path) == []  # nothing that failed its hash stays to be reused

    # A wrong file in the cache is not reused: the next run fetches again and gets the right one.
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(wrong)
    with Server([(tarball, len(tarball))]) as server:
        monkeypatch.setenv("RESLAB_CIFAR_URL", server.url)
        load_data("cifar10", data_dir=str(tmp_path), quiet=True)
        assert server.requests == 1


def test_corrupt_cached_tarball_is_fetched_again(tmp_path, monkeypatch, fake):
    tarball, batches = fake
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(tarball[:-100])
    with Server([(tarball, len(tarball))]) as server:
        monkeypatch.setenv("RESLAB_CIFAR_URL", server.url)
        _check_round_trip(load_data("cifar10", data_dir=str(tmp_path), quiet=True), batches)
        assert server.requests == 1


def test_partial_extraction_is_not_taken_for_complete(tmp_path, fake):
    tarball, batches = fake
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(tarball)
    partial = tmp_path / "cifar-10-batches-py"
    partial.mkdir()
    (partial / "data_batch_1").write_bytes(b"half a batch")
    bundle = load_data("cifar10", data_dir=str(tmp_path), quiet=True)  # re-extracted, no network
    _check_round_trip(bundle, batches)


def test_local_tarball_and_extracted_folder(tmp_path):
    tarball, batches = make_cifar10_tarball(seed=1, protocol=pickle.HIGHEST_PROTOCOL)
    path = tmp_path / "mine.tar.gz"
    path.write_bytes(tarball)
    with pytest.warns(UserWarning, match="not the official cifar10"):
        bundle = load_data(str(path), data_dir=str(tmp_path / "cache"), quiet=True)
    _check_round_trip(bundle, batches)
    extracted = next((tmp_path / "cache" / "local").glob("*/cifar-10-batches-py"))
    from_folder = load_data(str(extracted.parent), data_dir=str(tmp_path / "cache"), quiet=True)
    assert from_folder.train.images.equal(bundle.train.images)


def test_val_split_is_stratified_and_seeded(tmp_path, fake):
    tarball, _ = fake
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(tarball)
    a = load_data("cifar10", data_dir=str(tmp_path), val_split=0.25, seed=3, quiet=True)
    b = load_data("cifar10", data_dir=str(tmp_path), val_split=0.25, seed=3, quiet=True)
    c = load_data("cifar10", data_dir=str(tmp_path), val_split=0.25, seed=4, quiet=True)
    assert len(a.train) + len(a.val) == 5 * PER_BATCH
    assert a.val.images.equal(b.val.images) and not a.val.images.equal(c.val.images)
    assert a.source["sizes"] == {"train": len(a.train), "val": len(a.val), "test": PER_BATCH}


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(ReslabError, match="refusing to load"):
        cifar.read_batch(path)
    assert not marker.exists()


def test_download_helper_sha256(tmp_path):
    payload = b"weights" * 1000
    with Server([(payload, len(payload))]) as server:
        dest = download(server.url + "w.bin", tmp_path / "w.bin", sha256=hashlib.sha256(payload).hexdigest(),
                        quiet=True)
        assert dest.read_bytes() == payload
        # An existing file with the right hash is not fetched again.
        download(server.url + "w.bin", dest, sha256=hashlib.sha256(payload).hexdigest(), quiet=True)
        assert server.requests == 1
        with pytest.raises(ReslabError, match="sha256 [0-9a-f]{64}, expected 0{64}"):
            download(server.url + "w.bin", tmp_path / "x.bin", sha256="0" * 64, retries=0, quiet=True)
        assert not (tmp_path / "x.bin").exists()
        # A prefix of the digest (torch.hub's file names carry one) is checked as a prefix.
        download(server.url + "w.bin", tmp_path / "y.bin", sha256=hashlib.sha256(payload).hexdigest()[:8], quiet=True)
        with pytest.raises(ReslabError, match="not a hex digest"):
            download(server.url + "w.bin", tmp_path / "z.bin", sha256="xyz", quiet=True)
        assert server.requests == 3  # w, x, y: a malformed hash is refused before anything is fetched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin", "y.bin"]
