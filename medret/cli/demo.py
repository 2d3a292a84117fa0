"""``medret demo``: S3, training, the backfill job, the query service and its page, on one machine."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

from medret.cli.options import add_index, add_json, add_out, add_s3, add_table

METRICS = ("mAP@10", "mAP@100", "mAP@1000", "P@10", "nDCG@10", "nDCG@100", "mAP@100 (organ)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with DemoConfig fields (medret.demo.py)")
    parser.add_argument(
        "--data",
        help="data folder (medmnist/*.npz; dicom/, cxr/, wsi/, mri/ used when present); "
        "default: $MEDRET_DATA, ../shared/data, else the public samples are downloaded",
    )
    add_index(parser, shown="s3://BUCKET/index")
    add_s3(parser, note="the demo uses this server instead of starting SeaweedFS")
    parser.add_argument("--bucket", help="bucket for the archive, checkpoints and index (default: medret-demo)")
    add_table(parser, shown="demo")
    parser.add_argument(
        "--no-train", dest="train", action="store_false", default=None, help="index with the shipped encoder"
    )
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default: 1)")
    parser.add_argument("--train-samples", type=int, help="training samples per epoch (default: 6144)")
    parser.add_argument(
        "--export-samples",
        type=int,
        help="training images the fine-tuned encoder's similarity bits are fitted on (default: 10000)",
    )
    parser.add_argument(
        "--gallery-per-organ", type=int, help="archive only N gallery images per organ, every class kept (a quick look)"
    )
    parser.add_argument("--use-gpu", action="store_true", default=None, help="train on a GPU")
    parser.add_argument("--host", help="query service host (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="query service port (default: 8000)")
    add_out(parser, "everything the demo writes", shown="medret-out/demo")
    parser.add_argument(
        "--no-wait", dest="wait", action="store_false", default=None, help="stop everything after the report"
    )
    add_json(parser, "the summary", note="progress goes to stderr")


def format_table(metrics: dict[str, Any]) -> str:
    rows = [("micro (all queries)", metrics["micro"])]
    rows += [(f"  {organ}", m) for organ, m in metrics["per_organ"].items()]
    rows.append(("macro (organ mean)", metrics["macro"]))
    cols = [c for c in METRICS if c in metrics["micro"]]
    head = f"{'':22}" + "".join(f"{c:>17}" for c in cols)
    lines = [head] + [f"{name:22}" + "".join(f"{m[c]:17.4f}" for c in cols) for name, m in rows]
    return "\n".join(lines)


def report(summary: dict[str, Any]) -> str:
    lines = []
    for s in summary["samples"]:
        order = "re-ranked by feature similarity" if s.get("reranked") else "Hamming order"
        lines.append(f"\nquery {s['upload']} ({s['truth']}), {s['timings_ms']['total']:.0f} ms, {order}:")
        for h in s["results"]:
            meta = h.get("metadata") or {}
            label = f"{meta.get('dataset') or meta.get('modality') or ''} {meta.get('label') or ''}".strip()
            # a re-ranked page is ordered by feature similarity within the Hamming shortlist: show both
            sim = f"  similarity {h['similarity']:.3f}" if h.get("similarity") is not None else ""
            lines.append(f"  {h['rank'] + 1:2d}. distance {h['distance']:3d}{sim}  {label:<24} {h['source_uri']}")
    m = summary["metrics"]
    lines.append(
        f"\nRetrieval on the medmnist-4 query split ({m['queries']} queries against the {summary['index']['table']} "
        "table's codes; strict = same organ and class):"
    )
    lines.append(format_table(m))
    lines.append(f"(index codes equal to direct encoding: {m['index_codes_equal_direct_encoding']})")
    t = summary["timings"]
    stages = ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in t.items() if k != "total_s")
    lines.append(f"\nDone in {t['total_s']:.0f}s ({stages}).")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from medret.config import load_config
    from medret.demo import Demo, DemoConfig
    from medret.demo import run as run_demo

    cfg = load_config(
        DemoConfig,
        args.config,
        overrides={
            "data": args.data,
            "index": args.index,
            "s3.endpoint_url": args.s3_endpoint,
            "bucket": args.bucket,
            "table": args.table,
            "train": args.train,
            "epochs": args.epochs,
            "train_samples": args.train_samples,
            "export_samples": args.export_samples,
            "use_gpu": args.use_gpu,
            "gallery_per_organ": args.gallery_per_organ,
            "host": args.host,
            "port": args.port,
            "out": args.out,
            "wait": args.wait,
        },
    )
    # Ctrl-C and SIGTERM stop every piece, even when started in the background (SIGINT inherited ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    out = sys.stdout
    if args.json:
        sys.stdout = sys.stderr  # progress goes to stderr; stdout carries the JSON summary alone
    demo = Demo(cfg, stream=sys.stderr if args.json else sys.stdout)
    rc = 130
    try:
        summary = run_demo(cfg, demo)
        print(json.dumps(summary, indent=1) if args.json else report(summary), file=out, flush=True)
        rc = 0
        if cfg.wait:
            demo.say(f"web page: {summary['url']}  (API docs {summary['url']}docs, metrics {summary['url']}metrics)")
            demo.say("everything keeps running; Ctrl-C stops it")
            while True:  # signal.pause() also returns for signals other libraries handle (Ray's)
                time.sleep(3600)
    except KeyboardInterrupt:
        demo.say("interrupted: shutting down")
    finally:
        demo.close()
        sys.stdout = out
    demo.say("stopped cleanly")
    return rc


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
