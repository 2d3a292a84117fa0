"""A slide's mosaic: the few tiles that stand for the whole slide in slide-level search.

The tiles are clustered (by their codes, or by their mean colour), and each cluster gives a
few tiles spread over the slide, so that the bag covers both what the slide holds and where.

The rules, in order:

1. **Canonical order.** The tiles are first sorted by ``(tile_y, tile_x, code bytes)`` (then
   colour, when clustering by colour) and everything below works in that order, so the result
   does not depend on the order the caller lists the tiles in. Only tiles identical in all of
   those are interchangeable.
2. **Small slides use all their tiles**: a slide with at most ``clusters * min_per_cluster``
   tiles, the fewest picks the mosaic asks for, keeps every tile.
3. **Clusters.** Seeded k-means (k-means++ start, at most :data:`KMEANS_ITERATIONS` Lloyd
   rounds) on the unpacked code bits (``by="code"``) or on the colour (``by="colour"``).
4. **Picks per cluster**: ``ceil(fraction * size)`` clamped to ``[min_per_cluster, size]``.
5. **Cap.** When the picks add up to more than ``max_per_slide``, each cluster keeps
   ``min(min_per_cluster, size)`` and the rest of the budget is shared in proportion to each
   cluster's picks above that floor (largest remainders first; equal remainders go to the
   larger share, then to the lower cluster number).
6. **Spatial spread.** Within a cluster, farthest-point sampling on ``(tile_x, tile_y)``: first
   the tile nearest the cluster's centroid, then each time the tile farthest from those already
   picked (ties to the first in canonical order). The picks are a prefix of that sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from medret.errors import ConfigError, SchemaError

KMEANS_ITERATIONS = 30


@dataclass(frozen=True)
class MosaicConfig:
    """How a slide's mosaic is chosen (recorded with the bags, so a rerun picks the same tiles)."""

    clusters: int = 9
    fraction: float = 0.05
    min_per_cluster: int = 1
    max_per_slide: int = 64
    by: Literal["code", "colour"] = "code"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clusters < 1:
            raise ConfigError(f"clusters must be at least 1, got {self.clusters}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_per_cluster < 1:
            raise ConfigError(f"min_per_cluster must be at least 1, got {self.min_per_cluster}")
        if self.clusters * self.min_per_cluster > self.max_per_slide:
            raise ConfigError(
                f"max_per_slide={self.max_per_slide} cannot hold min_per_cluster={self.min_per_cluster} "
                f"from each of {self.clusters} clusters; raise max_per_slide or lower the others"
            )
        if self.by not in ("code", "colour"):
            raise ConfigError(f"by must be 'code' or 'colour', got {self.by!r}")


def select_mosaic(
    codes: npt.NDArray[np.uint8],
    xy: npt.ArrayLike,
    colour: npt.ArrayLike | None = None,
    config: MosaicConfig | None = None,
) -> npt.NDArray[np.int64]:
    """Indices (into the caller's order) of the tiles that make the slide's mosaic.

    ``codes`` are the tiles' packed codes (n, bytes), ``xy`` their ``(tile_x, tile_y)`` at
    level 0 (n, 2), ``colour`` an optional mean colour per tile (n, channels). The indices
    come in canonical order (see the module docstring), so permuting the input permutes
    nothing in the output's tiles.

    >>> codes = np.array([[0], [0], [255], [255]], dtype=np.uint8)
    >>> xy = np.array([[0, 0], [224, 0], [0, 224], [224, 224]])
    >>> select_mosaic(codes, xy, config=MosaicConfig(clusters=2, max_per_slide=2)).tolist()
    [0, 2]
    """
    config = config or MosaicConfig()
    codes, pos, col = _validated(codes, xy, colour, config)
    order = _canonical_order(codes, pos, col)
    n = len(order)
    if n <= config.clusters * config.min_per_cluster:
        return order
    codes, pos = codes[order], pos[order]
    features = np.unpackbits(codes, axis=1).astype(np.float64) if col is None else col[order]
    labels = _kmeans(features, config.clusters, np.random.default_rng(config.seed))
    members = [np.flatnonzero(labels == c) for c in range(config.clusters)]
    members = [m for m in members if len(m)]
    sizes = np.array([len(m) for m in members], np.int64)
    wanted = np.clip(np.ceil(config.fraction * sizes).astype(np.int64), config.min_per_cluster, sizes)
    counts = _capped(wanted, np.minimum(sizes, config.min_per_cluster), config.max_per_slide)
    picked = [m[_spread(pos[m], int(c))] for m, c in zip(members, counts, strict=True)]
    return order[np.sort(np.concatenate(picked))]


def _validated(
    codes: npt.NDArray[np.uint8], xy: npt.ArrayLike, colour: npt.ArrayLike | None, config: MosaicConfig
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64], npt.NDArray[np.float64] | None]:
    c = np.asarray(codes)
    if c.dtype != np.uint8 or c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise SchemaError(f"codes must be packed uint8 of shape (n >= 1, bytes), got {c.dtype} {c.shape}")
    pos = np.asarray(xy, dtype=np.float64)
    if pos.shape != (len(c), 2) or not np.isfinite(pos).all():
        raise SchemaError(f"xy must be finite (tile_x, tile_y) of shape ({len(c)}, 2), got {pos.shape}")
    if colour is None:
        if config.by == "colour":
            raise ConfigError("by='colour' needs the tiles' mean colour; pass colour=(n, channels) or use by='code'")
        return c, pos, None
    col = np.asarray(colour, dtype=np.float64)
    if col.ndim != 2 or len(col) != len(c) or not np.isfinite(col).all():
        raise SchemaError(f"colour must be finite of shape ({len(c)}, channels), got {col.shape}")
    return c, pos, col if config.by == "colour" else None


def _canonical_order(
    codes: npt.NDArray[np.uint8], pos: npt.NDArray[np.float64], colour: npt.NDArray[np.float64] | None
) -> npt.NDArray[np.int64]:
    """Positions sorted by (tile_y, tile_x, code bytes, colour): the order everything else uses."""
    keys: list[npt.NDArray[np.generic]] = [] if colour is None else list(colour.T[::-1])
    keys += [*codes.T[::-1], pos[:, 0], pos[:, 1]]  # lexsort: the last key is the primary one
    return np.lexsort(keys).astype(np.int64)


def _kmeans(x: npt.NDArray[np.float64], k: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Cluster labels of the rows of ``x``: k-means++ start, then Lloyd rounds until stable.

    Fewer than ``k`` clusters come out when ``x`` has fewer distinct rows. Distances are
    computed one centre at a time (no BLAS), so a rerun on the same rows gives the same labels.
    """
    centres = [x[rng.integers(len(x))]]
    d2 = _sq_dist(x, centres[0])
    while len(centres) < k and (total := d2.sum()) > 0:
        centres.append(x[rng.choice(len(x), p=d2 / total)])
        d2 = np.minimum(d2, _sq_dist(x, centres[-1]))
    c = np.array(centres)
    labels = np.full(len(x), -1, np.int64)
    for _ in range(KMEANS_ITERATIONS):
        new = np.argmin(np.stack([_sq_dist(x, centre) for centre in c], axis=1), axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(len(c)):
            rows = labels == j
            if rows.any():  # an emptied cluster keeps its centre and stays empty
                c[j] = x[rows].mean(axis=0)
    return labels


def _sq_dist(x: npt.NDArray[np.float64], centre: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.square(x - centre).sum(axis=1)


def _capped(wanted: npt.NDArray[np.int64], floor: npt.NDArray[np.int64], cap: int) -> npt.NDArray[np.int64]:
    """Per-cluster picks that add up to at most ``cap``: the floor, plus a proportional share of the rest."""
    if wanted.sum() <= cap:
        return wanted
    extra = wanted - floor
    budget = cap - int(floor.sum())
    total = int(extra.sum())
    share, remainder = np.divmod(budget * extra, total)  # integers: no rounding to disagree about
    left = budget - int(share.sum())
    first = np.lexsort((np.arange(len(extra)), -share, -remainder))[:left]
    share[first] += 1
    return floor + share


def _spread(pos: npt.NDArray[np.float64], count: int) -> npt.NDArray[np.int64]:
    """Farthest-point sampling: ``count`` rows of ``pos``, from the one nearest the centroid outwards."""
    picks = np.empty(count, np.int64)
    if count == 0:
        return picks
    picks[0] = int(np.argmin(_sq_dist(pos, pos.mean(axis=0))))  # argmin: ties to the first row
    nearest = _sq_dist(pos, pos[picks[0]])
    nearest[picks[0]] = -1.0  # a picked row is never picked again, even where tiles share a place
    for r in range(1, count):
        picks[r] = int(np.argmax(nearest))  # argmax: ties to the first row
        nearest = np.minimum(nearest, _sq_dist(pos, pos[picks[r]]))
        nearest[picks[r]] = -1.0  # and -1 stays the minimum from here on
    return picks
