"""Pseudo-slides: whole-slide search test files cut from the real H&E slides.

With a handful of real slides, slide-level search can only be checked for consistency: does a
transformed copy of a piece of tissue find that piece again, and do pieces of one slide find
each other? The pieces and their copies are written here as real tiled, pyramidal TIFFs,
so the indexing job reads and tiles them like any other slide.

- **Blocks.** Each H&E slide of ``wsi/`` (:data:`SOURCES`) is cut into non-overlapping
  ``block_px`` x ``block_px`` squares at level 0. The grid holds as many whole blocks as fit
  and is centred in the slide. Each block becomes one pseudo-slide, and its ``label`` is the name
  of the slide it came from. A slide smaller than one block gives none.
- **Copies** (:data:`TRANSFORMS`). ``rot90``/``rot180``/``rot270`` rotate the whole block
  counter-clockwise (``numpy.rot90``), and ``flip`` mirrors it left to right. ``stain`` scales each
  channel's optical density by a factor drawn uniformly from ``[1 - STAIN_AMOUNT, 1 + STAIN_AMOUNT]``
  (seeded per block). ``jpeg`` encodes and decodes the block with Pillow's JPEG at
  :data:`JPEG_QUALITY`. ``orig`` is the block itself.
- **Files** (:func:`write_svs`). Aperio-style SVS: level 0 tiled 256 px, an untiled thumbnail as
  the second page, then tiled levels at downsample 4 and 16 (area averages). The ImageDescription
  starts ``Aperio Image Library`` and has ``|MPP = <the block's mpp>``, so OpenSlide and tiffslide
  both report the pixel size. Compression is ``deflate`` by default, which is lossless: the reader
  gives back the written pixels exactly. ``jpeg`` (quality 90) is what scanners write.

The pixel size of a block is its slide's: the value the file states (CMU-1: 0.499), or the one
:data:`medret.eval.reid.HE_SLIDES` assumes when the file states none (TCGA-CR-7395: 0.25).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.errors import ConfigError
from medret.eval import reid
from medret.io.wsi import open_slide

RGB = npt.NDArray[np.uint8]

BLOCK_PX = 2048
TILE_PX = 256
DOWNSAMPLES = (4, 16)
THUMBNAIL_PX = 768
STAIN_AMOUNT = 0.1
JPEG_QUALITY = 60
COMPRESSIONS = {"deflate": ("zlib", 6), "jpeg": ("jpeg", 90)}
#: the H&E slides blocks are cut from, with the pixel size to assume when the file states none
SOURCES: tuple[tuple[str, float | None], ...] = reid.HE_SLIDES
#: the other files of ``wsi/`` and why no block is cut from them
NOT_CUT: dict[str, str] = {
    **reid.NOT_IN_GALLERY,
    "histolab__kidney-48-5.tif": "IHC (DAB), not H&E; and 1493x901 px, smaller than one block",
}


def _rotation(k: int) -> Callable[[RGB, np.random.Generator], RGB]:
    return lambda rgb, rng: reid.rotate(rgb, k)


def _stain(rgb: RGB, rng: np.random.Generator) -> RGB:
    return reid.stain_jitter(rgb, reid.jitter_factors(rng, 1, STAIN_AMOUNT)[0])


#: name -> f(block, seeded generator): the copies a block gets (``orig`` is the block itself)
TRANSFORM_FNS: dict[str, Callable[[RGB, np.random.Generator], RGB]] = {
    "orig": lambda rgb, rng: rgb,
    "rot90": _rotation(1),
    "rot180": _rotation(2),
    "rot270": _rotation(3),
    "flip": lambda rgb, rng: reid.hflip(rgb),
    "stain": _stain,
    "jpeg": lambda rgb, rng: reid.jpeg(rgb, JPEG_QUALITY),
}
TRANSFORMS: tuple[str, ...] = tuple(t for t in TRANSFORM_FNS if t != "orig")


@dataclass(frozen=True)
class Block:
    """One square cut from a slide at level 0: the pseudo-slide ``block_id``."""

    base: str  # the slide's file name: the pseudo-slide's label
    block_id: str
    x: int
    y: int
    size: int
    mpp: float


def block_origins(dimensions: tuple[int, int], block_px: int) -> list[tuple[int, int]]:
    """Level-0 top-left corners of the whole, non-overlapping blocks that fit, centred; row by row.

    >>> block_origins((4443, 3567), 2048)
    [(173, 759), (2221, 759)]
    >>> block_origins((1493, 901), 2048)
    []
    """
    if block_px <= 0:
        raise ConfigError(f"block_px must be positive, got {block_px}")
    w, h = dimensions
    across, down = w // block_px, h // block_px
    x0, y0 = (w - across * block_px) // 2, (h - down * block_px) // 2
    return [(x0 + c * block_px, y0 + r * block_px) for r in range(down) for c in range(across)]


def cut_blocks(
    data_dir: Path, *, block_px: int = BLOCK_PX, sources: Sequence[tuple[str, float | None]] = SOURCES
) -> Iterator[tuple[Block, RGB]]:
    """Every block of every source slide, with its level-0 pixels, in source then grid order."""
    for name, assumed_mpp in sources:
        with open_slide(Path(data_dir) / "wsi" / name) as slide:
            mpp = slide.mpp[0] if slide.mpp else assumed_mpp
            if mpp is None:
                raise ConfigError(f"{name} states no mpp and none is assumed for it; give one in sources")
            stem = name.rsplit(".", 1)[0]
            for i, (x, y) in enumerate(block_origins(slide.dimensions, block_px)):
                block = Block(name, f"{stem}__b{i}", x, y, block_px, float(mpp))
                yield block, slide.read_region((x, y), 0, (block_px, block_px))


def transform(rgb: RGB, name: str, rng: np.random.Generator) -> RGB:
    """The copy ``name`` (one of :data:`TRANSFORM_FNS`) of a block."""
    if name not in TRANSFORM_FNS:
        raise ConfigError(f"transform must be one of {', '.join(TRANSFORM_FNS)}, got {name!r}")
    return np.ascontiguousarray(TRANSFORM_FNS[name](rgb, rng))


def reduce(rgb: RGB, factor: int) -> RGB:
    """``rgb`` shrunk ``factor`` times by area averaging (Pillow's reduce; a partial last cell averages what it has)."""
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).reduce(factor)) if factor > 1 else rgb


def aperio_description(width: int, height: int, mpp: float, tile_px: int, compression: str, note: str = "") -> str:
    """An ImageDescription that OpenSlide's and tifffile's Aperio parsers read: a header line, then ``|key = value``."""
    head = f"Aperio Image Library medret-pseudoslide\r\n{width}x{height} ({tile_px}x{tile_px}) {compression.upper()}"
    return f"{head}{note}|MPP = {mpp:.6g}"


def write_svs(
    path: Path,
    rgb: RGB,
    mpp: float,
    *,
    compression: str = "deflate",
    tile_px: int = TILE_PX,
    downsamples: Sequence[int] = DOWNSAMPLES,
) -> None:
    """Write ``rgb`` (h, w, 3) as an Aperio-style pyramidal SVS of pixel size ``mpp``.

    Pages: level 0 (tiled), the thumbnail (untiled: the page readers take for it), then one tiled
    page per downsample.
    """
    import tifffile

    if compression not in COMPRESSIONS:
        raise ConfigError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ConfigError(f"rgb must be uint8 of shape (h, w, 3), got {rgb.dtype} {rgb.shape}")
    if mpp <= 0 or tile_px <= 0 or tile_px % 16:
        raise ConfigError(f"mpp must be positive and tile_px a positive multiple of 16, got {mpp}, {tile_px}")
    codec, level = COMPRESSIONS[compression]
    h, w = rgb.shape[:2]
    thumb_factor = max(1, -(-max(h, w) // THUMBNAIL_PX))
    pages: list[tuple[RGB, bool, str]] = [(rgb, True, "")]
    pages.append((reduce(rgb, thumb_factor), False, f" -> thumbnail {-(-w // thumb_factor)}x{-(-h // thumb_factor)}"))
    pages += [(reduce(rgb, d), True, f" -> {-(-w // d)}x{-(-h // d)}") for d in downsamples]
    options: dict[str, Any] = {"photometric": "rgb", "compression": codec, "compressionargs": {"level": level}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for data, tiled, note in pages:
            ph, pw = data.shape[:2]
            tif.write(
                data,
                tile=(tile_px, tile_px) if tiled else None,
                description=aperio_description(pw, ph, mpp * w / pw, tile_px, compression, note),
                resolution=(1e4 / (mpp * w / pw), 1e4 / (mpp * h / ph)),
                resolutionunit="CENTIMETER",
                metadata=None,
                **options,
            )


def write_pseudo_slides(
    out_dir: str | Path,
    data_dir: str | Path,
    transforms: Sequence[str] = TRANSFORMS,
    seed: int = 0,
    *,
    block_px: int = BLOCK_PX,
    compression: str = "deflate",
    sources: Sequence[tuple[str, float | None]] = SOURCES,
    labels_csv: bool = True,
) -> list[dict[str, Any]]:
    """Write every block of the H&E slides and its ``transforms`` copies to ``out_dir``; the manifest.

    Files are ``<block_id>__<transform>.svs`` (the block itself: ``orig``). One manifest row per
    file: path, slide_id (the file name), block_id, base (the source slide), label (= base),
    transform, level-0 x/y/size of the block in its base slide, and mpp. With ``labels_csv``,
    ``labels.csv`` (path,label,group: group is the block) is written beside them: the indexing job
    reads it as a sidecar. Deterministic: the same arguments write the same pixels.
    """
    names = ["orig", *(t for t in transforms if t != "orig")]
    for t in names:
        if t not in TRANSFORM_FNS:
            raise ConfigError(f"transform must be one of {', '.join(TRANSFORM_FNS)}, got {t!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for b, (block, rgb) in enumerate(cut_blocks(Path(data_dir), block_px=block_px, sources=sources)):
        for name in names:
            rng = np.random.default_rng([seed, b, list(TRANSFORM_FNS).index(name)])
            path = out / f"{block.block_id}__{name}.svs"
            write_svs(path, transform(rgb, name, rng), block.mpp, compression=compression)
            rows.append(
                {
                    "path": str(path),
                    "slide_id": path.name,
                    "block_id": block.block_id,
                    "base": block.base,
                    "label": block.base,
                    "transform": name,
                    "x": block.x,
                    "y": block.y,
                    "size": block.size,
                    "mpp": block.mpp,
                }
            )
    if labels_csv:
        with open(out / "labels.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "group"])
            w.writerows([Path(r["path"]).name, r["label"], r["block_id"]] for r in rows)
    return rows
