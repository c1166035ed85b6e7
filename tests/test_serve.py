"""`reslab serve`: every endpoint, every bad upload (the server keeps serving), concurrency, nothing on disk."""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from reslab.errors import ReslabError

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")
from fastapi.testclient import TestClient  # noqa: E402

from reslab.inference import Predictor  # noqa: E402
from reslab.serve import DEFAULT_MAX_QUEUE, ServeConfig, UploadError, create_app, parse_multipart_file  # noqa: E402
from test_explain import toy_checkpoint  # noqa: E402


def image_bytes(size=(40, 30), fmt="PNG", seed=0, mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose pixel data is empty: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module", autouse=True)
def export_cache(tmp_path_factory):
    """The fast backends export the model on start-up; keep those files out of ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESLAB_CACHE", str(tmp_path_factory.mktemp("reslab-data")))
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return toy_checkpoint(tmp_path_factory.mktemp("serve") / "toy.safetensors", train_steps=0, in_channels=3)


@pytest.fixture(scope="module")
def client(checkpoint):
    with TestClient(create_app(checkpoint, ServeConfig(max_upload_mb=4))) as c:
        yield c


def post(client, route, data: bytes, name="x.png", field="file", **params):
    return client.post(route, files={field: (name, data, "application/octet-stream")}, params=params)


def test_health_page_and_docs(client):
    health = client.get("/health")
    assert health.status_code == 200
    from reslab.inference import resolve_backend

    assert health.json() == {"status": "ok", "model": "resnet20", "classes": 2, "image_size": 16,
                             "layer": "layer3", "max_upload_mb": 4.0, "max_queue": DEFAULT_MAX_QUEUE,
                             "backend": resolve_backend("auto")}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and "/predict" in page.text and "/explain" in page.text
    assert "http" not in page.text.replace("http-equiv", "").split("<script>")[1]  # no CDN: works offline
    schema = client.get("/openapi.json").json()
    for route in ("/predict", "/explain"):
        body = schema["paths"][route]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert body["required"] == ["file"] and body["properties"]["file"]["format"] == "binary"
    assert "/health" in schema["paths"]
    assert client.get("/docs").status_code == 200


def test_predict_matches_the_library(client, checkpoint):
    data = image_bytes()
    response = post(client, "/predict", data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "resnet20" and body["ms"] > 0
    expected = Predictor(checkpoint).predict([Image.open(io.BytesIO(data))], top_k=5)[0]
    assert [p["class"] for p in body["predictions"]] == [name for name, _ in expected]
    assert [p["probability"] for p in body["predictions"]] == pytest.approx([p for _, p in expected], abs=1e-6)
    one = post(client, "/predict", data, top_k=1).json()["predictions"]
    assert len(one) == 1 and one[0] == body["predictions"][0]
    for fmt in ("JPEG", "BMP", "GIF", "WEBP", "TIFF"):
        assert post(client, "/predict", image_bytes(fmt=fmt), name=f"x.{fmt.lower()}").status_code == 200, fmt


def test_explain_returns_a_png_overlay(client):
    response = post(client, "/explain", image_bytes(size=(50, 40)))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-reslab-layer"] == "layer3"
    top = response.headers["x-reslab-class"]
    assert top in ("blank", "square")
    with Image.open(io.BytesIO(response.content)) as overlay:
        assert overlay.format == "PNG" and overlay.size == (320, 320) and overlay.mode == "RGB"
    other = "blank" if top == "square" else "square"
    chosen = post(client, "/explain", image_bytes(size=(50, 40)), **{"class": other})
    assert chosen.status_code == 200 and chosen.headers["x-reslab-class"] == other
    assert chosen.content != response.content
    unknown = post(client, "/explain", image_bytes(), **{"class": "dog"})
    assert unknown.status_code == 400 and "unknown class 'dog'" in unknown.json()["error"]


def truncated_jpeg() -> bytes:
    data = image_bytes(size=(64, 64), fmt="JPEG")
    return data[: len(data) // 2]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns; the server refuses
@pytest.mark.parametrize("route", ["/predict", "/explain"])
@pytest.mark.parametrize(
    "case,make,status,words",
    [
        ("too large", lambda: image_bytes(size=(1400, 1100)) + b"\0" * (4 << 20), 413, "larger than the limit of 4 MB"),
        ("text file", lambda: b"hello, this is not an image\n" * 10, 415, "not an image"),
        ("empty file", lambda: b"", 400, "empty"),
        ("truncated", truncated_jpeg, 400, "truncated or corrupt"),
        ("pixel bomb", lambda: png_header_only(10_000, 10_000), 413, "more than the limit of 64 megapixels"),
        ("PIL's bomb", lambda: png_header_only(20_000, 20_000), 413, "too large to decode"),
    ],
)
def test_bad_uploads_get_a_json_4xx_and_the_server_keeps_serving(client, route, case, make, status, words):
    response = post(client, route, make(), name="bad.bin")
    assert response.status_code == status, (case, response.text)
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["error"], response.json()
    assert post(client, "/predict", image_bytes()).status_code == 200


def test_malformed_requests(client):
    missing = post(client, "/predict", image_bytes(), field="image")
    assert missing.status_code == 422 and "no form field 'file'" in missing.json()["error"]
    raw = client.post("/predict", content=image_bytes(), headers={"content-type": "image/png"})
    assert raw.status_code == 415 and "multipart/form-data" in raw.json()["error"]
    broken = client.post("/predict", content=b"--xyz\r\ngarbage", headers={"content-type": "multipart/form-data; "
                                                                                       "boundary=xyz"})
    assert broken.status_code in (400, 422) and "error" in broken.json()
    assert client.post("/predict", files={"file": ("x.png", image_bytes())}, params={"top_k": 0}).status_code == 422
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    assert client.get("/predict").status_code == 405


def test_size_limit_holds_without_a_content_length():
    body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
    chunks = [body] + [b"\0" * 65536] * 40 + [b"\r\n--b--\r\n"]
    with pytest.raises(UploadError) as err:
        parse_multipart_file(iter(chunks), "multipart/form-data; boundary=b", limit=1 << 20)
    assert err.value.status == 413
    name, data = parse_multipart_file(iter(chunks[:3] + chunks[-1:]), "multipart/form-data; boundary=b", 1 << 20)
    assert name == "a.png" and data == b"\0" * (2 * 65536)


def test_uploads_never_touch_the_disk(client, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise AssertionError("an upload was written to a temporary file")

    for name in ("SpooledTemporaryFile", "NamedTemporaryFile", "TemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    big = image_bytes(size=(1000, 800))  # ~2.4 MB: over Starlette's 1 MB spooling threshold
    assert len(big) > 1 << 21
    assert post(client, "/predict", big).status_code == 200
    assert post(client, "/explain", big).status_code == 200


def test_concurrent_requests_share_one_model(checkpoint, monkeypatch):
    from reslab.inference import predictor

    loads = []
    real = predictor.load_source
    monkeypatch.setattr(predictor, "load_source", lambda *a, **k: loads.append(1) or real(*a, **k))
    with TestClient(create_app(checkpoint)) as client:
        images = [image_bytes(seed=i) for i in range(4)]
        expected = [post(client, "/predict", data).json()["predictions"] for data in images]

        def call(i):
            route = "/explain" if i % 5 == 0 else "/predict"
            response = post(client, route, images[i % 4])
            assert response.status_code == 200, response.text
            return i, response

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(40)))
    for i, response in results:
        if i % 5:
            assert response.json()["predictions"] == expected[i % 4]
    assert len(loads) == 1


def test_a_full_queue_answers_503_with_retry_after_and_the_server_recovers(checkpoint):
    from reslab.serve import RETRY_AFTER_S

    predictor = Predictor(checkpoint, backend="torch")
    with TestClient(create_app(predictor, ServeConfig(max_queue=2))) as client:
        service = client.app.state.service
        release = threading.Event()
        real = predictor.probabilities

        def blocked(batch):  # a model that takes as long as the test says
            release.wait(60)
            return real(batch)

        predictor.probabilities = blocked
        data = image_bytes()
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(post, client, "/predict", data) for _ in range(2)]
            deadline = time.monotonic() + 60
            while service.waiting < 2:
                assert time.monotonic() < deadline, "the two requests never reached the model"
                time.sleep(0.01)
            with ThreadPoolExecutor(4) as burst:
                refused = list(burst.map(lambda route: post(client, route, data), ["/predict"] * 3 + ["/explain"]))
            release.set()
            served = [f.result() for f in waiting]
        for response in refused:
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == str(RETRY_AFTER_S)
            assert response.headers["content-type"] == "application/json"
            assert "busy" in response.json()["error"] and "--max-queue 2" in response.json()["error"]
        assert [r.status_code for r in served] == [200, 200]
        del predictor.probabilities  # the load is gone: every request is served again
        assert service.waiting == 0
        assert [post(client, "/predict", data).status_code for _ in range(4)] == [200] * 4
        assert post(client, "/explain", data).status_code == 200


def test_max_queue_is_checked_and_its_help_tells_the_default(capsys):
    from reslab.cli import build_parser, main

    with pytest.raises(ReslabError, match="--max-queue must be at least 1, got 0"):
        ServeConfig(max_queue=0)
    assert main(["serve", "nowhere", "--max-queue", "0"]) == 2
    assert "--max-queue must be at least 1, got 0" in capsys.readouterr().err
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    (action,) = [a for a in serve._actions if "--max-queue" in a.option_strings]
    assert f"(default {DEFAULT_MAX_QUEUE})" in action.help


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1"):
    """A real uvicorn server in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_real_server_on_loopback(checkpoint):
    import httpx

    with running_server(create_app(checkpoint)) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/health").json()["status"] == "ok"
            files = {"file": ("x.png", image_bytes(), "image/png")}
            assert http.post("/predict", files=files).status_code == 200
            oversized = http.post("/predict", files={"file": ("x.bin", b"\0" * (11 << 20))})
            assert oversized.status_code == 413 and "10 MB" in oversized.json()["error"]
            assert http.post("/predict", files=files).status_code == 200


def test_cli_defaults_to_loopback_and_refuses_bad_input(tmp_path, capsys):
    from reslab.cli import build_parser, main

    args = build_parser().parse_args(["serve", "run"])
    assert (args.host, args.port, args.max_upload_mb) == ("127.0.0.1", 8000, 10.0)
    assert ServeConfig().host == "127.0.0.1"
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "no run directory or weights file" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be between 0 and 65535, got 70000" in capsys.readouterr().err
