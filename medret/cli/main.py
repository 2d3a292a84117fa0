"""``medret``: one entry point, one module per command (imported only when it runs)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence

from medret import __version__
from medret.errors import JobStoppedError, MedretError

# command -> (module, one-line help). Modules expose add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("medret.cli.inspect", "decode any supported file and show what medret sees in it"),
    "kinds": ("medret.cli.kinds", "list the kinds of file medret reads (built in and from plugins)"),
    "train": ("medret.cli.train", "train a hashing encoder with Ray Train (DDP) and export the best epoch"),
    "evaluate": ("medret.cli.evaluate", "score encoders on medmnist-4 or your own .npz files; tables, JSON, plots"),
    "index": ("medret.cli.index", "index a folder or S3 prefix into a code table (backfill or incremental)"),
    "quarantine": ("medret.cli.quarantine", "list the objects indexing could not index, or retry them"),
    "search": ("medret.cli.search", "top-k similar items for an image or an indexed item, without a server"),
    "serve": ("medret.cli.serve", "run the query service (Ray Serve HTTP API and web page) on this machine"),
    "demo": ("medret.cli.demo", "index the medmnist-4 gallery, answer sample queries, print the evaluation"),
    "dev": ("medret.cli.dev", "developer tools: a local S3 server"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medret",
        description="Distributed batch indexing and Hamming search for medical image retrieval.",
    )
    parser.add_argument("--version", action="version", version=f"medret {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(importlib.import_module(args._module).run(args))
    except JobStoppedError as err:  # nothing lost; the same command resumes
        if getattr(args, "json", False) and err.summary is not None:
            print(json.dumps(err.summary.to_dict(), indent=1))  # type: ignore[attr-defined]
        print(f"medret {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except MedretError as err:
        print(f"medret {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"medret {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
