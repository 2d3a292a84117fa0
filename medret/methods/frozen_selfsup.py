"""``frozen-selfsup``: a pretrained backbone kept frozen, and a hash layer trained on it without labels.

The CPU path to codes made for an archive that has no labels: the backbone's features of each image
and of random views of it (what rescanning changes: rotation, stain, field of view, JPEG) are
computed once and cached, then only the linear hash layer is trained on them, contrastively
(:mod:`medret.methods.selfsup`'s NT-Xent, quantisation and bit balance). The result is an
ordinary ``hashnet`` checkpoint, like ``frozen-itq``'s (:mod:`medret.models.frozen`), whose ITQ
projection is where the training starts. Fine-tuning the backbone itself is the GPU path (``selfsup``
with the preset's backbone).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from medret.errors import ConfigError
from medret.methods.selfsup import bit_balance_loss, nt_xent
from medret.models.encoder import EncoderConfig
from medret.models.frozen import CHUNK, ITERATIONS, frozen_net, set_itq_hash, stamp_fit
from medret.models.hashnet import HashNet, TorchHashEncoder, to_input
from medret.models.itq import itq_projection

#: ``frozen-selfsup``'s knobs (``hyper``): views per image, head training steps and batch, NT-Xent temperature,
#: quantisation and bit-balance weights, Adam's learning rate. Measured on the histology re-identification
#: benchmark (docs/results.md): temperature 0.1 beat 0.05, 0.2, 0.3 and 0.5; 4,000 steps did no better than 1,500.
SELFSUP_DEFAULTS: dict[str, Any] = {
    "views": 8,
    "steps": 1500,
    "batch": 256,
    "temperature": 0.1,
    "quant": 0.1,
    "balance": 0.1,
    "lr": 1e-3,
}

#: images per ONNX Runtime call when computing the cached features
TWIN_CHUNK = 16

#: ``(x, generator, at) -> views``: ``x`` (N, C, H, W) in [0, 1], ``at`` what the batch says of where each image
#: came from (e.g. a slide tile's place, for views read again from the slide; None where nothing is known)
ViewMaker = Callable[[torch.Tensor, torch.Generator, Sequence[Any]], torch.Tensor]
#: a batch of images, or of images and where each came from (one entry per image, None where unknown)
Batch = npt.NDArray[Any] | tuple[npt.NDArray[Any], Sequence[Any]]


def fit_frozen_selfsup(
    config: EncoderConfig,
    batches: Iterable[Batch],
    views_of: ViewMaker,
    *,
    max_samples: int = 4000,
    hyper: dict[str, Any] | None = None,
    seed: int = 0,
    runtime: str = "onnx",
) -> TorchHashEncoder:
    """A ``frozen-selfsup`` encoder: the frozen backbone, and a hash layer trained without labels.

    Each of the first ``max_samples`` images is seen as itself and through ``views`` random views
    (``views_of(x, generator, at)`` on (N, C, H, W) in [0, 1]; e.g. rotations, stain, a moved field of view,
    JPEG). ``batches`` gives images, or ``(images, at)`` with where each came from, passed on to ``views_of``
    (a slide tile's place, so its views can be read from the slide). The backbone's features of all of them
    are computed once and kept (float16, ``2 * dim * (views + 1)`` bytes per image). The linear hash layer
    starts from PCA-ITQ of the images' own features (of all their views where there are fewer images than
    bits) and is trained on the cached features for ``steps`` steps: NT-Xent between two of each image's
    ``views + 1`` cached versions, drawn independently (so one time in ``views + 1`` the same one; one
    image's versions pulled together, pushed from the batch's other images), plus a quantisation and a
    bit-balance term (:mod:`medret.methods.selfsup`). No gradient reaches the backbone, so this takes minutes
    on a CPU. ``runtime`` ``"onnx"``: the features are computed by the net's ONNX Runtime twin (several times
    faster on a CPU; its features are torch's to float error, and the fitted encoder is the torch net).
    Deterministic for a given input.
    """
    h = {**SELFSUP_DEFAULTS, **(hyper or {})}
    unknown = sorted(set(h) - set(SELFSUP_DEFAULTS))
    if unknown:
        raise ConfigError(f"frozen-selfsup: unknown hyper {unknown}; known: {sorted(SELFSUP_DEFAULTS)}")
    n_views, steps, batch = int(h["views"]), int(h["steps"]), int(h["batch"])
    if n_views < 1 or steps < 1 or batch < 2:
        raise ConfigError(
            f"frozen-selfsup needs views >= 1, steps >= 1 and batch >= 2; got {n_views}, {steps}, {batch}"
        )
    if runtime not in ("onnx", "torch"):
        raise ConfigError(f"runtime must be 'onnx' or 'torch', got {runtime!r}")
    if max_samples < 2:
        raise ConfigError(f"frozen-selfsup trains on at least 2 images (samples_per_epoch), got {max_samples}")
    net, extra = frozen_net(config, "frozen-selfsup")
    t0 = time.perf_counter()
    cached = _view_features(net, config, batches, views_of, n_views, max_samples, seed, runtime)
    features_s = time.perf_counter() - t0
    n, _, dim = cached.shape
    if n < 2 or n * (n_views + 1) < config.bits or dim < config.bits:
        raise ConfigError(
            f"frozen-selfsup with {config.bits} bits needs at least 2 images, {config.bits} images and views "
            f"together, and {config.bits} features; got {n} images x {n_views + 1} (each and its views) of {dim} "
            "features"
        )
    # the start: PCA-ITQ of the images themselves, or of every view where there are fewer images than bits
    start = cached[:, 0] if n >= config.bits else cached.reshape(-1, dim)
    mean, proj = itq_projection(start.astype(np.float32), config.bits, iterations=ITERATIONS, seed=seed)
    set_itq_hash(net, mean, proj)
    t1 = time.perf_counter()
    head = net.hash
    opt = torch.optim.Adam(head.parameters(), lr=float(h["lr"]))
    generator = torch.Generator().manual_seed(seed)
    feats = torch.from_numpy(cached)
    losses = []
    with torch.inference_mode(False), torch.enable_grad():  # a caller's inference mode would stop the gradient
        for _ in range(steps):
            rows = torch.randperm(n, generator=generator)[:batch]
            a, b = (torch.randint(0, n_views + 1, (len(rows),), generator=generator) for _ in range(2))
            za = torch.tanh(head(feats[rows, a].float()))
            zb = torch.tanh(head(feats[rows, b].float()))
            code = torch.cat([za, zb])
            loss = nt_xent(za, zb, float(h["temperature"]))
            loss = (
                loss + float(h["quant"]) * (code.abs() - 1).pow(2).mean() + float(h["balance"]) * bit_balance_loss(code)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    fit: dict[str, Any] = {
        "samples": n,
        "seed": seed,
        "max_samples": max_samples,
        **h,
        "loss_first": round(losses[0], 4),
        "loss_last": round(float(np.mean(losses[-min(50, max(1, steps // 4)) :])), 4),
        "features_s": round(features_s, 1),
        "head_s": round(time.perf_counter() - t1, 1),
        "feature_cache_bytes": int(cached.nbytes),
    }
    net.eval()
    return stamp_fit(net, config, "frozen-selfsup", extra, fit)


@torch.inference_mode()
def _view_features(
    net: HashNet,
    config: EncoderConfig,
    batches: Iterable[Batch],
    views_of: ViewMaker,
    n_views: int,
    max_samples: int,
    seed: int,
    runtime: str,
) -> npt.NDArray[np.float16]:
    """(n, views + 1, dim) float16 backbone features: each image itself first, then its random views."""
    net.eval()
    run = _feature_runner(net, config, runtime)
    generator = torch.Generator().manual_seed(seed + 1)
    out: list[npt.NDArray[np.float16]] = []
    n = 0
    for batch in batches:
        images, at = batch if isinstance(batch, tuple) else (batch, [None] * len(batch))
        if len(at) != len(images):
            raise ValueError(f"a batch of {len(images)} images came with {len(at)} places")
        x = to_input(np.asarray(images), config)[: max_samples - n]
        at = list(at)[: len(x)]
        for i in range(0, len(x), CHUNK):
            chunk, places = x[i : i + CHUNK], list(at[i : i + CHUNK])
            seen = [run(chunk)] + [run(views_of(chunk, generator, places)) for _ in range(n_views)]
            out.append(np.stack(seen, 1).astype(np.float16))
        n += len(x)
        if n >= max_samples:
            break
    if not out:
        return np.zeros((0, n_views + 1, net.hash.in_features), np.float16)
    return np.concatenate(out)


def _feature_runner(net: HashNet, config: EncoderConfig, runtime: str) -> Callable[[torch.Tensor], npt.NDArray[Any]]:
    """(N, C, H, W) in [0, 1] -> backbone features, by torch or by the net's ONNX Runtime twin."""
    if runtime == "torch":
        return lambda x: net.forward_features(x).float().numpy()
    from medret.models.onnx import OnnxEncoder, onnx_bytes

    twin = OnnxEncoder(onnx_bytes(TorchHashEncoder.from_module(net, config)), threads=os.cpu_count() or 1)
    # the twin takes the encoder's own layout, (N, H, W) or (N, H, W, C)
    layout = (lambda x: x[:, 0]) if config.channels == 1 else (lambda x: x.permute(0, 2, 3, 1))

    def run(x: torch.Tensor) -> npt.NDArray[Any]:
        # a few images per call: a pooled backbone (``arch.dihedral``) runs 8 passes of each at once, and the
        # runtime keeps the memory of its largest call
        parts = [np.ascontiguousarray(layout(x[i : i + TWIN_CHUNK]).numpy()) for i in range(0, len(x), TWIN_CHUNK)]
        return np.concatenate([twin.forward_features(p) for p in parts])

    return run
