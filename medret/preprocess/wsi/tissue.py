"""Tissue detection on a thumbnail: Otsu on saturation (brightfield) or brightness (fluorescence)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def otsu(values: npt.NDArray[np.floating], bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample in [0, 1].

    >>> import numpy as np
    >>> 0.1 < otsu(np.r_[np.full(50, 0.1), np.full(50, 0.9)]) < 0.9
    True
    """
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    omega = np.cumsum(p)
    mu = np.cumsum(p * (edges[:-1] + edges[1:]) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    return float(edges[int(np.nanargmax(between)) + 1])


def saturation(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    x = rgb.astype(np.float32) / 255.0
    hi, lo = x.max(axis=-1), x.min(axis=-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0).astype(np.float32)


def is_fluorescence(rgb: npt.NDArray[np.uint8]) -> bool:
    """Dark-background slides (fluorescence) need the opposite rule from brightfield ones."""
    return float(np.median(rgb.mean(axis=-1))) < 60.0


def tissue_mask(
    rgb: npt.NDArray[np.uint8], *, min_saturation: float = 0.05, closing: int = 2, min_area: float = 0.0005
) -> npt.NDArray[np.bool_]:
    """Boolean tissue mask of an RGB thumbnail, cleaned by closing, hole filling and small-object removal."""
    from scipy import ndimage

    if is_fluorescence(rgb):
        grey = rgb.astype(np.float32).max(axis=-1) / 255.0
        mask = grey > max(otsu(grey.ravel()), 0.02)
    else:
        sat = saturation(rgb)
        grey = rgb.astype(np.float32).mean(axis=-1) / 255.0
        mask = (sat > max(otsu(sat.ravel()), min_saturation)) & (grey < 0.95) & (grey > 0.05)
    if closing:
        mask = ndimage.binary_closing(mask, iterations=closing)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        keep = sizes >= min_area * mask.size
        mask = keep[labels]
    return np.asarray(mask, dtype=bool)


def tissue_fraction(rgb: npt.NDArray[np.uint8], *, min_saturation: float = 0.05) -> float:
    """Share of a tile's pixels that look like tissue (per-tile background rejection)."""
    if is_fluorescence(rgb):
        return float((rgb.max(axis=-1) > 10).mean())
    grey = rgb.mean(axis=-1)
    return float(((saturation(rgb) > min_saturation) & (grey < 235) & (grey > 10)).mean())
