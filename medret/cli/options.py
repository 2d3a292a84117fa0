"""Options several commands share, declared once so each means the same everywhere.

Each helper adds one option with the same name, type, default and help wherever it is used;
a command states only what differs in fact (its default, whether the option is required).
Nothing heavy is imported here: ``medret --help`` builds every command's parser.

>>> import argparse
>>> p = argparse.ArgumentParser()
>>> add_index(p)
>>> add_table(p)
>>> add_s3(p)
>>> add_json(p, "the result")
>>> add_out(p, "the summary")
>>> p.parse_args([])
Namespace(index=None, table=None, s3_endpoint=None, json=False, out=None)
>>> vars(p.parse_args(["--index", "s3://b/idx", "--s3-endpoint", "http://127.0.0.1:8333", "--json"]))["json"]
True
"""

from __future__ import annotations

import argparse

DEFAULT_INDEX = "medret-out/index"


def add_index(
    parser: argparse.ArgumentParser, *, default: str | None = None, shown: str = DEFAULT_INDEX, required: bool = False
) -> None:
    """``--index URI``: where the code tables live. ``shown`` is the default the help names when the
    option is left out (the command's config decides it); ``default`` sets one here instead."""
    note = "" if required else f" (default: {default or shown})"
    parser.add_argument(
        "--index", default=default, required=required, help=f"index location: local folder or s3://bucket/prefix{note}"
    )


def add_table(parser: argparse.ArgumentParser, *, default: str | None = None, shown: str = "codes") -> None:
    """``--table NAME``: which code table of the index."""
    parser.add_argument("--table", default=default, help=f"code table name (default: {default or shown})")


def add_s3(parser: argparse.ArgumentParser, *, note: str = "") -> None:
    """``--s3-endpoint URL``: the S3-compatible server for every ``s3://`` URI of the command."""
    text = (
        "S3-compatible endpoint URL for s3:// URIs (credentials from the standard AWS chain: AWS_* variables, ~/.aws)"
    )
    parser.add_argument("--s3-endpoint", default=None, help=f"{text}{'; ' + note if note else ''}")


def add_json(parser: argparse.ArgumentParser, what: str, *, note: str = "") -> None:
    """``--json``: ``what`` as JSON on stdout, for programs to read."""
    parser.add_argument(
        "--json", action="store_true", help=f"print {what} as JSON on stdout{'; ' + note if note else ''}"
    )


def add_out(parser: argparse.ArgumentParser, what: str, *, shown: str = "medret-out") -> None:
    """``--out DIR``: the local folder a command leaves its outputs in."""
    parser.add_argument("--out", help=f"local folder for {what} (default: {shown})")


def add_archive(parser: argparse.ArgumentParser, *, source_help: str) -> None:
    """``--source URI`` and how its labels are found: ``--labels``, ``--label-tag``, ``--group-column``
    (``medret train`` and ``medret evaluate`` read an archive the same way)."""
    parser.add_argument("--source", metavar="URI", help=source_help)
    parser.add_argument(
        "--labels",
        metavar="CSV",
        help="labels CSV: path,label[,organ][,group][,split] (default: sidecar CSVs in the source)",
    )
    parser.add_argument("--label-tag", metavar="KEYWORD", help="label from a DICOM attribute, e.g. BodyPartExamined")
    parser.add_argument("--group-column", metavar="COL", help="CSV column naming the patient/study/slide")
