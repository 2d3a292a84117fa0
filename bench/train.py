"""Training throughput through Ray Train: samples/s per worker and in total, with 1 and 2 workers.

    .venv/bin/python bench/train.py [--method default] [--steps 40] [--use-gpu]

Each configuration trains ``--steps`` steps of one epoch on medmnist-4 (48 bits) on a local Ray
sized to the machine; the first epoch includes warm-up, so steps are kept large enough to dominate.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import ray

from medret.train.config import TrainConfig
from medret.train.trainer import fit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="default")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--use-gpu", action="store_true")
    args = ap.parse_args()
    ray.init(address="local", num_cpus=os.cpu_count())
    print("| method | workers | resources per worker | samples/s per worker | samples/s total | hardware |")
    print("|---|---|---|---|---|---|")
    for n in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(
                method=args.method,
                bits=48,
                epochs=1,
                max_steps=args.steps,
                num_workers=n,
                use_gpu=args.use_gpu,
                cpus_per_worker=None if args.use_gpu else round(0.9 * (os.cpu_count() or 1) / n, 2),
                val_queries=0,
                name=f"bench-{n}",
                storage_path=tmp,
            )
            r = fit(cfg)
            per = r.history[-1]["samples_per_s_worker"]
            res = f"{cfg.cpus_per_worker} CPU" if not args.use_gpu else "1 GPU"
            print(f"| {args.method} | {n} | {res} | {per:.0f} | {per * n:.0f} | {r.hardware} |", flush=True)


if __name__ == "__main__":
    main()
