"""PCA + Iterative Quantisation (Gong & Lazebnik, CVPR 2011): a training-free hashing baseline.

Fits in seconds on the CPU, needs no labels, and gives a real (if modest)
retrieval quality: the reference point every deep hashing method must beat.
Input: grey images (N, H, W) uint8, scaled to [0, 1] and flattened.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.errors import ConfigError, DataError
from medret.models.codes import pack_bits
from medret.models.encoder import ENCODERS, EncoderConfig, config_in


def _digest(*arrays: npt.NDArray[Any]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def itq_projection(
    x: npt.NDArray[np.float32], bits: int, *, iterations: int = 50, seed: int = 0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``(mean, projection)`` so that ``sign((x - mean) @ projection)`` is the ITQ code of ``x`` (n, d)."""
    mean = x.mean(axis=0)
    xc = x - mean
    cov = (xc.T @ xc) / len(xc)
    evals, evecs = np.linalg.eigh(cov.astype(np.float64))
    pca = evecs[:, np.argsort(evals)[::-1][:bits]]
    v = xc @ pca
    rng = np.random.default_rng(seed)
    rot, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
    for _ in range(iterations):  # alternate B = sign(VR) and orthogonal Procrustes for R
        b = np.where(v @ rot >= 0, 1.0, -1.0)
        u, _, wt = np.linalg.svd(v.T @ b)
        rot = u @ wt
    return mean.astype(np.float32), (pca @ rot).astype(np.float32)


@ENCODERS.register("pca-itq")
class PCAITQ:
    """Project centred pixels on the top principal axes, rotate, take signs."""

    def __init__(
        self,
        config: EncoderConfig | None = None,
        mean: npt.NDArray[np.float32] | None = None,
        projection: npt.NDArray[np.float32] | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        if path is not None:
            with np.load(Path(path), allow_pickle=False) as z:
                config = config_in(z, path)
                mean, projection = z["mean"], z["projection"]
        if config is None or mean is None or projection is None:
            raise ValueError("PCAITQ needs (config, mean, projection) or path=")
        self.config = config
        self.mean = np.asarray(mean, np.float32)
        self.projection = np.asarray(projection, np.float32)

    @classmethod
    def fit(
        cls,
        images: npt.NDArray[np.uint8],
        *,
        bits: int,
        iterations: int = 50,
        seed: int = 0,
        modality: str = "any",
        preprocess: str = "medmnist",
    ) -> PCAITQ:
        x = cls._flatten(images)
        if bits % 8 or not 8 <= bits <= min(x.shape):
            raise ConfigError(f"bits must be a multiple of 8 between 8 and {min(x.shape)}, got {bits}")
        mean32, projection = itq_projection(x, bits, iterations=iterations, seed=seed)
        h, w = images.shape[1:3]
        config = EncoderConfig(
            name="pca-itq",
            bits=bits,
            input_size=(h, w),
            channels=1,
            mean=(0.0,),
            std=(1.0,),
            modality=modality,
            preprocess=preprocess,
            method="pca-itq",
            weights_sha256=_digest(mean32, projection),
            extra={"iterations": iterations, "seed": seed, "train_images": len(images)},
        )
        return cls(config, mean32, projection)

    @staticmethod
    def _flatten(images: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        if images.ndim != 3:
            raise DataError(f"pca-itq takes grey images (N, H, W), got shape {images.shape}")
        return images.reshape(len(images), -1).astype(np.float32) / 255.0

    def forward_features(self, images: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        h, w = self.config.input_size
        if images.shape[1:] != (h, w):
            raise DataError(f"pca-itq was fitted on {h}x{w} images, got {images.shape[1:]}")
        return np.asarray((self._flatten(images) - self.mean) @ self.projection, np.float32)

    def encode(self, images: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        return pack_bits(self.forward_features(images))

    def save(self, path: str | os.PathLike[str]) -> EncoderConfig:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("wb") as f:
            np.savez(
                f,
                config=np.frombuffer(self.config.to_json().encode(), np.uint8),
                mean=self.mean,
                projection=self.projection,
            )
        return self.config
