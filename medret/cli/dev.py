"""``medret dev s3``: a real S3 server (SeaweedFS) on loopback for local work."""

from __future__ import annotations

import argparse
import signal
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dev_command", metavar="TOOL", required=True)
    s3 = sub.add_parser(
        "s3", help="run a local S3 server until Ctrl-C", description="Run SeaweedFS S3 on 127.0.0.1 until Ctrl-C."
    )
    s3.add_argument("--dir", default="medret-out/s3", help="data folder (kept between runs; default: %(default)s)")
    s3.add_argument("--port", type=int, default=8333, help="S3 port (default: %(default)s)")
    s3.add_argument("--access-key", default="medret", help="access key id clients must use")
    s3.add_argument("--secret-key", default="medret-secret", help="secret key clients must use")
    s3.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")


def run(args: argparse.Namespace) -> int:
    from medret.storage.s3 import S3Store
    from medret.storage.s3local import SeaweedS3
    from medret.storage.uri import parse_uri

    # before anything starts: a process launched in the background inherits SIGINT *ignored*,
    # and Ctrl-C / SIGINT / SIGTERM must still stop the server cleanly
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = SeaweedS3(args.dir, port=args.port, access_key=args.access_key, secret_key=args.secret_key)
    server.start()
    try:
        for bucket in args.bucket:
            S3Store(parse_uri(f"s3://{bucket}"), server.config()).ensure_bucket()
        print(
            f"S3 server on {server.endpoint} (data in {args.dir}). In another shell:\n"
            f"  export AWS_ENDPOINT_URL={server.endpoint} AWS_ACCESS_KEY_ID={args.access_key} "
            f"AWS_SECRET_ACCESS_KEY={args.secret_key}\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        while True:  # until SIGINT / SIGTERM (signal.pause() also returns for other handled signals)
            time.sleep(3600)
    finally:
        server.stop()
    return 0
