"""``medret evaluate``: strict and organ mAP@k, P@k, nDCG@k (micro and per-organ macro) for encoders."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medret.cli.options import add_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "encoders",
        nargs="*",
        default=["default"],
        metavar="ENCODER",
        help="'default' (shipped), an encoder.npz, a training output folder, or pca-itq:BITS (default: default)",
    )
    parser.add_argument(
        "--data", nargs="+", default=["medmnist-4"], metavar="NAME_OR_NPZ", help="'medmnist-4' or MedMNIST .npz files"
    )
    parser.add_argument(
        "--rerank",
        action="store_true",
        help="also rank by Hamming prefilter + feature re-ranking (always done for clshash encoders)",
    )
    parser.add_argument("--plots", metavar="DIR", help="write PR curves, mAP@k curves and query montages here")
    parser.add_argument("--markdown", metavar="FILE", help="also write the summary tables as Markdown")
    add_json(parser, "the metrics")


def run(args: argparse.Namespace) -> int:
    from medret.eval.compare import compare_encoders, without_codes
    from medret.eval.plots import write_plots
    from medret.eval.report import markdown, text
    from medret.train.data import load_split

    split = load_split(args.data)
    results = compare_encoders(args.encoders, split, rerank=args.rerank)
    if args.plots:
        write_plots(Path(args.plots), split, results)
    public = without_codes(results)
    if args.markdown:
        Path(args.markdown).write_text(markdown(public))
    if args.json:
        print(json.dumps({"data": args.data, "queries": len(split["query"]), "results": public}, indent=1))
        return 0
    print(text(public), end="")
    return 0
