"""`reslab serve` under load, and the README's screenshot of its page. Run by hand, not in CI.

    # requests/s and p50/p99 latency of POST /predict: 8 concurrent clients on loopback for 30 s
    .venv/bin/python benchmarks/bench_serve.py load --clients 8 --seconds 30

    # does the server's memory stay flat? 5 rounds of 10 s, 5 s idle between, RSS after each
    .venv/bin/python benchmarks/bench_serve.py load --clients 64 --seconds 10 --rounds 5 --idle 5

    # docs/images/serve.png: the page in headless Chromium after uploading a photo
    .venv/bin/python benchmarks/bench_serve.py screenshot --out docs/images/serve.png

The server is the real command line (`python -m reslab serve CKPT`) in its own process, so the
numbers include uvicorn, FastAPI, multipart parsing, JPEG decoding and the model. The clients are
threads with one keep-alive httpx connection each, in this process, on the same cores. A 503
(more than `--max-queue` requests waiting) is counted apart from errors, and the client waits the
Retry-After seconds it was given, as a polite client would. The server's resident memory (VmRSS)
is read after start-up, after each round and after the idle pause that follows it.

Without --checkpoint, a resnet20 checkpoint is made from the third-party CIFAR-10 weights in
/work/shared/data/pretrained-cifar10 (random weights where they are absent: same speed).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SHARED = Path("/work/shared/data")
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEFAULT_IMAGE = SHARED / "cats-vs-dogs-400" / "cats" / "cat.1.jpg"


def resnet20_checkpoint(folder: Path) -> Path:
    """resnet20 with the shared CIFAR-10 weights, as a reslab checkpoint (random init if absent)."""
    from reslab.checkpoint import CheckpointMeta, save_weights
    from reslab.models import create_model

    model = create_model("resnet20", num_classes=10)
    weights = SHARED / "pretrained-cifar10" / "resnet20-12fca82f.th"
    source = "random"
    if weights.exists():
        from reslab.transfer import load_pretrained

        load_pretrained(model, str(weights), model_name="resnet20", quiet=True)
        source = str(weights)
    # Those checkpoints were trained with ImageNet's normalization on 32x32 CIFAR images.
    meta = CheckpointMeta("resnet20", {}, CIFAR10,
                          {"image_size": 32, "in_channels": 3, "mean": [0.485, 0.456, 0.406],
                           "std": [0.229, 0.224, 0.225], "resize": "center_crop"},
                          extra={"source": source})
    return save_weights(folder / "resnet20-cifar10.safetensors", model.eval(), meta)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int, extra: list[str]) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "reslab", "serve", str(checkpoint), "--port", str(port), *extra]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited: {server.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.terminate()
    raise SystemExit("server did not start in 120 s")


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return round(kb / 1024, 1)


def one_round(args, url: str, image: bytes, name: str) -> dict:
    """`args.clients` clients posting to /predict for args.warmup + args.seconds; latencies of the 200s
    answered after the warm-up."""
    import httpx

    latencies: list[list[float]] = [[] for _ in range(args.clients)]
    errors: list[str] = []
    rejected = [0] * args.clients
    stop = time.monotonic() + args.warmup + args.seconds
    measure_from = time.monotonic() + args.warmup

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while (now := time.monotonic()) < stop:
                start = time.perf_counter()
                try:
                    response = http.post("/predict", files={"file": (name, image, "image/jpeg")})
                except httpx.HTTPError as err:  # a dropped connection is an error to count, not the end
                    errors.append(f"{type(err).__name__}: {err}")
                    continue
                elapsed = time.perf_counter() - start
                if response.status_code == 503:
                    rejected[i] += now >= measure_from
                    time.sleep(float(response.headers.get("retry-after", 1)))
                elif response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:200]}")
                elif now >= measure_from:
                    latencies[i].append(elapsed)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = np.array([x for per_client in latencies for x in per_client]) * 1000.0
    percentile = {p: round(float(np.percentile(ms, p)), 2) if ms.size else None for p in (50, 90, 99)}
    return {
        "requests": int(ms.size),
        "rejected_503": sum(rejected),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "requests_per_second": round(ms.size / args.seconds, 1),
        "latency_ms": {"p50": percentile[50], "p90": percentile[90], "p99": percentile[99],
                       "mean": round(float(ms.mean()), 2) if ms.size else None},
    }


def load(args, checkpoint: Path, image: bytes, name: str) -> dict:
    import httpx

    port = free_port()
    server = start_server(checkpoint, port, args.serve_args)
    url = f"http://127.0.0.1:{port}"
    try:
        health = httpx.get(f"{url}/health").json()
        rss_start = rss_mb(server.pid)
        rounds = []
        for k in range(args.rounds):
            result = one_round(args, url, image, name)
            result["rss_mb_after_round"] = rss_mb(server.pid)
            time.sleep(args.idle)
            result["rss_mb_after_idle"] = rss_mb(server.pid)
            rounds.append({"round": k + 1, **result})
            print(f"round {k + 1}: {result['requests']} served, {result['rejected_503']} refused (503), "
                  f"{result['errors']} errors, p99 {result['latency_ms']['p99']} ms, RSS "
                  f"{result['rss_mb_after_round']} MB, after {args.idle:g} s idle {result['rss_mb_after_idle']} MB",
                  file=sys.stderr)
    finally:
        server.terminate()
        server.wait(30)
    return {
        "endpoint": "POST /predict",
        "model": health["model"],
        "backend": health["backend"],
        "max_queue": health.get("max_queue"),
        "clients": args.clients,
        "seconds": args.seconds,
        "rss_mb_after_start": rss_start,
        **({k: v for k, v in rounds[0].items() if k != "round"} if args.rounds == 1 else {"rounds": rounds}),
        "image": f"{name} ({len(image)} bytes)",
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def screenshot(args, checkpoint: Path, image_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = start_server(checkpoint, port, args.serve_args)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1180, "height": 640}, device_scale_factor=1)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
            page.set_input_files("#file", str(image_path))
            page.wait_for_function("document.getElementById('overlay').naturalWidth > 0", timeout=60_000)
            page.wait_for_timeout(600)  # the bars' width transition
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["load", "screenshot"])
    parser.add_argument("--checkpoint", type=Path, help="reslab checkpoint (default: resnet20 CIFAR-10, see above)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="the uploaded image")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring, each round")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of load, the server's memory read after each")
    parser.add_argument("--idle", type=float, default=0.0, help="seconds of rest after each round before RSS is read")
    parser.add_argument("--out", default="docs/images/serve.png", help="screenshot file")
    parser.add_argument("--json", type=Path, help="also write the load result here")
    parser.add_argument("--serve-args", default="", help="extra `reslab serve` options, e.g. '--backend torch'")
    args = parser.parse_args()
    args.serve_args = shlex.split(args.serve_args)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or resnet20_checkpoint(Path(tmp))
        if args.image.exists():
            image_path = args.image
        else:  # a synthetic photo-sized JPEG
            from PIL import Image

            image_path = Path(tmp) / "synthetic.jpg"
            pixels = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(image_path, quality=90)
        if args.mode == "screenshot":
            screenshot(args, checkpoint, image_path)
            return
        result = load(args, checkpoint, image_path.read_bytes(), image_path.name)
    result["command"] = shlex.join([Path(sys.executable).name, *sys.argv])
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
