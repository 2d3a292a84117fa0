"""``medret serve``: the query service (Ray Serve + FastAPI) on this machine, with its web page."""

from __future__ import annotations

import argparse
import signal
import time

from medret.cli.options import add_index, add_s3, add_table
from medret.config import parse_sets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with ServiceConfig fields")
    add_index(parser)
    add_table(parser, shown="the only or first one; uploads: a table that serves their kind, this one if it does")
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
    parser.add_argument(
        "--shards",
        type=int,
        help="split each table's codes over N Ray actors shared by the replicas (default 1: each replica holds them)",
    )
    add_s3(parser)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any ServiceConfig field, e.g. refresh_s=1"
    )


def run(args: argparse.Namespace) -> int:
    from medret.config import load_config
    from medret.errors import ConfigError
    from medret.serve.config import ServiceConfig

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
            "shards": args.shards,
            "s3.endpoint_url": args.s3_endpoint,
            **parse_sets(args.set),
        },
    )
    from medret.runtime import ensure_ray
    from medret.serve.deployment import start, stop

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
