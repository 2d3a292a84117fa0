"""``medret train``: train a hashing encoder with Ray Train on medmnist-4, your .npz files, or your archive."""

from __future__ import annotations

import argparse
import json

from medret.cli.options import add_archive, add_json, add_s3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with TrainConfig fields")
    parser.add_argument(
        "--method",
        help="training method: clshash, default, dml, dnhn, momentum, selfsup; on a frozen pretrained backbone "
        "(with a preset): frozen-itq, frozen-selfsup (default: default, or the preset's)",
    )
    parser.add_argument("--bits", type=int, help="code length: a multiple of 8 from 16 to 256 (default: 48)")
    parser.add_argument(
        "--data", nargs="+", metavar="NAME_OR_NPZ", help="'medmnist-4' (default) or MedMNIST-layout .npz files"
    )
    add_archive(
        parser, source_help="train on an archive: s3://bucket/prefix or a folder, read like 'medret index' reads it"
    )
    parser.add_argument("--preset", help="start from a modality preset: xray, histology, mri, medmnist")
    parser.add_argument("--epochs", type=int, help="epochs (default: sized to the data, see docs/results.md)")
    parser.add_argument("--batch-size", type=int, help="global batch size (default: sized to the data)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the method's, scaled to the batch)")
    parser.add_argument(
        "--refit",
        action="store_true",
        default=None,
        help="after choosing the epoch count on val, train again on train + val and export that (.npz data)",
    )
    parser.add_argument("--num-workers", type=int, help="Ray Train workers (default: 2)")
    parser.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker, mixed precision")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs each worker requests (default: a fair share)")
    parser.add_argument("--name", help="run name; rerun with the same name and storage to resume")
    parser.add_argument("--storage", help="checkpoint storage: local folder or s3://bucket/prefix")
    parser.add_argument("--output", help="local folder for encoder.npz, history and the resolved config")
    add_s3(parser)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig field, e.g. hyper.quant=0.2"
    )
    add_json(parser, "the result")


def run(args: argparse.Namespace) -> int:
    from medret.config import load_config, parse_sets
    from medret.train.config import TrainConfig
    from medret.train.trainer import fit

    overrides = {
        "method": args.method,
        "bits": args.bits,
        "data": args.data,
        "source": args.source,
        "labels": args.labels,
        "label_tag": args.label_tag,
        "group_column": args.group_column,
        "preset": args.preset,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "refit": args.refit,
        "num_workers": args.num_workers,
        "use_gpu": args.use_gpu,
        "cpus_per_worker": args.cpus_per_worker,
        "name": args.name,
        "storage_path": args.storage,
        "output": args.output,
        "s3.endpoint_url": args.s3_endpoint,
        **parse_sets(args.set),
    }
    cfg = load_config(TrainConfig, args.config, overrides=overrides)
    report = fit(cfg)
    if args.json:
        print(json.dumps({**report.summary(), "history": report.history}, indent=1))
        return 0
    data = cfg.source or ", ".join(cfg.data)
    print(f"trained {cfg.method} at {cfg.bits} bits on {data} in {report.seconds:.0f} s ({report.hardware})")
    if report.auto:
        print(f"  sized for its data: {report.auto}")
    if report.refit:
        chosen = report.refit["chosen_on_val"]
        print(
            f"  refit: epoch {chosen['best_epoch']} was best on val (mAP@100 {chosen['val_map100']:.4f}); "
            f"then trained {report.refit['epochs']} epochs on train + val in {report.refit['seconds']:.0f} s"
        )
    for h in report.history:
        mark = " *" if int(h["epoch"]) == report.best_epoch else ""
        print(
            f"  epoch {int(h['epoch']):3d}  loss {h['loss']:.4f}  val mAP@100 {h.get('val_map100', float('nan')):.4f}"
            f"  {h['samples_per_s_worker']:.0f} samples/s/worker{mark}"
        )
    print(f"encoder (best epoch, *): {report.encoder_path}")
    return 0
