"""The deep hashing encoder: backbone -> continuous features -> hash layer -> tanh -> sign bits.

A code may have two parts: ``bits - fine_bits`` **semantic** bits from the trained hash layer,
then ``fine_bits`` **similarity** bits, an ITQ projection of the backbone features fitted after
training (:meth:`HashNet.fit_fine`). Semantic bits put each class in its own Hamming
neighbourhood; similarity bits order the items inside it by visual similarity, where a code
without them would leave long runs of exact ties.

:class:`HashNet` is the torch module every training method trains. :class:`TorchHashEncoder`
is the numpy-facing :class:`~medret.models.encoder.Encoder` built from a checkpoint: its
config names the backbone and its arguments, so a checkpoint rebuilds itself. Weights are
stored as plain arrays in an ``.npz`` (no pickle): loading a checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from medret.errors import DataError
from medret.models.backbones import create_backbone
from medret.models.codes import pack_bits
from medret.models.encoder import ENCODERS, EncoderConfig, config_in


class HashNet(nn.Module):
    """``forward`` returns ``(features, code)``: backbone features and tanh codes in (-1, 1)."""

    mean: torch.Tensor
    std: torch.Tensor
    fine_mean: torch.Tensor
    fine_proj: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        bits: int,
        *,
        n_classes: int = 0,
        fine_bits: int = 0,
        mean: tuple[float, ...] = (0.5,),
        std: tuple[float, ...] = (0.25,),
    ) -> None:
        super().__init__()
        if not 0 <= fine_bits < bits:
            raise ValueError(f"fine_bits must be in [0, bits), got {fine_bits} of {bits}")
        self.backbone = backbone
        out_dim = backbone.out_dim
        assert isinstance(out_dim, int), "a backbone declares its out_dim"
        self.hash = nn.Linear(out_dim, bits - fine_bits)
        self.classifier = nn.Linear(bits - fine_bits, n_classes) if n_classes else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("fine_mean", torch.zeros(out_dim))
        self.register_buffer("fine_proj", torch.zeros(out_dim, fine_bits))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in [0, 1] -> the backbone's input."""
        return (x - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalise(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, semantic code)``: what the training losses see."""
        features = self.forward_features(x)
        return features, torch.tanh(self.hash(features))

    def forward_code(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, full code)``: semantic bits then similarity bits, all in (-1, 1)."""
        features, code = self(x)
        if self.fine_proj.shape[1]:
            code = torch.cat([code, torch.tanh((features - self.fine_mean) @ self.fine_proj)], dim=1)
        return features, code

    @torch.no_grad()
    def fit_fine(self, features: torch.Tensor, *, seed: int = 0) -> None:
        """Fit the similarity bits: ITQ on (a sample of) training features."""
        from medret.models.itq import itq_projection

        m = self.fine_proj.shape[1]
        if m:
            mean, proj = itq_projection(features.float().cpu().numpy(), m, seed=seed)
            self.fine_mean.copy_(torch.from_numpy(mean))
            self.fine_proj.copy_(torch.from_numpy(proj))

    @torch.no_grad()
    def balance_bits(self, features: torch.Tensor) -> None:
        """Move each hash bit's threshold to its median over ``features``: every bit then splits them in half.

        Folded into the hash layer's bias, so the encoder stays a plain network (and its ONNX export too).
        A method whose loss leaves bits nearly constant (DNHN) wastes them: constant bits make exact ties.
        """
        median = self.hash(features.float()).median(dim=0).values
        self.hash.bias.sub_(median)

    def classify(self, code: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("this HashNet has no classifier head (n_classes=0)")
        return self.classifier(code)


def build_hashnet(config: EncoderConfig) -> HashNet:
    """The module a config describes (random weights)."""
    arch = dict(config.extra.get("arch", {}))
    backbone = create_backbone(config.architecture, config.channels, arch)
    return HashNet(
        backbone,
        config.bits,
        n_classes=int(config.extra.get("n_classes", 0)),
        fine_bits=int(config.extra.get("fine_bits", 0)),
        mean=config.mean,
        std=config.std,
    )


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def to_input(images: npt.NDArray[Any], config: EncoderConfig) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float (N, C, H, W) in [0, 1], checked against the config."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        a = np.moveaxis(a, 3, 1)
    else:
        raise DataError(f"{config.name}: images must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
    want = (config.channels, *config.input_size)
    if a.shape[1:] != want:
        raise DataError(
            f"{config.name}: this encoder takes {want[1]}x{want[2]} images with {want[0]} channel(s) "
            f"(recipe {config.preprocess!r}), got {a.shape[2]}x{a.shape[3]} with {a.shape[1]}"
        )
    scale = 255.0 if a.dtype == np.uint8 else 1.0
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / scale)


@ENCODERS.register("hashnet")
class TorchHashEncoder:
    """Numpy in, numpy out; runs on CPU (or ``device``) in batches, in eval mode."""

    def __init__(
        self,
        config: EncoderConfig | None = None,
        module: HashNet | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        batch_size: int = 1024,
    ) -> None:
        if path is not None:
            config, module = self._read(Path(path))
        if config is None:
            raise ValueError("TorchHashEncoder needs config (and a module) or path=")
        self.config = config
        self.module = (module if module is not None else build_hashnet(config)).to(device).eval()
        self.device = device
        self.batch_size = batch_size

    @staticmethod
    def _read(p: Path) -> tuple[EncoderConfig, HashNet]:
        with np.load(p, allow_pickle=False) as z:
            config = config_in(z, p)
            state = {k[len("state/") :]: torch.from_numpy(np.array(z[k])) for k in z.files if k.startswith("state/")}
        module = build_hashnet(config)
        try:
            module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        except RuntimeError as err:
            raise DataError(f"{p}: weights do not fit the architecture its config describes: {err}") from err
        if config.weights_sha256 and state_digest(module.state_dict()) != config.weights_sha256:
            raise DataError(f"{p}: weights digest does not match its config (file damaged or edited)")
        return config, module

    @classmethod
    def from_module(cls, module: HashNet, config: EncoderConfig) -> TorchHashEncoder:
        """Wrap a trained module, stamping the weights digest into its config."""
        module = module.cpu().eval()
        digest = state_digest(module.state_dict())
        return cls(config.model_copy(update={"weights_sha256": digest}), module)

    def _both(self, images: npt.NDArray[Any]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Backbone features and continuous codes of ``images``, in one pass."""
        x = to_input(images, self.config)
        self.module.eval()  # batch statistics never leak into codes, whatever touched the module before
        feats, codes = [], []
        with torch.inference_mode():
            for i in range(0, len(x), self.batch_size):
                features, code = self.module.forward_code(x[i : i + self.batch_size].to(self.device))
                feats.append(features.float().cpu().numpy())
                codes.append(code.float().cpu().numpy())
        if not feats:
            return np.zeros((0, self.module.hash.in_features), np.float32), np.zeros((0, self.config.bits), np.float32)
        return np.concatenate(feats), np.concatenate(codes)

    def _batches(self, images: npt.NDArray[Any], which: str) -> npt.NDArray[np.float32]:
        features, code = self._both(images)
        return features if which == "features" else code

    def encode_with_features(self, images: npt.NDArray[Any]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
        """Packed codes and backbone features, one model pass (the indexing job keeps both)."""
        features, code = self._both(images)
        return pack_bits(code), features

    def forward_features(self, images: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Continuous backbone features (for re-ranking and inspection)."""
        return self._batches(images, "features")

    def forward_code(self, images: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Continuous codes in (-1, 1), before the sign."""
        return self._batches(images, "code")

    def encode(self, images: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        return pack_bits(self.forward_code(images))

    def save(self, path: str | os.PathLike[str]) -> EncoderConfig:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        state = {f"state/{k}": v.detach().cpu().numpy() for k, v in self.module.state_dict().items()}
        with p.open("wb") as f:
            np.savez(f, config=np.frombuffer(self.config.to_json().encode(), np.uint8), **state)
        return self.config
