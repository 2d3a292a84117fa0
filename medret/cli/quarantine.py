"""``medret quarantine list | retry``: the objects an indexing job could not index, and why."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="show quarantined objects with their reasons")
    retry = sub.add_parser("retry", help="run the indexing pipeline again on the quarantined objects")
    for p in (ls, retry):
        p.add_argument("--index", required=True, help="index location: local folder or s3://bucket/prefix")
        p.add_argument("--table", default="codes", help="code table name (default: codes)")
        p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL")
        p.add_argument("--json", action="store_true", help="print JSON")
    retry.add_argument("--checkpoint", help="encoder (default: the one the table was built with)")
    retry.add_argument("--uri", action="append", default=[], help="retry only this object (repeatable)")
    retry.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any IndexJobConfig field")
    retry.add_argument("--out", help="local folder for the summary and metrics")


def run(args: argparse.Namespace) -> int:
    from medret.config import S3Config
    from medret.index.manifest import Manifest, reason_class

    s3 = S3Config(endpoint_url=args.s3_endpoint)
    manifest = Manifest(args.index, args.table, s3, create=False)
    rows = manifest.as_rows("status = 'quarantined'")
    for r in rows:
        r["reason_class"] = reason_class(str(r["error"]))
    if args.action == "list":
        return _list(args, rows)
    return _retry(args, rows, s3)


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


def _retry(args: argparse.Namespace, rows: list[dict[str, object]], s3: object) -> int:
    from medret.cli.index import report
    from medret.config import load_config, parse_sets
    from medret.errors import ConfigError
    from medret.index.store import CodeIndex
    from medret.pipelines.backfill import run_index
    from medret.pipelines.config import IndexJobConfig

    wanted = set(args.uri) or {str(r["uri"]) for r in rows}
    unknown = wanted - {str(r["uri"]) for r in rows}
    if unknown:
        raise ConfigError(f"not quarantined in {args.index} table {args.table!r}: {sorted(unknown)[:5]}")
    by_source: dict[str, list[str]] = {}
    for r in rows:
        if r["uri"] in wanted:
            by_source.setdefault(str(r["source"]), []).append(str(r["uri"]))
    if not by_source:
        print(json.dumps({"retried": 0}) if args.json else "nothing to retry")
        return 0
    checkpoint = args.checkpoint or CodeIndex.open(args.index, table=args.table, s3=s3).checkpoint  # type: ignore[arg-type]
    for source, uris in sorted(by_source.items()):
        overrides = {
            "source": source,
            "index.uri": args.index,
            "index.table": args.table,
            "encoder": checkpoint,
            "only": uris,
            "s3.endpoint_url": args.s3_endpoint,
            "out": args.out,
            "progress": False if args.json else None,
            **parse_sets(args.set),
        }
        report(run_index(load_config(IndexJobConfig, None, overrides=overrides)), args.json)
    return 0
