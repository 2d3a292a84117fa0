"""``medret inspect PATH_OR_URI``: decode a file the way the pipeline would and say what medret sees."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from medret.cli.options import add_json, add_s3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH_OR_URI", help="local file or s3://bucket/key")
    add_json(parser, "one object per file")
    parser.add_argument("--preprocess", action="store_true", help="MRI: run the brain recipe and report its timings")
    parser.add_argument("--mpp", type=float, default=None, help="slides: microns per pixel when the file has none")
    parser.add_argument("--pixel-budget", type=int, default=None, help="refuse images declaring more pixels")
    add_s3(parser)


def _print_text(info: dict[str, Any]) -> None:
    print(f"{info['path']}")
    for key, value in info.items():
        if key == "path":
            continue
        if isinstance(value, dict):
            print(f"  {key}:")
            for k, v in value.items():
                print(f"    {k}: {v}")
        else:
            print(f"  {key}: {value}")


def run(args: argparse.Namespace) -> int:
    from medret.config import S3Config
    from medret.errors import MedretError
    from medret.io.base import DEFAULT_PIXEL_BUDGET
    from medret.kinds.inspect import fetched, inspect_file

    s3 = S3Config(endpoint_url=args.s3_endpoint) if args.s3_endpoint else None
    failed = 0
    for path in args.paths:
        try:
            with fetched(path, s3) as local:
                info = inspect_file(
                    local,
                    name=path,
                    mpp=args.mpp,
                    preprocess=args.preprocess,
                    pixel_budget=args.pixel_budget or DEFAULT_PIXEL_BUDGET,
                )
        except (MedretError, OSError) as err:
            failed += 1
            if args.json:
                print(json.dumps({"path": path, "error": str(err), "error_type": type(err).__name__}))
            else:
                print(f"medret inspect: error: {err}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(info, default=str))
        else:
            _print_text(info)
    return 1 if failed else 0
