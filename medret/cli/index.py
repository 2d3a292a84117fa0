"""``medret index``: index everything under a source (or what changed since last time) into a code table."""

from __future__ import annotations

import argparse
import json

from medret.cli.options import add_index, add_json, add_out, add_s3, add_table
from medret.config import parse_sets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with IndexJobConfig fields")
    parser.add_argument("--source", help="s3://bucket/prefix or a local folder to index")
    add_index(parser)
    add_table(parser)
    parser.add_argument("--checkpoint", help="encoder: 'default' (shipped), an encoder.npz or a training folder")
    parser.add_argument(
        "--encoder",
        action="append",
        default=[],
        metavar="[KIND=]ENCODER",
        help="ENCODER alone: one encoder for everything (as --checkpoint); KIND=ENCODER (repeatable): objects of "
        "KIND go to that encoder, which writes a table of its own (<table>-<preset or name>-<bits>b, or "
        "--set tables.KIND=NAME), e.g. --encoder wsi=histology.npz --encoder dicom=xray.npz; "
        "default=ENCODER for every other kind",
    )
    parser.add_argument(
        "--incremental", action="store_true", default=None, help="also remove items of objects deleted from the source"
    )
    parser.add_argument(
        "--force", action="store_true", default=None, help="re-index objects already indexed at the same etag"
    )
    parser.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="PATTERN=KIND",
        help="read keys matching the glob PATTERN as KIND (checked before the built-in routes), e.g. "
        "'mri/*.dcm=dicom-series' to read each folder's slice files as one series (`medret kinds` lists the kinds)",
    )
    parser.add_argument("--on-error", choices=["quarantine", "skip", "fail"], help="what bad objects do to the job")
    add_s3(parser)
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port while running")
    add_out(parser, "the summary, metrics.prom and the resolved config")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any IndexJobConfig field, e.g. tiling.mpp=1.0"
    )
    add_json(parser, "only the summary", note="progress stays on stderr")


def config_from(args: argparse.Namespace, **extra: object) -> object:
    from medret.config import load_config
    from medret.pipelines.config import IndexJobConfig

    plain, routed = _encoders(args.encoder)
    if plain and args.checkpoint:
        from medret.errors import ConfigError

        raise ConfigError(f"--checkpoint {args.checkpoint} and --encoder {plain} both name the one encoder; give one")
    overrides: dict[str, object] = {
        "source": args.source,
        "index.uri": args.index,
        "index.table": args.table,
        "encoder": plain or args.checkpoint,
        "incremental": args.incremental,
        "force": args.force,
        "on_error": args.on_error,
        "s3.endpoint_url": args.s3_endpoint,
        "metrics_port": args.metrics_port,
        "out": args.out,
        "progress": None,  # progress goes to stderr, with --json too: stdout carries only the summary
        **parse_sets(args.set),
        **extra,
    }
    if args.route:
        overrides["routes"] = [_route(r) for r in args.route]
    for kind, spec in routed.items():
        overrides[f"encoders.{kind}"] = spec
    return load_config(IndexJobConfig, args.config, overrides=overrides)


def _encoders(given: list[str]) -> tuple[str | None, dict[str, str]]:
    """``--encoder`` values: the one plain ENCODER (or None) and KIND -> ENCODER.

    >>> _encoders(["default", "wsi=histology.npz", "*=x.npz"])
    ('default', {'wsi': 'histology.npz', '*': 'x.npz'})
    """
    from pathlib import Path

    from medret import kinds
    from medret.errors import ConfigError
    from medret.pipelines.config import DEFAULT_ROUTE

    keys = [*(k.name for k in kinds.indexed()), *DEFAULT_ROUTE]
    plain: list[str] = []
    routed: dict[str, str] = {}
    for text in given:
        kind, sep, spec = text.partition("=")
        if sep and kind in keys and spec:
            routed[kind] = spec
        elif sep and not Path(text).exists():
            raise ConfigError(
                f"--encoder {text!r}: {kind!r} is not a kind; give KIND=ENCODER with a kind of {', '.join(keys)}, "
                "or one ENCODER for everything"
            )
        else:
            plain.append(text)
    if len(plain) > 1:
        said = ", ".join(plain)
        raise ConfigError(f"--encoder: one encoder for everything, got {said}; route kinds with KIND=ENCODER")
    return (plain[0] if plain else None), routed


def _route(text: str) -> dict[str, str]:
    from medret.errors import ConfigError

    pattern, sep, kind = text.rpartition("=")
    if not sep or not pattern:
        raise ConfigError(f"--route {text!r}: expected PATTERN=KIND, e.g. 'mri/*.dcm=dicom-series'")
    return {"pattern": pattern, "kind": kind}


def run(args: argparse.Namespace) -> int:
    from medret.pipelines.backfill import run_index

    summary = run_index(config_from(args))  # type: ignore[arg-type]
    return report(summary, args.json)


def report(summary: object, as_json: bool) -> int:
    d = summary.to_dict()  # type: ignore[attr-defined]
    if as_json:
        print(json.dumps(d, indent=1))
        return 0
    if "tables" in d:  # a routed run: a line per table, then the whole
        for t in d["tables"]:
            print(
                f"table {t['index']['table']!r} ({', '.join(t['kinds']) or 'undecided objects'}; {t['encoder_id']}): "
                f"{t['objects_seen']} objects, {t['indexed']} indexed, {t['quarantined']} quarantined, "
                f"{t['deleted']} deleted, {t['moved']} moved out, {t['unchanged']} unchanged; "
                f"{t['items_written']:,} items written; table now {t['index'].get('rows', 0):,} rows"
            )
        d["index"] |= {"table": ", ".join(d["index"].get("tables", [])), "rows": d["index"].get("rows", 0)}
    print(
        f"{d['source']} -> {d['index']['uri']} table {d['index']['table']!r}: {d['objects_seen']} objects seen, "
        f"{d['indexed']} indexed, {d['quarantined']} quarantined, {d['deleted']} deleted, "
        f"{d['unchanged']} unchanged; {d['items_written']:,} items written in {d['seconds']:.1f} s "
        f"({d['items_per_s']:.1f} items/s); table now {d['index']['rows']:,} rows"
    )
    stages = ", ".join(f"{k} {v:.1f}" for k, v in d["stage_seconds"].items())
    print(f"  seconds per stage (summed over workers): {stages}")
    for q in d["quarantine"][:20]:
        print(f"  quarantined: {q['error']}")
    if len(d["quarantine"]) > 20:
        print(f"  ... and {len(d['quarantine']) - 20} more: medret quarantine list --index {d['index']['uri']}")
    return 0
