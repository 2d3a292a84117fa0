"""``medret serve``: the query service (Ray Serve + FastAPI) on this machine, with its web page."""

from __future__ import annotations

import argparse
import signal
import time

from medret.config import parse_sets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with ServiceConfig fields")
    parser.add_argument("--index", help="index URI: local folder or s3://bucket/prefix (default medret-out/index)")
    parser.add_argument("--table", help="default table (default: the only or first one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument(
        "--token-file", help="file holding the bearer token required on /v1 (or MEDRET_TOKEN; never a command line)"
    )
    parser.add_argument("--token", help=argparse.SUPPRESS)  # refused: a command line shows in `ps`
    parser.add_argument(
        "--allow-anonymous",
        action="store_true",
        default=None,
        help="serve without a token on a non-loopback --host (refused otherwise)",
    )
    parser.add_argument("--checkpoint", help="encoder checkpoint, if the one the table names is not reachable")
    parser.add_argument("--root", action="append", dest="roots", help="source prefix thumbnails may be read from")
    parser.add_argument("--replicas", type=int, help="Serve replicas (default 1)")
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint URL for s3:// indexes and sources")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any ServiceConfig field, e.g. refresh_s=1"
    )


def run(args: argparse.Namespace) -> int:
    from medret.config import load_config
    from medret.errors import ConfigError
    from medret.serve.engine import ServiceConfig

    if args.token is not None:
        raise ConfigError("--token would show the secret in the process list; set MEDRET_TOKEN or use --token-file")
    cfg = load_config(
        ServiceConfig,
        args.config,
        overrides={
            "index": args.index,
            "table": args.table,
            "token_file": args.token_file,
            "allow_anonymous": args.allow_anonymous,
            "checkpoint": args.checkpoint,
            "roots": args.roots,
            "replicas": args.replicas,
            "s3.endpoint_url": args.s3_endpoint,
            **parse_sets(args.set),
        },
    )
    from medret.runtime import ensure_ray

    ensure_ray(log_to_driver=False)
    # Ctrl-C and SIGTERM (systemd, Kubernetes) both shut Serve down cleanly, even while it starts. Installed
    # after ray.init (which sets handlers of its own) and explicitly for SIGINT, which a shell that started
    # us in the background may have left ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        url = start(cfg, host=args.host, port=args.port)
        print(f"medret query service on {url} (web page), API docs at {url}docs; Ctrl-C stops it", flush=True)
        while True:
            time.sleep(3600)
    finally:
        print("medret serve: shutting down", flush=True)
        stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def start(cfg: object, *, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Start Serve on the local (or ``RAY_ADDRESS``) Ray and deploy the query app; returns its URL.

    A non-loopback ``host`` needs a token (or ``allow_anonymous``). The token and S3 keys
    reach the replicas through a private file, never through their init arguments.
    """
    from ray import serve

    from medret.runtime import ensure_ray
    from medret.serve.deployment import APP_NAME, build
    from medret.serve.engine import ServiceConfig
    from medret.serve.secrets import is_loopback, require_auth, resolve, write_secrets_file

    assert isinstance(cfg, ServiceConfig)
    cfg = resolve(cfg)
    if not is_loopback(host):
        require_auth(cfg, f"on {host}:{port}")
    cfg, secrets = write_secrets_file(cfg)
    if secrets is not None:
        _SECRET_FILES.append(secrets)
    ensure_ray(log_to_driver=False)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": cfg.request_timeout_s})
    serve.run(build(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}/"


#: secret files written for this process's replicas, removed by :func:`stop`
_SECRET_FILES: list[object] = []


def stop() -> None:
    from pathlib import Path

    from ray import serve

    serve.shutdown()
    while _SECRET_FILES:
        Path(str(_SECRET_FILES.pop())).unlink(missing_ok=True)
