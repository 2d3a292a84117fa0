"""The encoder contract: one config object that says exactly how codes were made.

The index stores it in the table's schema metadata; the query path rebuilds the
identical preprocessing and encoder from it. Two configs with the same
:attr:`EncoderConfig.encoder_id` produce comparable codes; any other pair does not.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator

from medret.config import Frozen
from medret.errors import DataError
from medret.registry import Registry


class EncoderConfig(Frozen):
    """Everything needed to reproduce a code from an image."""

    name: str = Field(description="registered encoder name, e.g. 'pca-itq'")
    architecture: str = Field(default="", description="registered backbone; its arguments in extra['arch']")
    bits: int = Field(ge=8, le=1024)
    input_size: tuple[int, int] = (28, 28)
    channels: int = Field(default=1, ge=1, le=4)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    modality: str = "any"
    preprocess: str = Field(default="medmnist", description="registered preprocessing recipe")
    method: str = Field(default="", description="training method that produced the weights")
    version: str = "1"
    weights_sha256: str = Field(default="", description="digest of the weights file; part of the id")
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("bits")
    @classmethod
    def _bits_bytes(cls, v: int) -> int:
        if v % 8:
            raise ValueError("must be a multiple of 8 (codes are stored as packed bytes)")
        return v

    @property
    def code_bytes(self) -> int:
        return self.bits // 8

    @property
    def encoder_id(self) -> str:
        """A short stable digest of the whole config, weights digest included."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return f"{self.name}-{self.bits}b-{hashlib.sha256(payload).hexdigest()[:12]}"

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> EncoderConfig:
        return cls.model_validate_json(text)


class Encoder(Protocol):
    """What every encoder offers: continuous features, then packed binary codes."""

    config: EncoderConfig

    def forward_features(self, images: npt.NDArray[Any]) -> npt.NDArray[np.float32]: ...

    def encode(self, images: npt.NDArray[Any]) -> npt.NDArray[np.uint8]: ...

    def save(self, path: str | os.PathLike[str]) -> EncoderConfig: ...


ENCODERS: Registry[Encoder] = Registry("encoder")


def config_in(z: Any, label: object) -> EncoderConfig:
    """The :class:`EncoderConfig` inside an open checkpoint archive (``np.load`` of an ``encoder.npz``)."""
    try:
        return EncoderConfig.from_json(bytes(z["config"]))
    except (KeyError, ValueError) as err:
        raise DataError(f"{label}: not a medret encoder checkpoint (no valid config): {err}") from err


def checkpoint_config(path: str | os.PathLike[str]) -> EncoderConfig:
    """The config of the encoder checkpoint at ``path``, without loading its weights."""
    import zipfile

    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            return config_in(z, p)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{p}: not a medret encoder checkpoint: {err}") from err


def load_encoder(path: str | os.PathLike[str]) -> Encoder:
    """Load a checkpoint written by an encoder's ``save``; its config names the factory."""
    p = Path(path)
    config = checkpoint_config(p)
    if config.name not in ENCODERS and config.name in _LAZY:
        importlib.import_module(_LAZY[config.name])  # registers it (and imports torch only now)
    return ENCODERS.get(config.name)(path=p)


_LAZY = {"hashnet": "medret.models.hashnet"}
