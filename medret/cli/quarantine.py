"""``medret quarantine list | retry``: the objects an indexing job could not index, and why."""

from __future__ import annotations

import argparse
import json

from medret.cli.options import add_index, add_json, add_out, add_s3, add_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="show quarantined objects with their reasons")
    retry = sub.add_parser("retry", help="run the indexing pipeline again on the quarantined objects")
    for p in (ls, retry):
        add_index(p, required=True)
        add_table(p, default="codes")
        add_s3(p)
        add_json(p, "the objects" if p is ls else "each job's summary")
    retry.add_argument("--checkpoint", help="encoder (default: the one the table was built with)")
    retry.add_argument("--uri", action="append", default=[], help="retry only this object (repeatable)")
    retry.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any IndexJobConfig field")
    add_out(retry, "the summary and metrics")


def run(args: argparse.Namespace) -> int:
    from medret.config import S3Config
    from medret.pipelines.quarantine import quarantined

    if args.action == "list":
        return _list(args, quarantined(args.index, args.table, S3Config(endpoint_url=args.s3_endpoint)))
    return _retry(args)


def _list(args: argparse.Namespace, rows: list[dict[str, object]]) -> int:
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"nothing quarantined in {args.index} table {args.table!r}")
    bad = [r for r in rows if r["reason_class"] == "object"]
    storage = [r for r in rows if r["reason_class"] != "object"]
    if bad:
        print(f"{len(bad)} bad object(s): the object itself could not be read")
    for r in bad:
        print(f"{r['uri']}\n    {r['error']}  (etag {r['etag']}, attempts {r['attempts']}, {r['updated_at']})")
    if storage:
        print(
            f"{len(storage)} object(s) recorded for a storage fault by an older medret (not bad files; "
            "the next indexing run retries them without --force or retry):"
        )
    for r in storage:
        print(f"{r['uri']}\n    {r['error']}  (etag {r['etag']}, attempts {r['attempts']}, {r['updated_at']})")
    return 0


def _retry(args: argparse.Namespace) -> int:
    from medret.cli.index import report
    from medret.config import parse_sets
    from medret.pipelines.quarantine import retry

    jobs = retry(
        args.index,
        args.table,
        s3_endpoint=args.s3_endpoint,
        uris=args.uri,
        checkpoint=args.checkpoint,
        overrides=parse_sets(args.set),
        out=args.out,
        progress=False if args.json else None,
    )
    done = 0
    for summary in jobs:
        report(summary, args.json)
        done += 1
    if not done:
        print(json.dumps({"retried": 0}) if args.json else "nothing to retry")
    return 0
