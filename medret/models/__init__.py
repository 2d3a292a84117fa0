"""Encoders and binary codes. Importing this registers the built-in encoders."""

from medret.models import itq as _itq  # noqa: F401  (registers "pca-itq")
from medret.models.encoder import ENCODERS, Encoder, EncoderConfig, load_encoder

__all__ = ["ENCODERS", "Encoder", "EncoderConfig", "load_encoder"]
