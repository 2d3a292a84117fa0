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
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from medret.errors import ConfigError
from medret.eval.retrieval import leave_one_out_map
from medret.methods import METHODS, Method
from medret.models.encoder import EncoderConfig
from medret.models.hashnet import HashNet, TorchHashEncoder
from medret.train.config import TrainConfig
from medret.train.data import Labels, augment, batches, epoch_indices, load_split, task_info, to_tensor

log = logging.getLogger(__name__)
STATE = "state.pt"
ENCODER = "encoder.npz"
META = "meta.json"


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def encoder_config(cfg: TrainConfig, method: Method, organs: list[str], n_labels: int) -> EncoderConfig:
    head = method.encoder.classifier
    return EncoderConfig(
        name="hashnet",
        architecture=cfg.resolved("architecture"),
        bits=cfg.bits,
        input_size=method.task.input_size,
        channels=method.task.channels,
        mean=tuple(method.encoder.mean.flatten().tolist()),
        std=tuple(method.encoder.std.flatten().tolist()),
        modality="any",
        preprocess="medmnist",
        method=cfg.method,
        extra={
            "arch": cfg.resolved("arch"),
            "n_classes": head.out_features if head is not None else 0,
            "fine_bits": method.task.fine_bits,
            "organs": organs,
            "labels": n_labels,
            "data": cfg.data,
        },
    )


def training_features(net: HashNet, images: npt.NDArray[np.uint8], sample: npt.NDArray[np.int64]) -> torch.Tensor:
    """Backbone features of ``images[sample]``, in chunks."""
    with torch.inference_mode():
        return torch.cat([net.forward_features(to_tensor(images[c])) for c in np.array_split(sample, 10)])


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


def train_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(loop_config.get("threads", 1)))
    seed_everything(cfg.seed)  # identical initial weights on every worker
    split = load_split(cfg.data)
    labels = Labels.of(split)
    train, val = split["train"], split["val"]
    train_label = labels.combined(train)
    method = METHODS.get(cfg.method)(
        task_info(split, cfg.bits, cfg.resolved_fine_bits()),
        cfg.resolved("architecture"),
        cfg.resolved("arch"),
        cfg.hyper,
    )
    batch_size = int(cfg.resolved("batch_size"))
    if batch_size < world * 2:
        raise ValueError(f"batch_size {batch_size} is too small for {world} workers (at least 2 each)")
    epochs = int(cfg.resolved("epochs"))
    samples = cfg.samples_per_epoch or len(train)
    steps = samples // batch_size if cfg.max_steps is None else min(cfg.max_steps, samples // batch_size)
    state: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        state = load_state(checkpoint)
        method.load_state_dict(state["method"])
    elif cfg.init:
        init_weights(method, cfg.init)
    model = ray.train.torch.prepare_model(method)
    device = ray.train.torch.get_device()
    lr = float(cfg.resolved("lr"))
    optimizer = torch.optim.AdamW(method.param_groups(lr), weight_decay=float(cfg.resolved("weight_decay")))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(epochs * steps, max(1, steps // 2)))
    start_epoch, history = 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = int(state["epoch"]) + 1, json.loads(state["history"])
        log.info("resumed %s at epoch %d", cfg.run_name(), start_epoch)
    amp, amp_dtype = autocast(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    enc_config = encoder_config(cfg, method, split.organs, labels.n_classes)
    # a fixed validation batch: its loss, unlike the training loss of a mining method, is comparable across epochs
    vb = np.sort(np.random.default_rng(cfg.seed).choice(len(val), min(256, len(val)), replace=False))
    val_batch = (to_tensor(val.images[vb]), torch.from_numpy(val.organ[vb]), torch.from_numpy(labels.combined(val)[vb]))

    for epoch in range(start_epoch, epochs):
        model.train()
        idx = epoch_indices(train.organ, balance=cfg.organ_balance, samples=samples, seed=cfg.seed * 100_003 + epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1009 + rank)
        sums: dict[str, float] = {}
        t0, seen, step = time.perf_counter(), 0, 0
        for step, b in enumerate(batches(idx, batch_size=batch_size, rank=rank, world=world)):
            if step >= steps:
                break
            x = to_tensor(train.images[b])
            if cfg.augment:
                x = augment(x, gen)
            organ = torch.from_numpy(train.organ[b]).to(device)
            label = torch.from_numpy(train_label[b]).to(device)
            with amp:
                loss, logs = model(x.to(device, non_blocking=True), organ, label)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            method.after_step()
            seen += len(b)
            for k, v in {"loss": loss, **logs}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        elapsed = time.perf_counter() - t0
        metrics: dict[str, Any] = {k: v / max(1, step) for k, v in sums.items()}
        metrics.update(
            epoch=epoch,
            start_epoch=start_epoch,
            samples_per_s_worker=seen / elapsed,
            epoch_s=elapsed,
            lr=scheduler.get_last_lr()[0],
        )
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                metrics["val_loss"] = fixed_batch_loss(method, val_batch, device)
                net = copy.deepcopy(method.encoder).cpu().eval()
                if cfg.resolved("bit_balance", False):  # thresholds from the training mix the run sampled
                    sample = epoch_indices(train.organ, balance=cfg.organ_balance, samples=10_000, seed=cfg.seed + 1)
                    net.balance_bits(training_features(net, train.images, sample))
                if method.task.fine_bits:
                    sample = np.random.default_rng(cfg.seed).choice(len(train), min(len(train), 10_000), replace=False)
                    net.fit_fine(training_features(net, train.images, sample), seed=cfg.seed)
                encoder = TorchHashEncoder.from_module(net, enc_config)
                codes = encoder.encode(val.images)
                metrics["val_map100"] = leave_one_out_map(codes, labels.combined(val), cfg.val_queries)
                history.append(metrics)
                encoder.save(Path(tmp) / ENCODER)
                torch.save(
                    {
                        "method": method.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "history": json.dumps(history),
                    },
                    Path(tmp) / STATE,
                )
                (Path(tmp) / META).write_text(json.dumps({"epoch": epoch, "metrics": metrics, "history": history}))
                log.info("epoch %d: %s", epoch, {k: round(float(v), 4) for k, v in metrics.items()})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report({**metrics, "val_map100": float("nan"), "val_loss": float("nan")}, checkpoint=None)
