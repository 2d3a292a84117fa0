"""A training-free encoder: a frozen (pretrained) backbone, then PCA-ITQ on its features.

No labels and no gradient step: run the backbone over a sample of the archive, fit ITQ
(:func:`~medret.models.itq.itq_projection`) to its features, and write the projection into the
HashNet's hash layer (``weight = proj.T``, ``bias = -mean @ proj``), so the code of an image is
``sign((features - mean) @ proj)``. The result is an ordinary ``hashnet`` checkpoint: it saves
to and loads from ``encoder.npz`` like a trained one, and exports to ONNX the same way.

>>> from medret.models.presets import preset_config
>>> images = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
>>> enc = fit_frozen_itq(preset_config("medmnist", bits=16), [images[:20], images[20:]])
>>> enc.config.method, enc.config.extra["fit"]["samples"], enc.encode(images[:3]).shape
('frozen-itq', 40, (3, 2))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from medret.errors import ConfigError
from medret.models.encoder import EncoderConfig
from medret.models.hashnet import HashNet, TorchHashEncoder, build_hashnet, state_digest, to_input
from medret.models.itq import itq_projection

ITERATIONS = 50
CHUNK = 64  # images per forward pass, whatever the size of the batches given


@torch.inference_mode()
def features_of(
    net: HashNet, batches: Iterable[npt.NDArray[Any]], config: EncoderConfig, *, max_samples: int
) -> npt.NDArray[np.float32]:
    """Backbone features (n, out_dim) float32 of the first ``max_samples`` images, in eval mode."""
    net.eval()
    out: list[npt.NDArray[np.float32]] = []
    n = 0
    for images in batches:
        x = to_input(np.asarray(images), config)[: max_samples - n]
        for i in range(0, len(x), CHUNK):
            out.append(net.forward_features(x[i : i + CHUNK]).float().numpy())
        n += len(x)
        if n >= max_samples:
            break
    return np.concatenate(out) if out else np.zeros((0, net.hash.in_features), np.float32)


@torch.no_grad()
def set_itq_hash(net: HashNet, mean: npt.NDArray[np.float32], proj: npt.NDArray[np.float32]) -> None:
    """Make ``net.hash(f)`` equal ``(f - mean) @ proj``: weight ``proj.T``, bias ``-(mean @ proj)``."""
    net.hash.weight.copy_(torch.from_numpy(np.ascontiguousarray(proj.T, np.float32)))
    bias = -(mean.astype(np.float64) @ proj.astype(np.float64))  # the one rounding is the cast to float32
    net.hash.bias.copy_(torch.from_numpy(bias.astype(np.float32)))


def frozen_net(config: EncoderConfig, method: str) -> tuple[HashNet, dict[str, Any]]:
    """The config's HashNet with no classifier and no similarity bits, and its extra options, cleaned."""
    extra = {k: v for k, v in config.extra.items() if k not in ("fit", "n_classes", "fine_bits")}
    net = build_hashnet(
        config.model_copy(update={"method": method, "extra": {**extra, "fine_bits": 0, "n_classes": 0}})
    )
    return net, extra


def stamp_fit(
    net: HashNet, config: EncoderConfig, method: str, extra: dict[str, Any], fit: dict[str, Any]
) -> TorchHashEncoder:
    """The fitted net as an ordinary ``hashnet`` encoder whose config records the fit (and carries the backbone)."""
    arch = dict(extra.get("arch", {}))
    fit["backbone_sha256"] = state_digest(net.backbone.state_dict())
    if arch.get("pretrained"):
        # the checkpoint carries the backbone's weights: loading it needs no weights package
        arch["pretrained"] = False
        fit["pretrained"] = True
    stamped = config.model_copy(
        update={
            "name": "hashnet",
            "method": method,
            "extra": {**extra, "arch": arch, "fine_bits": 0, "n_classes": 0, "fit": fit},
        }
    )
    return TorchHashEncoder.from_module(net, stamped)


def fit_frozen_itq(
    config: EncoderConfig, batches: Iterable[npt.NDArray[Any]], *, max_samples: int = 20000, seed: int = 0
) -> TorchHashEncoder:
    """A ``frozen-itq`` encoder from ``config`` (e.g. a preset's) and image batches.

    ``batches`` yield arrays the config's encoder takes (uint8, or float in [0, 1]; (N, H, W) grey
    or (N, H, W, C)); the first ``max_samples`` images are used. Deterministic for a given input.
    """
    if max_samples < config.bits:
        raise ConfigError(f"max_samples must be at least bits ({config.bits}), got {max_samples}")
    net, extra = frozen_net(config, "frozen-itq")
    features = features_of(net, batches, config, max_samples=max_samples)
    n, dim = features.shape
    if n < config.bits or dim < config.bits:
        raise ConfigError(
            f"frozen-itq with {config.bits} bits needs at least {config.bits} images and features; "
            f"got {n} images of {dim} features"
        )
    mean, proj = itq_projection(features, config.bits, iterations=ITERATIONS, seed=seed)
    set_itq_hash(net, mean, proj)
    fit: dict[str, Any] = {"samples": n, "seed": seed, "iterations": ITERATIONS, "max_samples": max_samples}
    return stamp_fit(net, config, "frozen-itq", extra, fit)
