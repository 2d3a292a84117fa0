"""Parity of the two training paths: an archive of PNGs on S3 streamed by Ray Data vs arrays in memory.

    .venv/bin/python bench/train_parity.py [--epochs 4] [--workers 2] [--json out.json]

The medmnist-4 gallery (13,246 grey 28-px images, the demo's archive) is written twice: as
per-organ MedMNIST-layout ``.npz`` files (the in-memory path, ``--data``) and as PNGs with a
``labels.csv`` on a local SeaweedFS S3 server (``--source``). The CSV carries the ``.npz`` path's
own split in a ``split`` column, so both runs train on the same items, with the same method,
epochs, batch and natural organ mix, and are scored on the same gallery and query parts.
Reported: micro and macro mAP@100 of each, and training samples/s per worker (mean over the
epochs after the first) with their ratio, archive/in-memory, measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import ray

from medret.eval.benchmarks import medmnist4, split_from_files
from medret.eval.compare import compare_encoders
from medret.serve.thumbnails import png_bytes
from medret.storage.objects import open_store
from medret.storage.s3local import SeaweedS3
from medret.train.config import TrainConfig
from medret.train.trainer import fit


def write_npz(folder: Path) -> list[str]:
    """The medmnist-4 gallery as one MedMNIST-layout file per organ (all images in ``train_*``)."""
    split = medmnist4()
    gallery = split["gallery"]
    paths = []
    for oi, organ in enumerate(split.organs):
        keep = gallery.organ == oi
        empty_i, empty_l = np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64)
        path = folder / f"{organ}.npz"
        np.savez(
            path,
            train_images=gallery.images[keep],
            train_labels=gallery.label[keep],
            val_images=empty_i,
            val_labels=empty_l,
            test_images=empty_i,
            test_labels=empty_l,
        )
        paths.append(str(path))
    return paths


def write_archive(store: Any, split: Any) -> int:
    """Every item of every part as ``organ/part/i.png``, with ``labels.csv`` (path, label, organ, split)."""
    files, rows = [], []
    for part in ("train", "val", "gallery", "query"):
        p = split[part]
        for i in range(len(p)):
            organ = split.organs[p.organ[i]]
            key = f"{organ}/{part}/{i:05d}.png"
            files.append((key, png_bytes(p.images[i])))
            rows.append({"path": key, "label": str(p.label[i]), "organ": organ, "split": part})
    text = io.StringIO()
    writer = csv.DictWriter(text, ["path", "label", "organ", "split"])
    writer.writeheader()
    writer.writerows(rows)
    files.append(("labels.csv", text.getvalue().encode()))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda f: store.write_bytes(*f), files))
    return len(rows)


def throughput(history: list[dict[str, Any]]) -> float:
    later = [h["samples_per_s_worker"] for h in history[1:]] or [history[0]["samples_per_s_worker"]]
    return float(np.mean(later))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bits", type=int, default=48)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="medret-parity-"))
    files = write_npz(tmp)
    split = split_from_files(files)
    common = {
        "method": "default",
        "bits": args.bits,
        "epochs": args.epochs,
        "num_workers": args.workers,
        "organ_balance": 0.0,  # the archive path keeps the natural mix; so does this one
        "channels": 1,  # the archive's PNGs are grey; the .npz path would keep RetinaMNIST's colour
        "storage_path": str(tmp / "runs"),
    }
    results: dict[str, Any] = {"command": " ".join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d")}
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, CPU"
    with SeaweedS3(tmp / "s3") as server:
        s3 = server.config()
        store = open_store("s3://parity/gallery", s3)
        store.ensure_bucket()  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        n = write_archive(store, split)
        results["upload_s"] = round(time.perf_counter() - t0, 1)
        runs = {
            "in-memory (.npz)": TrainConfig(**common, data=files, name="npz"),  # type: ignore[arg-type]
            "archive (S3 PNGs)": TrainConfig(
                **common,  # type: ignore[arg-type]
                source="s3://parity/gallery",
                s3=s3,
                name="s3",
            ),
        }
        rows = []
        for label, cfg in runs.items():
            t0 = time.perf_counter()
            report = fit(cfg)
            wall = time.perf_counter() - t0
            scored = compare_encoders([str(report.encoder_path)], split)[0]
            rows.append(
                {
                    "path": label,
                    "items": n,
                    "train_items": len(split["train"]),
                    "micro_map100": scored["hamming"]["micro"]["mAP@100"],
                    "macro_map100": scored["hamming"]["macro"]["mAP@100"],
                    "samples_per_s_worker": round(throughput(report.history), 1),
                    "wall_s": round(wall, 1),
                }
            )
            print(rows[-1], flush=True)
    results["rows"] = rows
    results["ratio_samples_per_s"] = round(rows[1]["samples_per_s_worker"] / rows[0]["samples_per_s_worker"], 3)
    results["map100_difference"] = round(rows[1]["micro_map100"] - rows[0]["micro_map100"], 4)
    print("| path | train items | micro mAP@100 | macro mAP@100 | samples/s/worker | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['path']} | {r['train_items']} | {r['micro_map100']:.4f} | {r['macro_map100']:.4f} "
            f"| {r['samples_per_s_worker']:.0f} | {r['wall_s']:.0f} |"
        )
    print(f"samples/s ratio archive/in-memory: {results['ratio_samples_per_s']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
