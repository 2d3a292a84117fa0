"""Training augmentations by name: ``(x, generator) -> x'`` on float (N, C, H, W) batches in [0, 1].

Every random number comes from ``generator`` (drawn on its device, in a fixed order), so a
batch and a seeded generator give the same result every time. Output keeps shape and range.

- ``medmnist``: :func:`medret.train.data.augment` (shift, rotation, scale, contrast).
- ``anatomy``: the same, smaller; never a flip (left and right anatomy differ).
- ``histology``: one of the 8 dihedral transforms per image (a slide has no up or left),
  stain jitter in optical-density space, a little brightness.
- ``none``: the batch as it is.

:func:`rescan` is not a training augmentation of its own: it adds, on top of one, what scanning the
same tissue or film again changes (the field of view moved and scaled, a JPEG of another quality);
the ``frozen-selfsup`` fit makes its views with it.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

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


def field_jitter(
    x: torch.Tensor, generator: torch.Generator, *, scale: float = 0.13, shift: float = 0.25
) -> torch.Tensor:
    """The field of view moved by up to ``shift`` of the image's side along each axis and scaled by up to
    ``1 ± scale``; what comes into view beyond the edge is the image mirrored (reflection padding)."""
    n = len(x)
    u = _uniform(generator, n, 3).to(x.device, x.dtype)
    side = 1 + scale * u[:, 0]
    zero = torch.zeros_like(side)
    # affine_grid's coordinates span [-1, 1]: a move of ``shift`` of the side is 2 * shift
    theta = torch.stack(
        [torch.stack([side, zero, 2 * shift * u[:, 1]], 1), torch.stack([zero, side, 2 * shift * u[:, 2]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="reflection").clamp_(0, 1)


def jpeg_jitter(x: torch.Tensor, generator: torch.Generator, *, quality: tuple[int, int] = (40, 95)) -> torch.Tensor:
    """Each image through Pillow's JPEG at a quality drawn uniformly from ``quality`` (inclusive); 1 or 3 channels."""
    from PIL import Image

    if x.shape[1] not in (1, 3):
        raise ValueError(f"JPEG takes 1 or 3 channels, got {x.shape[1]}")
    low, high = quality
    q = torch.randint(low, high + 1, (len(x),), generator=generator, device=generator.device).tolist()
    pixels = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img, qq in zip(pixels, q, strict=True):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(buf, format="JPEG", quality=qq)
        buf.seek(0)
        back = np.asarray(Image.open(buf).convert("L" if img.shape[2] == 1 else "RGB"))
        out.append(back.reshape(img.shape))
    return (torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255).contiguous()


def rescan(augmentation: Augmentation) -> Augmentation:
    """``augmentation`` between what a rescan changes: the field of view first (:func:`field_jitter`), the
    compression last (:func:`jpeg_jitter`)."""

    def views(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return jpeg_jitter(augmentation(field_jitter(x, generator), generator), generator)

    return views
