"""Training augmentations by name: ``(x, generator) -> x'`` on float (N, C, H, W) batches in [0, 1].

Every random number comes from ``generator`` (drawn on its device, in a fixed order), so a
batch and a seeded generator give the same result every time. Output keeps shape and range.

- ``medmnist``: :func:`medret.train.data.augment` (shift, rotation, scale, contrast).
- ``anatomy``: the same, smaller; never a flip (left and right anatomy differ).
- ``histology``: one of the 8 dihedral transforms per image (a slide has no up or left),
  stain jitter in optical-density space, a little brightness.
- ``none``: the batch as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from medret.registry import Registry
from medret.train.data import augment

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
AUGMENTATIONS: Registry[torch.Tensor] = Registry("augmentation")

#: transmission of an empty pixel is 1; darker than this is clipped before the log
_MIN_LIGHT = 1.0 / 255.0


def _uniform(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Uniform in [-1, 1), drawn on the generator's device."""
    return torch.rand(*shape, generator=generator, device=generator.device) * 2 - 1


@AUGMENTATIONS.register("medmnist")
def medmnist(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return augment(x, generator)


@AUGMENTATIONS.register("anatomy")
def anatomy(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift up to 6% of the image, rotate up to 8 degrees, scale and contrast by a little; no flips."""
    return augment(x, generator, shift=0.06, rotate=8.0)


@AUGMENTATIONS.register("none")
def none(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x


def dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image through one of the 8 rotations/flips of the square (4 of the rectangle when H != W)."""
    pick = torch.randint(0, 8, (len(x),), generator=generator, device=generator.device).to(x.device)
    square = x.shape[2] == x.shape[3]
    out = x.clone()
    for d in range(8):
        idx = torch.nonzero(pick == d).flatten()
        if not len(idx):
            continue
        quarter, flip = d % 4, d >= 4
        if not square:
            quarter = 2 * (quarter % 2)  # 0 or a half turn
        y = x[idx].flip(3) if flip else x[idx]
        out[idx] = torch.rot90(y, quarter, dims=(2, 3)) if quarter else y
    return out


def stain_jitter(
    x: torch.Tensor, generator: torch.Generator, *, scale: float = 0.08, shift: float = 0.02
) -> torch.Tensor:
    """Per image and channel: optical density ``-log(I)`` times ``1 ± scale`` plus ``± shift``, back to light."""
    n, c = x.shape[:2]
    u = _uniform(generator, 2, n, c, 1, 1).to(x.device, x.dtype)
    od = -torch.log(x.clamp(min=_MIN_LIGHT))
    od = (od * (1 + scale * u[0]) + shift * u[1]).clamp(min=0)
    return torch.exp(-od)


@AUGMENTATIONS.register("histology")
def histology(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Dihedral transform, stain jitter (±8% optical density per channel, ±0.02 offset), brightness ±5%."""
    x = stain_jitter(dihedral(x, generator), generator)
    gain = 1 + 0.05 * _uniform(generator, len(x), 1, 1, 1).to(x.device, x.dtype)
    return (x * gain).clamp_(0, 1)


def get_augmentation(name: str) -> Augmentation:
    """The augmentation called ``name``; an unknown name lists the known ones."""
    return AUGMENTATIONS.get(name)
