"""What every Ray Train worker runs: build the method, resume, train, validate, checkpoint."""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from medret.errors import ConfigError
from medret.eval.benchmarks import Part
from medret.eval.retrieval import leave_one_out_map
from medret.methods import METHODS, Method
from medret.models.encoder import EncoderConfig
from medret.models.hashnet import HashNet, TorchHashEncoder
from medret.train.config import TrainConfig
from medret.train.data import augment, to_tensor
from medret.train.feeds import Feed, open_feed

log = logging.getLogger(__name__)
STATE = "state.pt"
ENCODER = "encoder.npz"
META = "meta.json"


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def encoder_config(cfg: TrainConfig, method: Method, feed: Feed) -> EncoderConfig:
    head = method.encoder.classifier
    _, _, recipe = cfg.geometry()
    provenance: dict[str, Any] = {"source": cfg.source, "labels": cfg.labels or cfg.label_tag} if cfg.source else {}
    if cfg.source:
        provenance["classes"] = feed.archive.classes  # type: ignore[attr-defined]
    return EncoderConfig(
        name="hashnet",
        architecture=cfg.resolved("architecture"),
        bits=cfg.bits,
        input_size=method.task.input_size,
        channels=method.task.channels,
        mean=tuple(method.encoder.mean.flatten().tolist()),
        std=tuple(method.encoder.std.flatten().tolist()),
        modality=cfg.modality,
        preprocess=recipe,
        method=cfg.method,
        extra={
            "arch": cfg.resolved("arch"),
            "n_classes": head.out_features if head is not None else 0,
            "fine_bits": method.task.fine_bits,
            "organs": feed.organs,
            "labels": feed.n_classes,
            "data": [] if cfg.source else cfg.data,
            **({"preset": cfg.preset} if cfg.preset else {}),
            **provenance,
        },
    )


def training_features(net: HashNet, images: npt.NDArray[np.uint8]) -> torch.Tensor:
    """Backbone features of ``images``, in chunks."""
    with torch.inference_mode():
        chunks = max(10, images.size // (8 << 20))  # 10 as always for small images; ~8M pixels each for large ones
        return torch.cat([net.forward_features(to_tensor(c)) for c in np.array_split(images, chunks)])


def lr_lambda(total_steps: int, warmup: int) -> Any:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def autocast(cfg: TrainConfig, device: torch.device) -> tuple[AbstractContextManager[Any], torch.dtype | None]:
    if device.type != "cuda" or cfg.amp == "off":
        return nullcontext(), None
    dtype = torch.float16 if cfg.amp == "fp16" else torch.bfloat16
    if cfg.amp == "auto" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype


def fixed_batch_loss(method: Method, batch: tuple[torch.Tensor, ...], device: torch.device) -> float:
    was_training = method.training
    method.eval()
    with torch.no_grad():
        loss, _ = method(*(t.to(device) for t in batch))
    method.train(was_training)
    return float(loss)


def load_state(checkpoint: Any) -> dict[str, Any]:
    """The training state of a Ray checkpoint, read straight from its filesystem.

    Every worker reads it into memory itself: ``Checkpoint.as_directory`` shares one
    temporary download between the workers of a node, and one worker's cleanup can
    delete it while another is still reading (seen as a corrupt zip on S3 resumes).
    """
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE}") as f:
        data = f.read()
    return dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


def init_weights(method: Method, spec: str) -> None:
    """Load a trained encoder's weights into ``method.encoder`` (fine-tuning); refuse one that does not fit."""
    from medret.models.pretrained import encoder_path

    path = encoder_path(spec)
    source = TorchHashEncoder(path=path)
    try:
        method.encoder.load_state_dict(source.module.state_dict())
    except RuntimeError as err:
        raise ConfigError(f"init {spec!r} ({path}): its weights do not fit this run's encoder: {err}") from err


@dataclass(frozen=True)
class Budget:
    """How much one run trains: global batch size, epochs, samples and optimizer steps per epoch."""

    batch_size: int
    epochs: int
    samples: int
    steps: int


def budget(cfg: TrainConfig, n_train: int, world: int) -> Budget:
    batch_size = int(cfg.resolved("batch_size"))
    if batch_size < world * 2:
        raise ValueError(f"batch_size {batch_size} is too small for {world} workers (at least 2 each)")
    samples = cfg.samples_per_epoch or n_train
    steps = samples // batch_size if cfg.max_steps is None else min(cfg.max_steps, samples // batch_size)
    return Budget(batch_size, int(cfg.resolved("epochs")), samples, steps)


@dataclass
class WorkerRun:
    """What one worker's epochs share: the data, the method and its optimizer, and the history so far."""

    cfg: TrainConfig
    rank: int
    world: int
    feed: Feed
    method: Method
    model: Any  # ``method`` as Ray Train prepared it (DDP-wrapped with several workers)
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp: AbstractContextManager[Any]
    budget: Budget
    start_epoch: int
    history: list[dict[str, Any]]
    enc_config: EncoderConfig
    val_batch: tuple[torch.Tensor, ...]


def build_method(cfg: TrainConfig, feed: Feed) -> Method:
    return METHODS.get(cfg.method)(
        feed.task_info(cfg.bits, cfg.resolved_fine_bits()),
        cfg.resolved("architecture"),
        cfg.resolved("arch"),
        cfg.hyper,
    )


def restore(cfg: TrainConfig, method: Method, checkpoint: Any) -> dict[str, Any] | None:
    """Load the method's weights from Ray's checkpoint (a resume) or ``cfg.init`` (fine-tuning);
    returns the checkpoint's training state, if any."""
    if checkpoint:
        state = load_state(checkpoint)
        method.load_state_dict(state["method"])
        return state
    if cfg.init:
        init_weights(method, cfg.init)
    return None


def optimizers(
    cfg: TrainConfig, method: Method, b: Budget
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the method's parameter groups, with linear warm-up then a cosine decay over the run."""
    lr = float(cfg.resolved("lr"))
    optimizer = torch.optim.AdamW(method.param_groups(lr), weight_decay=float(cfg.resolved("weight_decay")))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(b.epochs * b.steps, max(1, b.steps // 2)))
    return optimizer, scheduler


def resume(
    cfg: TrainConfig,
    state: dict[str, Any] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
) -> tuple[int, list[dict[str, Any]]]:
    """The first epoch to train and the history before it, restoring the optimizer's state on a resume."""
    if state is None:
        return 0, []
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    start_epoch = int(state["epoch"]) + 1
    log.info("resumed %s at epoch %d", cfg.run_name(), start_epoch)
    return start_epoch, list(json.loads(state["history"]))


def validation_batch(cfg: TrainConfig, val: Part) -> tuple[torch.Tensor, ...]:
    """A fixed validation batch: its loss, unlike the training loss of a mining method, is comparable across epochs.
    ``val.label`` is the combined label; a label-free method sees -1 for organ and label."""
    vb = np.sort(np.random.default_rng(cfg.seed).choice(len(val), min(256, len(val)), replace=False))
    organ, label = torch.from_numpy(val.organ[vb]), torch.from_numpy(val.label[vb])
    if cfg.label_free:
        organ, label = torch.full_like(organ, -1), torch.full_like(label, -1)
    return to_tensor(val.images[vb]), organ, label


def setup(loop_config: dict[str, Any]) -> WorkerRun:
    """Everything a worker needs before its first epoch, from scratch or from the latest checkpoint."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(loop_config.get("threads", 1)))
    seed_everything(cfg.seed)  # identical initial weights on every worker
    feed = open_feed(cfg, loop_config.get("archive"), with_val=bool(loop_config.get("refit_epochs")))
    method = build_method(cfg, feed)
    b = budget(cfg, feed.n_train, world)
    state = restore(cfg, method, ray.train.get_checkpoint())
    model = ray.train.torch.prepare_model(method)
    device = ray.train.torch.get_device()
    optimizer, scheduler = optimizers(cfg, method, b)
    start_epoch, history = resume(cfg, state, optimizer, scheduler)
    amp, amp_dtype = autocast(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return WorkerRun(
        cfg=cfg,
        rank=rank,
        world=world,
        feed=feed,
        method=method,
        model=model,
        device=device,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        amp=amp,
        budget=b,
        start_epoch=start_epoch,
        history=history,
        enc_config=encoder_config(cfg, method, feed),
        val_batch=validation_batch(cfg, feed.val()),
    )


def augmentation(cfg: TrainConfig) -> Any:
    """The run's augmentation: by name (``cfg.augmentation``, a preset's), else the MedMNIST default."""
    if not cfg.augmentation:
        return augment
    from medret.train.augment import AUGMENTATIONS

    return AUGMENTATIONS.get(cfg.augmentation)


def train_step(
    run: WorkerRun,
    images: npt.NDArray[Any],
    organ_: npt.NDArray[np.int64],
    label_: npt.NDArray[np.int64],
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch; returns the loss and the method's logs. A method that makes its own
    views gets the batch un-augmented; a label-free method gets -1 for organ and label."""
    x = to_tensor(images)
    if run.cfg.augment and not getattr(run.method, "self_augments", False):
        x = augmentation(run.cfg)(x, gen)
    if run.cfg.label_free:
        organ_, label_ = np.full_like(organ_, -1), np.full_like(label_, -1)
    organ = torch.from_numpy(np.array(organ_, np.int64)).to(run.device)
    label = torch.from_numpy(np.array(label_, np.int64)).to(run.device)
    with run.amp:
        loss, logs = run.model(x.to(run.device, non_blocking=True), organ, label)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.method.after_step()
    return {"loss": loss, **logs}


def train_epoch(run: WorkerRun, epoch: int) -> dict[str, Any]:
    """This worker's share of one epoch; returns the mean losses and the throughput."""
    cfg, b = run.cfg, run.budget
    run.model.train()
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1009 + run.rank)
    sums: dict[str, float] = {}
    t0, seen, step = time.perf_counter(), 0, 0
    feed = run.feed.epoch(epoch, batch_size=b.batch_size, samples=b.samples, rank=run.rank, world=run.world)
    for step, (images, organ, label) in enumerate(feed):
        if step >= b.steps:
            break
        for k, v in train_step(run, images, organ, label, gen).items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        seen += len(images)
    elapsed = time.perf_counter() - t0
    metrics: dict[str, Any] = {k: v / max(1, step) for k, v in sums.items()}
    metrics.update(
        epoch=epoch,
        start_epoch=run.start_epoch,
        samples_per_s_worker=seen / elapsed,
        epoch_s=elapsed,
        lr=run.scheduler.get_last_lr()[0],
    )
    return metrics


def export_encoder(run: WorkerRun) -> TorchHashEncoder:
    """The method's encoder as exported: a copy on the CPU, its bits balanced and fine bits fitted when asked."""
    cfg = run.cfg
    net = copy.deepcopy(run.method.encoder).cpu().eval()
    n = cfg.export_samples
    if cfg.resolved("bit_balance", False):  # thresholds from the training mix the run sampled
        net.balance_bits(training_features(net, run.feed.train_sample(n, cfg.seed + 1, balanced=True)))
    if run.method.task.fine_bits:
        net.fit_fine(training_features(net, run.feed.train_sample(n, cfg.seed, balanced=False)), seed=cfg.seed)
    return TorchHashEncoder.from_module(net, run.enc_config)


def save_checkpoint(run: WorkerRun, epoch: int, metrics: dict[str, Any], encoder: TorchHashEncoder, tmp: Path) -> None:
    """The exported encoder, the training state to resume from and the history, in ``tmp``."""
    encoder.save(tmp / ENCODER)
    state = {
        "method": run.method.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "epoch": epoch,
        "history": json.dumps(run.history),
    }
    torch.save(state, tmp / STATE)
    (tmp / META).write_text(json.dumps({"epoch": epoch, "metrics": metrics, "history": run.history}))


def report_epoch(run: WorkerRun, epoch: int, metrics: dict[str, Any]) -> None:
    """Rank 0 validates, checkpoints and reports the epoch; the other workers report their metrics only."""
    import ray.train

    if run.rank != 0:
        ray.train.report({**metrics, "val_map100": float("nan"), "val_loss": float("nan")}, checkpoint=None)
        return
    val = run.feed.val()
    metrics["val_loss"] = fixed_batch_loss(run.method, run.val_batch, run.device)
    encoder = export_encoder(run)
    codes = encoder.encode(val.images)
    metrics["val_map100"] = leave_one_out_map(codes, val.label, run.cfg.val_queries)
    run.history.append(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(run, epoch, metrics, encoder, Path(tmp))
        log.info("epoch %d: %s", epoch, {k: round(float(v), 4) for k, v in metrics.items()})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: set up (or resume), then train, validate and checkpoint each epoch."""
    run = setup(loop_config)
    # a refit trains on the same schedule as the run that chose its length, and stops at that length
    stop = min(run.budget.epochs, int(loop_config.get("refit_epochs") or run.budget.epochs))
    for epoch in range(run.start_epoch, stop):
        report_epoch(run, epoch, train_epoch(run, epoch))
