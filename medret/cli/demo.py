"""``medret demo``: the main job on embedded defaults (local LanceDB, data from ../shared/data)."""

from __future__ import annotations

import argparse
import json
from typing import Any

METRICS = ("mAP@10", "mAP@100", "mAP@1000", "P@10", "nDCG@10", "nDCG@100", "mAP@100 (organ)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (fields of MedmnistIndexConfig)")
    parser.add_argument("--data", help="data folder holding medmnist/*.npz (default: $MEDRET_DATA or ../shared/data)")
    parser.add_argument(
        "--file", dest="files", action="append", help="a MedMNIST-layout .npz to use instead (repeatable)"
    )
    parser.add_argument("--index", help="index URI: local folder or s3://bucket/prefix (default: medret-out/index)")
    parser.add_argument("--table", help="table name (default: medmnist4)")
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint URL for s3:// URIs")
    parser.add_argument(
        "--encoder", help="'default' (shipped deep hashing encoder), an encoder.npz, or 'pca-itq' (fitted here)"
    )
    parser.add_argument("--bits", type=int, help="code length for --encoder pca-itq (default: 48)")
    parser.add_argument("--k", type=int, help="results per sample query (default: 10)")
    parser.add_argument(
        "--out", help="output folder for the encoder, resolved config and summary (default: medret-out)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")


def format_table(metrics: dict[str, Any]) -> str:
    rows = [("micro (all queries)", metrics["micro"])]
    rows += [(f"  {organ}", m) for organ, m in metrics["per_organ"].items()]
    rows.append(("macro (organ mean)", metrics["macro"]))
    cols = [c for c in METRICS if c in metrics["micro"]]
    head = f"{'':22}" + "".join(f"{c:>17}" for c in cols)
    lines = [head] + [f"{name:22}" + "".join(f"{m[c]:17.4f}" for c in cols) for name, m in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from medret.config import load_config
    from medret.pipelines.medmnist_index import MedmnistIndexConfig
    from medret.pipelines.medmnist_index import run as run_job

    cfg = load_config(
        MedmnistIndexConfig,
        args.config,
        overrides={
            "data": args.data,
            "files": args.files,
            "index.uri": args.index,
            "index.table": args.table,
            "s3.endpoint_url": args.s3_endpoint,
            "encoder": args.encoder,
            "bits": args.bits,
            "k": args.k,
            "out": args.out,
        },
    )
    summary = run_job(cfg, progress=not args.json)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"\nIndex {summary['index']['uri']} table {summary['index']['table']}: "
        f"{summary['index']['rows']} rows, version {summary['index']['version']}, encoder {summary['encoder_id']}"
    )
    for s in summary["samples"]:
        print(f"\nquery {s['query']} ({s['query_label']}):")
        for rank, h in enumerate(s["hits"], 1):
            mark = "+" if h["label"] == s["query_label"] else " "
            print(f"  {rank:2d}. {mark} {h['item_id']:<22} distance {h['distance']:3d}  {h['label']}")
    m = summary["metrics"]
    print(f"\nRetrieval on the medmnist-4 query split ({m['queries']} queries, strict = same organ and class):")
    print(format_table(m))
    t = summary["timings"]
    stages = f"fit {t['fit_s']:.1f}s, index {t['index_s']:.1f}s, search {t['search_s']:.1f}s"
    print(f"\nDone in {t['total_s']:.1f}s ({stages}).")
    return 0
