"""The driver side: size the workers, wire Ray Train's ``TorchTrainer``, export the best encoder.

Resuming is Ray Train's: run again with the same ``name`` and ``storage_path`` and every
worker starts from the latest reported checkpoint (``ray.train.get_checkpoint()``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medret.config import save_resolved
from medret.errors import ConfigError
from medret.runtime import ensure_ray
from medret.storage.s3 import arrow_filesystem
from medret.storage.uri import parse_uri
from medret.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    encoder_path: Path
    output: Path
    best_epoch: int
    history: list[dict[str, Any]]
    seconds: float
    hardware: str

    def summary(self) -> dict[str, Any]:
        best = self.history[self.best_epoch] if self.history else {}
        return {
            "encoder": str(self.encoder_path),
            "best_epoch": self.best_epoch,
            "val_map100": best.get("val_map100"),
            "epochs": len(self.history),
            "train_seconds": round(self.seconds, 1),
            "hardware": self.hardware,
            "samples_per_s": self.history[-1].get("samples_per_s_worker") if self.history else None,
        }


def worker_resources(cfg: TrainConfig, cluster: dict[str, float]) -> tuple[dict[str, float], int]:
    """``(resources per worker, torch threads per worker)``, refusing requests the cluster cannot meet.

    On CPU the default is an even share of the cluster's CPUs, at most 1 each, never the whole
    machine per worker: an actor that takes a whole core on a 2-core machine starves Ray's own
    tasks, and a request larger than the cluster waits forever without an error.

    >>> worker_resources(TrainConfig(num_workers=2), {"CPU": 2.0})
    ({'CPU': 0.9}, 1)
    >>> worker_resources(TrainConfig(num_workers=3, cpus_per_worker=1), {"CPU": 2.0})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    medret.errors.ConfigError: num_workers=3 x cpus_per_worker=1.0 needs 3 CPUs but the cluster has 2; lower ...
    """
    cpus = float(cluster.get("CPU", 0))
    gpus = float(cluster.get("GPU", 0))
    if cfg.use_gpu and gpus < cfg.num_workers:
        raise ConfigError(
            f"use_gpu with num_workers={cfg.num_workers} needs {cfg.num_workers} GPUs; the cluster has {gpus:g}"
        )
    if cfg.cpus_per_worker is not None:
        per = float(cfg.cpus_per_worker)
    elif cfg.use_gpu:
        per = max(1.0, math.floor(cpus / cfg.num_workers) - 1)
    else:
        per = round(min(1.0, 0.9 * cpus / cfg.num_workers), 2)
    if per * cfg.num_workers > cpus + 1e-9 or per <= 0:
        raise ConfigError(
            f"num_workers={cfg.num_workers} x cpus_per_worker={per} needs {per * cfg.num_workers:g} CPUs "
            f"but the cluster has {cpus:g}; lower num_workers or cpus_per_worker"
        )
    resources = {"CPU": per}
    if cfg.use_gpu:
        resources["GPU"] = 1.0
    return resources, max(1, round(per))


def hardware(cfg: TrainConfig) -> str:
    if cfg.use_gpu:
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "GPU"
        return f"{cfg.num_workers}x {name}"
    return f"{cfg.num_workers} CPU worker(s) on {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def check_init(cfg: TrainConfig) -> None:
    """Refuse, before any worker starts, an ``init`` encoder made by another method, code length or backbone."""
    if not cfg.init:
        return
    from medret.models.encoder import load_encoder
    from medret.models.pretrained import encoder_path

    path = encoder_path(cfg.init)
    have = load_encoder(path).config
    want = {"method": cfg.method, "bits": cfg.bits, "architecture": cfg.resolved("architecture")}
    got = {"method": have.method, "bits": have.bits, "architecture": have.architecture}
    if got != want:
        raise ConfigError(f"init {cfg.init!r} ({path}) is {got}, but this run trains {want}")


def fit(cfg: TrainConfig) -> TrainReport:
    """Train ``cfg`` through Ray Train and export the best epoch's encoder to ``output/encoder.npz``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from medret.train.loop import ENCODER, META, train_loop

    check_init(cfg)
    ensure_ray()
    resources, threads = worker_resources(cfg, ray.cluster_resources())
    fs, storage = arrow_filesystem(cfg.storage_path, cfg.s3)
    if not parse_uri(cfg.storage_path).is_s3:
        Path(storage).mkdir(parents=True, exist_ok=True)
    output = Path(cfg.output or (storage if not parse_uri(cfg.storage_path).is_s3 else "medret-out/train")) / (
        "" if cfg.output else cfg.run_name()
    )
    output.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, output)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "threads": threads},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run_name(),
            storage_path=storage,
            storage_filesystem=fs if parse_uri(cfg.storage_path).is_s3 else None,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if result.error:
        raise result.error
    best = max(result.best_checkpoints or [], key=lambda cm: (cm[1].get("val_map100", -1.0), cm[1]["epoch"]))
    with best[0].as_directory() as d:
        shutil.copy(Path(d) / ENCODER, output / ENCODER)
    latest = max(result.best_checkpoints or [], key=lambda cm: cm[1]["epoch"])
    with latest[0].as_directory() as d:
        all_history = json.loads((Path(d) / META).read_text())["history"]
    report = TrainReport(output / ENCODER, output, int(best[1]["epoch"]), all_history, seconds, hardware(cfg))
    (output / "history.json").write_text(json.dumps(all_history, indent=1))
    (output / "train.json").write_text(json.dumps(report.summary(), indent=1))
    return report
