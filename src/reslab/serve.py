"""`reslab serve`: a trained model behind a small HTTP API and a one-page web app.

One `Predictor` is loaded (and its fast path built and warmed) when the server starts, and is
shared by every request. Requests are decoded and preprocessed in worker threads, in parallel;
every forward pass (predictions on the Predictor's fast backend, Grad-CAM on its eager model)
runs on one model thread, one call at a time, because one call's intra-op threads already use
every core. At most `max_queue` requests wait for that thread; the next one is answered 503 with
a Retry-After header at once, before its upload is read, so a burst of clients costs neither
memory nor a queue that only grows: the waiting ones are served within a bounded time.

Uploads are untrusted: the body is read as a stream and refused once it passes the size limit,
parsed in memory (FastAPI's own form parser spools files over 1 MB to a temporary file, and
nothing uploaded may touch the disk), and the image's pixel count is checked from its header
before any pixel is decoded, so a decompression bomb costs nothing.

(No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run
time, and `Request` is imported inside `create_app` so that the extra stays optional.)
"""

import contextlib
import io
import ipaddress
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources

import torch
from PIL import Image, UnidentifiedImageError

from reslab.errors import ReslabError
from reslab.explain import Explainer
from reslab.inference.predictor import Predictor

# Room for the multipart boundaries and part headers around the file itself.
_MULTIPART_SLACK = 64 * 1024
_FORMATS = "JPEG, PNG, BMP, GIF, WebP or TIFF"
# Requests waiting for the model thread: enough to keep it busy while others decode (the worker
# pool decodes in parallel), few enough that the last one waits a few dozen forward passes, not
# seconds on end. Beyond it a client is told to come back after RETRY_AFTER_S.
DEFAULT_MAX_QUEUE = 32
RETRY_AFTER_S = 1


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 10.0
    # Below PIL's own bomb limit (89 MP warns, 179 MP raises): a 40 MP photo still passes.
    max_pixels: int = 64_000_000
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting for the model; more get 503
    layer: str | None = None  # Grad-CAM layer; None: the model's last stage
    # The Predictor's options when create_app loads one (its constructor checks them); a ready
    # Predictor given to create_app brings its own.
    device: str = "cpu"
    backend: str = "auto"  # the fastest installed one by default
    precision: str = "auto"
    top_k: int = 5  # /predict's default; a request may ask for another with ?top_k=
    model: str | None = None  # architecture of a foreign checkpoint (see reslab.weights.load_source)
    classes: str | None = None  # its class names file
    calibration: str | None = None  # int8: the data that calibrates it (see Predictor)
    calibration_images: int | None = None  # None: the Predictor's default

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ReslabError(f"--port must be between 0 and 65535, got {self.port}")
        if not self.max_upload_mb > 0:
            raise ReslabError(f"--max-upload-mb must be positive, got {self.max_upload_mb}")
        if self.max_pixels < 1:
            raise ReslabError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.max_queue < 1:
            raise ReslabError(f"--max-queue must be at least 1, got {self.max_queue}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class UploadError(Exception):
    """A request the server refuses: an HTTP status, a one-line reason for the client, any headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_multipart_file(chunks, content_type: str, limit: int, field: str = "file") -> tuple[str, bytes]:
    """(filename, bytes) of the form field `field` from a multipart body given as an iterable of chunks.

    Everything stays in memory; more than `limit` bytes of file (or of body) is refused with 413.
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadError(415, f"send the image as multipart/form-data with the field {field!r}, "
                               f"got Content-Type {content_type!r}")
    parts: list[dict] = []
    header = {"field": bytearray(), "value": bytearray()}

    def on_part_begin():
        parts.append({"headers": {}, "data": io.BytesIO()})

    def on_header_field(data, start, end):
        header["field"] += data[start:end]

    def on_header_value(data, start, end):
        header["value"] += data[start:end]

    def on_header_end():
        parts[-1]["headers"][bytes(header["field"]).lower()] = bytes(header["value"])
        header["field"], header["value"] = bytearray(), bytearray()

    def on_part_data(data, start, end):
        part = parts[-1]
        if part["data"].tell() + end - start > limit:
            raise UploadError(413, f"upload larger than the limit of {limit / 2**20:g} MB; send a smaller image")
        part["data"].write(data[start:end])

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data,
    })
    received = 0
    try:
        for chunk in chunks:
            received += len(chunk)
            if received > limit + _MULTIPART_SLACK:
                raise UploadError(413, f"upload larger than the limit of {limit / 2**20:g} MB; send a smaller image")
            parser.write(chunk)
        parser.finalize()
    except ValueError as err:  # python-multipart's parse errors are ValueErrors
        raise UploadError(400, f"malformed multipart body ({err}); send the image in the field {field!r}") from None
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if disposition.get(b"name", b"").decode("utf-8", "replace") == field:
            filename = disposition.get(b"filename", b"upload").decode("utf-8", "replace") or "upload"
            return filename, part["data"].getvalue()
    raise UploadError(422, f"no form field {field!r} in the request; send the image as multipart field {field!r}")


class Service:
    """The model, loaded once, and what the endpoints do with it (no HTTP in here)."""

    def __init__(self, predictor: Predictor, config: ServeConfig | None = None):
        self.predictor = predictor
        self.config = config or ServeConfig()
        # One thread for every forward pass. Besides taking turns, which they must anyway, this keeps
        # the per-thread state of the runtimes (an OpenMP thread team and its buffers for each thread
        # that runs a parallel op) to one thread, rather than one per request thread, kept for good.
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="reslab-model")
        self.waiting = 0  # requests admitted and not answered yet
        self._waiting_lock = threading.Lock()
        # An exported (.onnx/.xml) model has no eager model to take gradients of: predictions only.
        self.explainer = Explainer(predictor, self.config.layer) if predictor.model is not None else None
        self.model_name = predictor.meta.model
        self.warm_up()

    def on_model_thread(self, fn, *args):
        """fn(*args), run on the model thread; the caller waits for it."""
        return self.model_thread.submit(fn, *args).result()

    @contextlib.contextmanager
    def admitted(self):
        """A place among the requests waiting for the model, or 503 when all `max_queue` are taken."""
        with self._waiting_lock:
            if self.waiting >= self.config.max_queue:
                raise UploadError(503, f"the server is busy: the queue for the model is full (--max-queue "
                                       f"{self.config.max_queue}); retry in {RETRY_AFTER_S} s",
                                  headers={"Retry-After": str(RETRY_AFTER_S)})
            self.waiting += 1
        try:
            yield
        finally:
            with self._waiting_lock:
                self.waiting -= 1

    def warm_up(self) -> None:
        """Build the fast path (export, compile...) now, so that the first request is not the slow one."""
        pre = self.predictor.preprocessing
        size, channels = int(pre.get("image_size", 224)), int(pre.get("in_channels", 3))
        self.on_model_thread(self.predictor.probabilities, torch.zeros(1, channels, size, size, dtype=torch.uint8))

    def open_image(self, data: bytes, filename: str) -> Image.Image:
        if not data:
            raise UploadError(400, f"{filename!r} is empty; send an image file")
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise UploadError(413, f"{filename!r} is too large to decode ({err})") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise UploadError(415, f"{filename!r} is not an image; send a {_FORMATS} file") from None
        width, height = image.size
        if width * height > self.config.max_pixels:
            raise UploadError(
                413, f"{filename!r} is {width}x{height} pixels, more than the limit of "
                     f"{self.config.max_pixels / 1e6:g} megapixels; send a smaller image"
            )
        return image

    def _batch(self, data: bytes, filename: str):
        image = self.open_image(data, filename)
        try:
            return self.predictor.load_images([image])
        except ReslabError:
            raise UploadError(
                400, f"cannot decode {filename!r}: the file is truncated or corrupt; send a complete {_FORMATS} file"
            ) from None

    def predict(self, data: bytes, filename: str, top_k: int | None = None) -> dict:
        start = time.perf_counter()
        batch = self._batch(data, filename)
        probs = self.on_model_thread(self.predictor.probabilities, batch)
        (top,) = self.predictor.top(probs, top_k)
        return {
            "predictions": [{"class": name, "probability": p} for name, p in top],
            "model": self.model_name,
            "ms": round((time.perf_counter() - start) * 1000.0, 3),
        }

    def explain(self, data: bytes, filename: str, class_name: str | None = None) -> tuple[bytes, dict]:
        """PNG bytes of the Grad-CAM overlay, and what it explains (for the response headers)."""
        if self.explainer is None:
            raise UploadError(501, f"{self.model_name} is served from an exported file, which has no gradients "
                                   "for Grad-CAM; serve the reslab checkpoint to explain")
        image = self.open_image(data, filename)
        self.explainer.class_index(class_name)  # an unknown class is the client's error, before decoding
        try:
            explanation = self.on_model_thread(self.explainer.explain, image, class_name)
        except ReslabError:
            raise UploadError(
                400, f"cannot decode {filename!r}: the file is truncated or corrupt; send a complete {_FORMATS} file"
            ) from None
        buffer = io.BytesIO()
        Image.fromarray(explanation.overlay()).save(buffer, format="PNG")
        info = {"class": explanation.class_name, "layer": explanation.layer}
        return buffer.getvalue(), info

    def health(self) -> dict:
        pre = self.predictor.preprocessing
        return {
            "status": "ok",
            "model": self.model_name,
            "classes": len(self.predictor.classes),
            "image_size": pre.get("image_size"),
            "layer": self.explainer.layer if self.explainer else None,
            "backend": self.predictor.backend,
            "max_upload_mb": self.config.max_upload_mb,
            "max_queue": self.config.max_queue,
        }


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "description": "an image file"}},
                }
            }
        },
    }
}
_ERROR = {"content": {"application/json": {"example": {"error": "'x.txt' is not an image; send a JPEG..."}}}}
_BUSY = {"description": "more than --max-queue requests are waiting; retry after the Retry-After seconds",
         "headers": {"Retry-After": {"schema": {"type": "integer"}}}, **_ERROR}
_ERRORS = {400: _ERROR, 413: _ERROR, 415: _ERROR, 422: _ERROR, 503: _BUSY}


def _require_extra() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "python_multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise ReslabError(f"`reslab serve` needs {', '.join(missing)}; install them with pip install 'reslab[serve]'")


def create_app(source, config: ServeConfig | None = None):
    """The FastAPI application for a run directory, weights file or ready `Predictor`."""
    _require_extra()
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from reslab import __version__

    config = config or ServeConfig()
    predictor = source if isinstance(source, Predictor) else Predictor(
        source, device=config.device, backend=config.backend, precision=config.precision, top_k=config.top_k,
        model=config.model, classes=config.classes, calibration=config.calibration,
        calibration_images=config.calibration_images)
    service = Service(predictor, config)
    app = FastAPI(
        title="reslab",
        version=__version__,
        description=f"Predictions and Grad-CAM explanations from a {service.model_name} "
                    f"({len(predictor.classes)} classes). Images go in the multipart field `file`.",
    )
    app.state.service = service

    @app.exception_handler(UploadError)
    async def upload_error(_request, err: UploadError):
        return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)

    @app.exception_handler(ReslabError)
    async def reslab_error(_request, err: ReslabError):
        return JSONResponse({"error": str(err)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)

    async def upload(request: Request) -> tuple[str, bytes]:
        limit = config.max_upload_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + _MULTIPART_SLACK:
            raise UploadError(413, f"upload of {int(length) / 2**20:.1f} MB is larger than the limit of "
                                   f"{config.max_upload_mb:g} MB; send a smaller image")
        chunks = []
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + _MULTIPART_SLACK:  # a client that lied about, or left out, its length
                raise UploadError(413, f"upload larger than the limit of {config.max_upload_mb:g} MB; "
                                       "send a smaller image")
            chunks.append(chunk)
        return parse_multipart_file(chunks, request.headers.get("content-type", ""), limit)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse((resources.files("reslab") / "web" / "index.html").read_text(encoding="utf-8"))

    @app.get("/health", summary="Liveness and what is loaded")
    def health() -> dict:
        return service.health()

    @app.post("/predict", summary="Top-k classes of an uploaded image", openapi_extra=_UPLOAD_BODY,
              responses={200: {"content": {"application/json": {"example": {
                  "predictions": [{"class": "cat", "probability": 0.93}], "model": "resnet20", "ms": 3.1}}}},
                  **_ERRORS})
    async def predict(request: Request, top_k: int = Query(predictor.top_k, ge=1, le=1000)):
        with service.admitted():
            filename, data = await upload(request)
            return await run_in_threadpool(service.predict, data, filename, top_k)

    @app.post("/explain", summary="Grad-CAM overlay (PNG) for the top class or ?class=NAME",
              openapi_extra=_UPLOAD_BODY, response_class=Response,
              responses={200: {"content": {"image/png": {}}}, **_ERRORS})
    async def explain(request: Request, class_name: str | None = Query(None, alias="class")):
        with service.admitted():
            filename, data = await upload(request)
            png, info = await run_in_threadpool(service.explain, data, filename, class_name)
        # Class names may be any text; headers must be latin-1, so they are percent-encoded.
        from urllib.parse import quote

        return Response(png, media_type="image/png",
                        headers={"X-Reslab-Class": quote(info["class"]), "X-Reslab-Layer": info["layer"],
                                 "Cache-Control": "no-store"})

    return app


def run_app(app, config: ServeConfig) -> None:
    """Serve `app` in the foreground until interrupted."""
    import uvicorn

    uvicorn.run(app, host=config.host, port=config.port, log_level="info")


def serve(source, config: ServeConfig | None = None) -> None:
    """Load the model once and serve it in the foreground until interrupted."""
    config = config or ServeConfig()
    run_app(create_app(source, config), config)
