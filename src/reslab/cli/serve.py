"""`reslab serve`: the HTTP API (`/predict`, `/explain`, `/health`, `/docs`) and the web page at `/`."""

from __future__ import annotations

from reslab.cli.options import add_inference_options


def add_arguments(parser) -> None:
    add_inference_options(parser, "source", "model", "classes")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default 10)")
    # None: ServeConfig's default, reslab.serve.DEFAULT_MAX_QUEUE (importing it here would import torch
    # for every command); tests/test_serve.py holds the help's figure to it.
    parser.add_argument("--max-queue", type=int, help="requests that may wait for the model; more are answered "
                                                      "503 with a Retry-After header (default 32)")
    parser.add_argument("--layer", default=None, help="Grad-CAM layer (default: the model's last stage)")
    add_inference_options(parser, "top_k", "device", "backend", "precision", "calibration", "calibration_images",
                          top_k="classes returned by /predict unless ?top_k= asks (default 5)")


def run(args) -> int:
    import sys
    from dataclasses import fields

    from reslab.serve import ServeConfig, create_app, is_loopback, run_app

    config = ServeConfig(**{f.name: getattr(args, f.name) for f in fields(ServeConfig)
                            if getattr(args, f.name, None) is not None})
    app = create_app(args.source, config)  # the model loads once, before the port opens
    if not is_loopback(config.host):
        print(f"reslab serve: warning: listening on {config.host}, reachable from other machines; "
              "the API has no authentication", file=sys.stderr)
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"reslab serve: http://{host}:{config.port}/ (API docs at /docs); Ctrl-C stops", file=sys.stderr)
    run_app(app, config)
    return 0
