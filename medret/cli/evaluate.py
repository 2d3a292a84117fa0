"""``medret evaluate``: strict and organ mAP@k, P@k, nDCG@k (micro and per-organ macro) for encoders."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from medret.cli.options import add_archive, add_json, add_s3


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
    add_archive(
        parser,
        source_help="score on a labelled archive instead (s3://bucket/prefix or a folder), split as 'medret train' "
        "splits it",
    )
    parser.add_argument("--cache", metavar="URI", help="prepared-input cache (default: medret-out/train/cache)")
    add_s3(parser)
    parser.add_argument(
        "--rerank",
        action="store_true",
        help="also rank by Hamming prefilter + feature re-ranking (always done for clshash encoders)",
    )
    parser.add_argument(
        "--gallery-order",
        choices=("shuffled", "class"),
        default="shuffled",
        help="the benchmark's fixed label-independent gallery order (default), or the old class order, which "
        "breaks Hamming ties in favour of low class ids (for comparison only)",
    )
    parser.add_argument(
        "--order-spread",
        type=int,
        default=0,
        metavar="N",
        help="also re-score the Hamming ranking with the gallery in N other fixed orders and report the spread",
    )
    parser.add_argument("--plots", metavar="DIR", help="write PR curves, mAP@k curves and query montages here")
    parser.add_argument("--markdown", metavar="FILE", help="also write the summary tables as Markdown")
    add_json(parser, "the metrics")


def run(args: argparse.Namespace) -> int:
    from medret.eval.compare import compare_encoders, without_codes
    from medret.eval.plots import write_plots
    from medret.eval.report import markdown, text
    from medret.eval.retrieval import tie_order_spread
    from medret.train.data import load_split

    if args.source:
        split, results = _on_archive(args)
    else:
        split = load_split(args.data, args.gallery_order, _channels(args.encoders))
        results = compare_encoders(args.encoders, split, rerank=args.rerank)
    if args.order_spread > 0:
        for r in results:
            r["order_spread"] = tie_order_spread(r, split, args.order_spread)
    if args.plots:
        write_plots(Path(args.plots), split, results)
    public = without_codes(results)
    if args.markdown:
        Path(args.markdown).write_text(markdown(public))
    if args.json:
        data = args.source or args.data
        head = {"data": data, "gallery_order": "archive" if args.source else args.gallery_order}
        print(json.dumps({**head, "queries": len(split["query"]), "results": public}, indent=1))
        return 0
    print(text(public), end="")
    return 0


def _channels(specs: list[str]) -> int:
    """3 (RGB) when any encoder takes colour, so that it sees the images in colour; grey encoders get
    the same luma from it as from a grey split."""
    from medret.models.encoder import checkpoint_config
    from medret.models.pretrained import encoder_path

    colour = [s for s in specs if not s.startswith("pca-itq") and checkpoint_config(encoder_path(s)).channels == 3]
    return 3 if colour else 1


def _on_archive(args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]]]:
    """Each encoder scored on the archive's gallery and query parts, prepared with its own recipe and geometry."""
    from medret.config import S3Config
    from medret.eval.compare import compare_encoders
    from medret.models.encoder import checkpoint_config
    from medret.models.pretrained import encoder_path
    from medret.train.archive import archive_split, prepare
    from medret.train.config import TrainConfig

    fields = {
        "source": args.source,
        "labels": args.labels,
        "label_tag": args.label_tag,
        "group_column": args.group_column,
        "cache": args.cache,
        "s3": S3Config(endpoint_url=args.s3_endpoint) if args.s3_endpoint else None,
    }
    cfg = TrainConfig(**{k: v for k, v in fields.items() if v is not None})
    results: list[dict[str, Any]] = []
    split = None
    for spec in args.encoders:
        if spec.startswith("pca-itq"):
            geometry = cfg.geometry()
        else:
            enc = checkpoint_config(encoder_path(spec))
            geometry = (enc.input_size, enc.channels, enc.preprocess)
        archive = prepare(cfg, geometry)
        split = archive_split(archive, cfg, ("train", "gallery", "query"))
        results += compare_encoders([spec], split, rerank=args.rerank)
    return split, results
