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
the ``frozen-selfsup`` fit makes its views with it. For slide tiles whose place is known,
:class:`SlideViews` moves the field of view by reading the slide again.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from medret.registry import Registry
from medret.train.data import augment

if TYPE_CHECKING:
    from medret.io.wsi import Slide
    from medret.methods.frozen_selfsup import ViewMaker
    from medret.preprocess.wsi.tiling import TileAt, TilingConfig

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
log = logging.getLogger(__name__)
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


class SlideViews:
    """A slide tile's field of view moved and rescaled by reading it again from its slide.

    Called as ``(x, generator, at)``: ``x`` the batch (N, C, H, W) in [0, 1], ``at`` each image's
    :class:`~medret.preprocess.wsi.tiling.TileAt` or None. A tile with a place is read again with its centre
    moved by up to ``shift`` of its side along each axis, at a pixel size up to ``scale`` off the tiling's
    (0.45-0.55 mpp for 0.5), so the tissue that comes into view is the slide's own; other images get
    :func:`field_jitter`. ``open_slide(at)`` opens a tile's slide (kept open by the caller's cache);
    ``to_input`` turns RGB tiles (N, h, w, 3) uint8 into the encoder's input, (N, H, W) or (N, H, W, C).
    ``reads`` counts the views read from slides. A slide that cannot be read (damaged, or gone since the
    cache was made) is bad data, not a reason to lose the fit: the tile's view falls back to
    :func:`field_jitter`, with a warning naming the slide and the place, and ``fallbacks`` counts them.
    A store that fails is not bad data: its error stops the fit.
    """

    def __init__(
        self,
        open_slide: Callable[[TileAt], Slide],
        tiling: TilingConfig,
        to_input: Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.float32]],
        *,
        shift: float = 0.25,
        scale: float = 0.10,
    ) -> None:
        if not 0 <= shift <= 1 or not 0 <= scale < 1:
            raise ValueError(f"shift must be in [0, 1] and scale in [0, 1), got {shift} and {scale}")
        self.open_slide, self.tiling, self.to_input = open_slide, tiling, to_input
        self.shift, self.scale = shift, scale
        self.reads = self.fallbacks = 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator, at: Sequence[TileAt | None]) -> torch.Tensor:
        from medret.errors import ObjectNotFoundError, ReadError
        from medret.preprocess.wsi.tiling import read_moved

        if len(at) != len(x):
            raise ValueError(f"{len(x)} images but {len(at)} places")
        if all(a is None for a in at):  # nothing to read: the same draws as any other image's views
            return field_jitter(x, generator)
        u = _uniform(generator, len(x), 3).double().cpu().numpy()
        t, out = self.tiling, x.clone()
        placed, reads = [], []
        for i, place in enumerate(at):
            if place is None:
                continue
            dx, dy = self.shift * t.tile_px * u[i, :2]
            mpp = t.mpp * (1 + self.scale * u[i, 2])
            try:
                reads.append(read_moved(self.open_slide(place), place.x, place.y, t, dx=dx, dy=dy, mpp=mpp))
            except (ReadError, ObjectNotFoundError) as err:
                self.fallbacks += 1
                reason = err.reason if isinstance(err, ReadError) else "no such object"
                log.warning("%s: cannot read the view at (%d, %d) (%s); moved in its own pixels", place.slide,
                            place.x, place.y, reason)  # fmt: skip
                continue
            placed.append(i)
        if placed:
            inputs = torch.from_numpy(np.ascontiguousarray(self.to_input(np.stack(reads))))
            inputs = inputs[:, None] if inputs.ndim == 3 else inputs.permute(0, 3, 1, 2)
            out[placed] = inputs.to(x.device, x.dtype)
            self.reads += len(placed)
        rest = sorted(set(range(len(x))) - set(placed))
        if rest:
            out[rest] = field_jitter(x[rest], generator)
        return out


def rescan(augmentation: Augmentation, field: SlideViews | None = None) -> ViewMaker:
    """``augmentation`` between what a rescan changes: the field of view first (``field``, for slide tiles
    with a place, else :func:`field_jitter`), the compression last (:func:`jpeg_jitter`). The result is called
    ``(x, generator, at)`` with each image's place (or None)."""

    def views(x: torch.Tensor, generator: torch.Generator, at: Sequence[Any]) -> torch.Tensor:
        moved = field(x, generator, at) if field is not None else field_jitter(x, generator)
        return jpeg_jitter(augmentation(moved, generator), generator)

    return views
