"""`hierloc serve`: the model loaded once, behind a local HTTP API and a page to try it in a browser."""

from __future__ import annotations

import argparse
import ipaddress
import logging

from hierloc.cli import HelpFormatter
from hierloc.errors import InputError

log = logging.getLogger(__name__)

# The packages only the server uses (module names).
SERVER_PACKAGES = ("uvicorn", "starlette", "multipart", "python_multipart", "anyio")

EPILOG = """\
endpoints: GET / (the page: drop a photo, see the hierarchy, its concepts and the map), GET /health,
POST /predict (multipart, images in the field 'file', repeatable; options as in `hierloc predict`: top_k, beam,
min_prob, max_level, exif, flat; answers what `hierloc predict --format json` prints), POST /explain (the hierarchy
with runner-ups, concepts and a PNG map as a data: URL).

safety: binds 127.0.0.1 unless --host says otherwise; uploads are held in memory and never written to disk; the
request body is capped by --max-upload-mb; images pass the CLI's guards (decompression bombs refused from their
header); concurrent requests share model batches through a queue of --max-queue requests (beyond it: 503 with
Retry-After); each request waits --timeout seconds at most (then 504); a request body that stalls for
--stall-timeout seconds, or is not complete after --body-timeout seconds, is answered 408 and its connection
closed. Every error is a JSON object naming the problem; no answer names a path of the server's file system.

stopping: SIGTERM or Ctrl-C closes the listening socket, answers the requests in flight (those still waiting for
the model after half of --shutdown-timeout get 503) and exits 0 within about --shutdown-timeout seconds.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", formatter_class=HelpFormatter, help="serve a model over HTTP, with a page",
                              description="Load a model once and answer HTTP requests on this machine.",
                              epilog=EPILOG)
    p.add_argument("--model", required=True,
                   help="trained model directory (what `hierloc train` writes), or a hub id of one in the local cache")
    p.add_argument("--allow-download", action="store_true",
                   help="fetch a --model hub id that is not in the local cache (off: never download silently)")
    p.add_argument("--no-calibration", action="store_true",
                   help="report the model's raw probabilities, ignoring its calibration.json")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (0.0.0.0 exposes the server to the network: there is no authentication)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body, in MiB")
    p.add_argument("--max-files", type=int, default=16, help="images per request at most")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a request waits for the model at most")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for the model at most (then 503)")
    p.add_argument("--max-batch", type=int, default=32, help="images per model call at most")
    p.add_argument("--stall-timeout", type=float, default=10.0,
                   help="seconds a request body may send nothing before it is refused (408)")
    p.add_argument("--body-timeout", type=float, default=120.0,
                   help="seconds a whole request body may take to arrive (then 408)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds SIGTERM or Ctrl-C waits for the requests in flight at most")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections at most (a request on one more: 503)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads of the model (0: torch's default, one per core; 1 is often faster "
                        "on a machine busy with other work)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=run)


def limits_from(args: argparse.Namespace):
    """The checked limits of the command line (`hierloc.serve.app.Limits`)."""
    from hierloc.serve.app import Limits

    if not 0 < args.max_upload_mb <= 1024:
        raise InputError(f"--max-upload-mb {args.max_upload_mb}: expected a size in (0, 1024] MiB")
    for name in ("timeout", "stall_timeout", "body_timeout", "shutdown_timeout"):
        if not getattr(args, name) > 0:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive number of "
                             "seconds")
    if args.threads < 0:
        raise InputError(f"--threads {args.threads}: expected an integer >= 0 (0: torch's default)")
    for name in ("max_files", "max_queue", "max_batch", "max_connections"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: expected 0 to 65535")
    return Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_files=args.max_files,
                  timeout_s=args.timeout, max_queue=args.max_queue, max_batch=args.max_batch,
                  stall_timeout_s=args.stall_timeout, body_timeout_s=args.body_timeout,
                  shutdown_timeout_s=args.shutdown_timeout, max_connections=args.max_connections)


def run(args: argparse.Namespace) -> int:
    # torch-heavy and optional: imported when the command runs, so that `hierloc --help` stays fast
    try:
        import python_multipart  # noqa: F401 - Starlette's form parser needs it
        import uvicorn  # noqa: F401 - checked here by name, whether or not hierloc.serve.server was imported
        from hierloc.serve.app import create_app
        from hierloc.serve.server import serve
    except ModuleNotFoundError as exc:
        if exc.name not in SERVER_PACKAGES:
            raise
        raise InputError(f"hierloc serve needs {exc.name}, which hierloc requires: reinstall it "
                         "(pip install starlette uvicorn python-multipart)") from None
    from hierloc.inference.predictor import HierLoc

    limits = limits_from(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not _is_loopback(args.host):
        log.warning("binding %s: the server is reachable from other machines and has no authentication",
                    args.host)
    model = HierLoc.from_pretrained(args.model, device=args.device, calibrated=not args.no_calibration,
                                    allow_download=args.allow_download)
    app = create_app(model, args.model, limits)
    log.info("serving %s on http://%s:%d/ (Ctrl-C stops)", args.model, args.host, args.port)
    serve(app, args.host, args.port)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
