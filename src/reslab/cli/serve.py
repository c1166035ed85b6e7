"""`reslab serve`: the HTTP API (`/predict`, `/explain`, `/health`, `/docs`) and the web page at `/`."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("source", metavar="RUN_OR_CKPT", help="run directory or reslab weights file")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default 10)")
    parser.add_argument("--layer", default=None, help="Grad-CAM layer (default: the model's last stage)")
    parser.add_argument("--top-k", type=int, default=5, help="classes returned by /predict (default 5)")
    parser.add_argument("--backend", default="auto",
                        help="auto (fastest installed; default), torch, onnxruntime, openvino: runs /predict")
    parser.add_argument("--precision", default="auto", help="fp32, bf16 or auto (bf16 where native; default)")


def run(args) -> int:
    import sys

    from reslab.serve import ServeConfig, create_app, is_loopback, run_app

    config = ServeConfig(host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, layer=args.layer,
                         top_k=args.top_k, backend=args.backend, precision=args.precision)
    app = create_app(args.source, config)  # the model loads once, before the port opens
    if not is_loopback(config.host):
        print(f"reslab serve: warning: listening on {config.host}, reachable from other machines; "
              "the API has no authentication", file=sys.stderr)
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"reslab serve: http://{host}:{config.port}/ (API docs at /docs); Ctrl-C stops", file=sys.stderr)
    run_app(app, config)
    return 0
