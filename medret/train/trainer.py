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
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medret.config import save_resolved
from medret.errors import ConfigError
from medret.runtime import ensure_ray
from medret.storage.s3 import arrow_filesystem
from medret.storage.uri import parse_uri
from medret.train.config import TRAINING_FREE, TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    encoder_path: Path
    output: Path
    best_epoch: int
    history: list[dict[str, Any]]
    seconds: float
    hardware: str
    auto: str = ""
    refit: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        best = self.history[self.best_epoch] if self.history else {}
        # a refit trained on val: its own val score means nothing; the score that chose its length does
        val = self.refit["chosen_on_val"]["val_map100"] if self.refit else best.get("val_map100")
        return {
            "encoder": str(self.encoder_path),
            "best_epoch": self.best_epoch,
            "val_map100": val,
            "epochs": len(self.history),
            "train_seconds": round(self.seconds, 1),
            "hardware": self.hardware,
            "samples_per_s": self.history[-1].get("samples_per_s_worker") if self.history else None,
            **({"auto": self.auto} if self.auto else {}),
            **({"refit": self.refit} if self.refit else {}),
        }


def worker_resources(cfg: TrainConfig, cluster: dict[str, float]) -> tuple[dict[str, float], int]:
    """``(resources per worker, torch threads per worker)``, refusing requests the cluster cannot meet.

    On CPU the default is an even share of the cluster's CPUs, at most 1 each, never the whole
    machine per worker: an actor that takes a whole core on a 2-core machine starves Ray's own
    tasks, and a request larger than the cluster waits forever without an error. An archive run
    leaves ``data_cpus`` to the Ray Data tasks that stream its rows to the workers.

    >>> worker_resources(TrainConfig(num_workers=2), {"CPU": 2.0})
    ({'CPU': 0.9}, 1)
    >>> worker_resources(TrainConfig(num_workers=3, cpus_per_worker=1), {"CPU": 2.0})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    medret.errors.ConfigError: num_workers=3 x cpus_per_worker=1.0 needs 3 CPUs but the cluster has 2; lower ...
    """
    cpus = float(cluster.get("CPU", 0)) - (cfg.data_cpus if cfg.source else 0.0)
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
            f"but the cluster has {cpus:g}"
            + (f" after the {cfg.data_cpus:g} kept for streaming the archive" if cfg.source else "")
            + "; lower num_workers or cpus_per_worker"
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
    """Refuse, before any worker starts, an ``init`` encoder made by another method, code length or backbone
    (``arch.dihedral`` included)."""
    if not cfg.init:
        return
    from medret.models.encoder import load_encoder
    from medret.models.pretrained import encoder_path

    path = encoder_path(cfg.init)
    have = load_encoder(path).config
    want = {
        "method": cfg.method,
        "bits": cfg.bits,
        "architecture": cfg.resolved("architecture"),
        "dihedral": bool((cfg.arch or {}).get("dihedral")),  # the pooled backbone's weights sit elsewhere
    }
    got = {
        "method": have.method,
        "bits": have.bits,
        "architecture": have.architecture,
        "dihedral": bool(have.extra.get("arch", {}).get("dihedral")),
    }
    if got != want:
        raise ConfigError(f"init {cfg.init!r} ({path}) is {got}, but this run trains {want}")


def output_dir(cfg: TrainConfig) -> Path:
    """Where ``encoder.npz``, the history and the resolved config go (local), with the resolved config saved."""
    _, storage = arrow_filesystem(cfg.storage_path, cfg.s3)
    if not parse_uri(cfg.storage_path).is_s3:
        Path(storage).mkdir(parents=True, exist_ok=True)
    output = Path(cfg.output or (storage if not parse_uri(cfg.storage_path).is_s3 else "medret-out/train")) / (
        "" if cfg.output else cfg.run_name()
    )
    output.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, output)
    return output


def stamp_provenance(path: Path, cfg: TrainConfig, metrics: dict[str, Any], auto: dict[str, Any] | None = None) -> None:
    """Record in the encoder's own config where it came from: data, command, metrics and, where the run
    sized itself (:mod:`medret.train.auto`), what it decided and why."""
    from medret.models.encoder import load_encoder

    encoder: Any = load_encoder(path)
    data = {"source": cfg.source, "labels": cfg.labels or cfg.label_tag or "sidecar"} if cfg.source else cfg.data
    record = {"data": data, "command": " ".join(["medret", *sys.argv[1:]]) if sys.argv else "", "metrics": metrics}
    if auto:
        record["auto"] = auto
    record["trained_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    encoder.config = encoder.config.model_copy(update={"extra": {**encoder.config.extra, "provenance": record}})
    encoder.save(path)


def image_batches(cfg: TrainConfig, limit: int, batch: int = 256, *, places: bool = False) -> Iterator[Any]:
    """Training images for a fit without gradients, in batches: the archive's train part, or the split's.
    With ``places``, an archive's batches are ``(images, at)``: each slide tile's place, None for other images."""
    if cfg.source:
        from medret.train.archive import iter_part, iter_part_at, prepare

        archive = prepare(cfg, cfg.geometry())
        rows = iter_part_at if places else iter_part
        yield from rows(archive, "train", cfg, batch_size=batch, limit=limit)
        return
    from medret.train.feeds import MemoryFeed

    images = MemoryFeed(cfg).train_sample(limit, cfg.seed, balanced=False)
    for i in range(0, len(images), batch):
        yield images[i : i + batch]


def slide_views(cfg: TrainConfig, open_slide: Any) -> Any:
    """:class:`~medret.train.augment.SlideViews` for this run: tiles read again at ``cfg.tiling`` and made into
    the encoder's input by the run's own slide recipe, as an uploaded region is."""
    from medret import kinds
    from medret.kinds import ReadContext
    from medret.preprocess.wsi.tiling import SlideTiles
    from medret.train.augment import SlideViews

    input_size, channels, recipe = cfg.geometry()
    ctx = ReadContext(
        store=None, input_size=input_size, recipes=kinds.recipes_for(recipe), tiling=cfg.tiling, channels=channels
    )

    def to_input(rgb: Any) -> Any:  # called only where there are slide tiles, so only a run with them needs the recipe
        tile_recipe = ctx.recipe("wsi")
        regions = [tile_recipe(SlideTiles.of_region(r, cfg.tiling), input_size=input_size)[0].image for r in rgb]
        return np.stack(regions)

    return SlideViews(open_slide, cfg.tiling, to_input)


def eight_ways(images: Any) -> list[Any]:
    """``images`` (N, H, W[, C]) in its 8 dihedral orientations (rotations by 90 degrees, and mirrored)."""
    turns = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    return [np.ascontiguousarray(t) for t in turns + [x[:, :, ::-1] for x in turns]]


def fit_training_free(cfg: TrainConfig) -> TrainReport:
    """``frozen-itq`` / ``frozen-selfsup``: the preset's pretrained backbone, frozen, and a hash layer fitted on
    its features of the training images: PCA-ITQ, or trained contrastively on cached features of augmented
    views (no labels, no workers; minutes on a CPU)."""
    import torch

    from medret.models.encoder import EncoderConfig

    output = output_dir(cfg)
    input_size, channels, recipe = cfg.geometry()
    config = EncoderConfig(
        name="hashnet",
        architecture=str(cfg.architecture),
        bits=cfg.bits,
        input_size=input_size,
        channels=channels,
        mean=cfg.mean or (0.5,) * channels,
        std=cfg.std or (0.25,) * channels,
        modality=cfg.modality,
        preprocess=recipe,
        method=cfg.method,
        extra={"arch": dict(cfg.arch or {}), **({"preset": cfg.preset} if cfg.preset else {})},
    )
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {}
    if cfg.method == "frozen-selfsup":
        from medret.methods.frozen_selfsup import fit_frozen_selfsup
        from medret.train.archive import slide_opener
        from medret.train.augment import get_augmentation, rescan

        limit = cfg.samples_per_epoch or 4_000
        hyper = {**cfg.hyper}
        if cfg.batch_size:
            hyper.setdefault("batch", cfg.batch_size)
        if cfg.lr:
            hyper.setdefault("lr", cfg.lr)
        augmentation = get_augmentation(cfg.augmentation or "medmnist") if cfg.augment else get_augmentation("none")
        # an archive's slide tiles have their views read again from their slides
        field = slide_views(cfg, slide_opener(cfg)) if cfg.source else None
        batches, views = image_batches(cfg, limit, places=True), rescan(augmentation, field)
        encoder = fit_frozen_selfsup(config, batches, views, max_samples=limit, hyper=hyper, seed=cfg.seed)
        if field is not None and (field.reads or field.fallbacks):
            metrics["views_read_from_slides"] = field.reads
            metrics["slide_views_unreadable"] = field.fallbacks
    else:
        from medret.models.frozen import fit_frozen_itq

        limit = cfg.samples_per_epoch or 20_000
        batches = image_batches(cfg, limit)
        pooled = bool((cfg.arch or {}).get("dihedral"))  # the backbone sees the 8 orientations itself
        if cfg.augmentation == "histology" and not pooled:  # a tile has no up: fit on each in its 8 orientations
            batches = (np.concatenate([dihedral for dihedral in eight_ways(b)]) for b in batches)
        encoder = fit_frozen_itq(config, batches, max_samples=limit * (1 if pooled else 8), seed=cfg.seed)
    seconds = time.perf_counter() - t0
    encoder.save(output / "encoder.npz")
    samples = int(encoder.config.extra.get("fit", {}).get("samples", 0))
    metrics = {"samples": samples, "fit_seconds": round(seconds, 1), **metrics}
    stamp_provenance(output / "encoder.npz", cfg, metrics)
    history = [{"epoch": 0, "samples": samples, "samples_per_s_worker": samples / max(seconds, 1e-9)}]
    report = TrainReport(output / "encoder.npz", output, 0, history, seconds, f"driver on {platform.machine()}")
    (output / "train.json").write_text(json.dumps(report.summary(), indent=1))
    return report


def prepare_source(cfg: TrainConfig) -> tuple[str | None, dict[str, Any] | None]:
    """For an archive run: prepare it (or reuse its cache) and give the workers its training rows to stream."""
    if not cfg.source:
        return None, None
    import ray.data

    from medret.train.archive import part_dataset, prepare

    archive = prepare(cfg, cfg.geometry())
    ray.data.DataContext.get_current().enable_progress_bars = False
    log.info("archive %s: %s items (%d unreadable objects left out)", cfg.source, archive.counts, len(archive.skipped))
    if archive.counts["train"] < int(cfg.resolved("batch_size")):
        raise ConfigError(
            f"source {cfg.source!r} has {archive.counts['train']} training items, fewer than one batch "
            f"({cfg.resolved('batch_size')}); lower batch_size or add images"
        )
    return archive.to_json(), {"train": part_dataset(archive, "train", cfg)}


def fit(cfg: TrainConfig) -> TrainReport:
    """Train ``cfg`` through Ray Train and export the best epoch's encoder to ``output/encoder.npz``;
    with ``refit``, train again on train + val for the chosen number of epochs and export that."""
    from medret.train.auto import apply_auto

    if cfg.method in TRAINING_FREE:
        return fit_training_free(cfg)
    cfg, auto = apply_auto(cfg)
    if auto is not None:
        log.info("sized for its data: %s", auto.why)
    check_init(cfg)
    if cfg.refit and cfg.source:
        raise ConfigError("refit trains on train + val of .npz data; an archive's parts are not refitted yet")
    if cfg.refit and cfg.label_free:
        raise ConfigError(f"refit needs an epoch chosen on labelled validation; {cfg.method!r} trains without labels")
    output = output_dir(cfg)
    report = _run(cfg, output, auto)
    if not cfg.refit:
        return report
    epochs = report.best_epoch + 1
    log.info("refit: epoch %d was best on val; training %d epochs on train + val", report.best_epoch, epochs)
    chosen = report.summary()
    report = _run(cfg, output, auto, refit_epochs=epochs)
    report.refit = {"chosen_on_val": chosen, "epochs": epochs, "seconds": round(report.seconds, 1)}
    report.seconds += float(chosen["train_seconds"])
    (output / "train.json").write_text(json.dumps(report.summary(), indent=1))
    return report


def _run(cfg: TrainConfig, output: Path, auto: Any, refit_epochs: int | None = None) -> TrainReport:
    """One Ray Train run of ``cfg``, its chosen epoch exported to ``output``: the best on val, or with
    ``refit_epochs`` (trained on train + val, a run of its own) the last of those epochs."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from medret.train.loop import ENCODER, META, train_loop

    ensure_ray()
    resources, threads = worker_resources(cfg, ray.cluster_resources())
    archive, datasets = prepare_source(cfg)
    fs, storage = arrow_filesystem(cfg.storage_path, cfg.s3)
    name = cfg.run_name() + ("-refit" if refit_epochs else "")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "threads": threads,
            "archive": archive,
            "refit_epochs": refit_epochs,
        },
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
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
    if cfg.label_free or refit_epochs:  # labelled validation cannot choose (no labels; or val was trained on)
        best = max(result.best_checkpoints or [], key=lambda cm: cm[1]["epoch"])
    else:
        best = max(result.best_checkpoints or [], key=lambda cm: (cm[1].get("val_map100", -1.0), cm[1]["epoch"]))
    with best[0].as_directory() as d:
        shutil.copy(Path(d) / ENCODER, output / ENCODER)
    metrics: dict[str, Any] = {"best_epoch": int(best[1]["epoch"]), "val_map100": best[1].get("val_map100")}
    if refit_epochs:
        metrics = {"refit_epochs": refit_epochs, "trained_on": "train+val"}
    stamp_provenance(output / ENCODER, cfg, metrics, auto.record() if auto else None)
    latest = max(result.best_checkpoints or [], key=lambda cm: cm[1]["epoch"])
    with latest[0].as_directory() as d:
        all_history = json.loads((Path(d) / META).read_text())["history"]
    report = TrainReport(
        output / ENCODER, output, int(best[1]["epoch"]), all_history, seconds, hardware(cfg), auto.why if auto else ""
    )
    (output / ("history-refit.json" if refit_epochs else "history.json")).write_text(json.dumps(all_history, indent=1))
    (output / "train.json").write_text(json.dumps(report.summary(), indent=1))
    return report
