"""A sketch (a mask per lesion class at one template level) -> the top patients, exactly.

Every stored slice of the asked classes within ``tolerance`` levels is scored: Dice with the
sketch of its class (from Hamming distance, :mod:`medret.sketch.score`), plus
``region_weight`` x the overlap of the two region profiles (0 by default: pure Dice). With
several classes a slice (patient, level) scores the mean over the sketched classes (a class the
slice lacks scores 0). Only slices that overlap the sketch (Dice > 0) are results. Each patient keeps
its best slice; ties go to the earlier stored row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.errors import ConfigError, DataError
from medret.sketch import regions
from medret.sketch.encoder import LesionEncoder, LesionSlice
from medret.sketch.score import best_per_patient, dice_scores, rank_slices
from medret.sketch.store import LesionSnapshot


@dataclass(frozen=True)
class SketchOptions:
    k: int = 10
    tolerance: int = 1  # levels either side of the sketch's level
    region_weight: float = 0.0
    slice_pool: int = 0  # > 0: the paper's "top slices first" (e.g. 200); 0: every slice

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 1000:
            raise ConfigError(f"k must be in 1..1000, got {self.k}")
        if not 0 <= self.tolerance <= 10:
            raise ConfigError(f"tolerance must be 0..10 levels, got {self.tolerance}")
        if not 0.0 <= self.region_weight <= 1.0:
            raise ConfigError(f"region_weight must be in [0, 1], got {self.region_weight}")


@dataclass(frozen=True)
class Hit:
    patient: str
    row: int
    score: float
    dice: float
    per_class: dict[str, float]


@dataclass(frozen=True)
class SketchResult:
    level: int
    query: dict[str, LesionSlice]
    hits: list[Hit]
    candidates: int
    timings_ms: dict[str, float] = field(default_factory=dict)


def encode_sketches(
    encoder: LesionEncoder, masks: Mapping[str, npt.NDArray[np.float64]], level: int
) -> dict[str, LesionSlice]:
    """Box masks per class -> the sketch's codes; unknown classes and empty sketches are refused."""
    known = encoder.grid.config.classes
    if not masks:
        raise DataError("the sketch has no mask: give at least one class's mask")
    unknown = [c for c in masks if c not in known]
    if unknown:
        raise DataError(f"sketch classes {unknown} are not in this table's classes {known}")
    return {c: encoder.encode_sketch(m, level, name=f"sketch[{c}]") for c, m in masks.items()}


def search_snapshot(
    snap: LesionSnapshot, query: Mapping[str, LesionSlice], level: int, options: SketchOptions
) -> tuple[list[Hit], int]:
    """Rank the snapshot's patients against the encoded sketch (see the module doc)."""
    parts = []
    n_cand = 0
    for c, q in query.items():
        rows = snap.candidates(level, options.tolerance, c)
        n_cand += len(rows)
        d = dice_scores(snap.cols, snap.bits, rows, q.code)
        rows, d = rows[d > 0], d[d > 0]  # no overlap, no match
        s = d + options.region_weight * regions.overlap(q.profile, snap.profiles[rows]) if options.region_weight else d
        parts.append((c, rows, d, s))
    if len(parts) == 1:
        c, rows, d, s = parts[0]
        order = rank_slices(s, rows)
        pats = best_per_patient(order, rows, s, d, snap.patient, options.k, slice_pool=options.slice_pool)
        return [Hit(p.patient, p.row, p.score, p.dice, {c: p.dice}) for p in pats], n_cand
    return _multi_class(snap, parts, options), n_cand


def _multi_class(snap: LesionSnapshot, parts: list[Any], options: SketchOptions) -> list[Hit]:
    n_cls = len(parts)
    all_rows = np.concatenate([p[1] for p in parts])
    pid = np.unique(snap.patient, return_inverse=True)[1].astype(np.int64)
    keys = pid[all_rows] * 100_000 + snap.level[all_rows]
    uniq, inv = np.unique(keys, return_inverse=True)
    score = np.zeros(len(uniq))
    dice = np.zeros(len(uniq))
    per = np.zeros((len(uniq), n_cls))
    rep = np.full(len(uniq), np.iinfo(np.int64).max)
    off = 0
    for j, (_, rows, d, s) in enumerate(parts):
        idx = inv[off : off + len(rows)]
        off += len(rows)
        np.add.at(score, idx, s / n_cls)
        np.add.at(dice, idx, d / n_cls)
        per[idx, j] = d
        np.minimum.at(rep, idx, rows)
    order = rank_slices(score, rep)
    pats = best_per_patient(order, rep, score, dice, snap.patient, options.k, slice_pool=options.slice_pool)
    slot = {int(r): i for i, r in enumerate(rep)}
    names = [p[0] for p in parts]
    return [
        Hit(p.patient, p.row, p.score, p.dice, dict(zip(names, per[slot[p.row]].tolist(), strict=True))) for p in pats
    ]
