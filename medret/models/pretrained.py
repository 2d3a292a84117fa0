"""Encoders shipped in the package, and how a command-line name becomes an encoder.

``default`` is the 48-bit default encoder trained by ``medret train`` on medmnist-4 (see
docs/results.md for the command and its metrics); ``default-16`` ... ``default-64`` the other
lengths where shipped. A user's checkpoint replaces it with one flag: pass its path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medret.errors import ConfigError
from medret.models.encoder import Encoder, load_encoder

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def shipped() -> dict[str, Path]:
    """``{"default-48": path, ...}`` for every encoder in the package."""
    return {p.stem: p for p in sorted(WEIGHTS.glob("*.npz"))}


def encoder_path(spec: str) -> Path:
    """A shipped name (``default``, ``default-32``), an ``encoder.npz`` or a training output folder."""
    names = shipped()
    name = "default-48" if spec == "default" else spec
    if name in names:
        return names[name]
    p = Path(spec)
    if p.is_dir() and (p / "encoder.npz").is_file():
        return p / "encoder.npz"
    if p.is_file():
        return p
    known = ", ".join(["default", *names]) or "(none shipped)"
    raise ConfigError(f"encoder {spec!r} is neither a file, a training output folder, nor a shipped encoder ({known})")


def resolve_encoder(spec: str, train_images: np.ndarray | None = None) -> Encoder:
    """An encoder from a name or path; ``pca-itq:BITS`` fits the training-free baseline on ``train_images``."""
    if spec.startswith("pca-itq"):
        from medret.models.itq import PCAITQ

        _, _, bits = spec.partition(":")
        if train_images is None:
            raise ConfigError("pca-itq needs training images to fit on")
        try:
            return PCAITQ.fit(train_images, bits=int(bits or 48))
        except ValueError as err:
            raise ConfigError(f"pca-itq:BITS takes a number of bits, got {spec!r}") from err
    return load_encoder(encoder_path(spec))
