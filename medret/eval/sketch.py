"""Sketch/template query evaluation (BENCHMARKS.md "Sketch/template query").

Patients: synthetic lesions drawn on the grid of real brain volumes (subject space: ellipsoids,
blobs of three balls and lobulated shapes, 4-20 mm, two classes: ``edema`` and, in a third of
them, an ``enhancing`` core), each carried into template space through its volume's own
registration by medret's recipe (:func:`medret.sketch.ingest.lesion_slices`), plus the real
TCGA-LGG case with its reviewed mask. The synthetic lesions are labels only: the image is not
altered, so one registration per base volume serves all the patients drawn on it.

Queries, per patient: the level where its edema is largest in template space, sketched as the
template-space lesion there (a box pixel is lesion when it is on half the slab's planes):
``exact``; ``dilated`` (3 mm), ``eroded`` (2 mm; skipped when nothing is left), ``shifted``
(5 mm in a seeded random in-plane direction); and ``mirrored`` (the exact sketch flipped about
the midline). Relevant: the patient itself. Gain for nDCG@10: the Dice of the query patient's
lesion plane with a retrieved patient's plane (at the retrieved level), at 1 mm; the ideal
ranking takes every patient's best plane within the level tolerance.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.sketch.encoder import LesionEncoder
from medret.sketch.query import SketchOptions, encode_sketches, search_snapshot
from medret.sketch.store import LesionSnapshot

VARIANTS = ("exact", "dilated", "eroded", "shifted", "mirrored")


@dataclass(frozen=True)
class Patient:
    name: str
    base: str
    planes: dict[int, npt.NDArray[np.bool_]]  # level -> (H, W) edema plane over the box (slab majority)
    lateral_mm: float  # |centroid x - midline| of the largest plane


def lesion_planes(
    carried: npt.NDArray[np.int16], enc: LesionEncoder, value: int = 1
) -> dict[int, npt.NDArray[np.bool_]]:
    tg = enc.grid
    out = {}
    for level in range(tg.n_levels):
        slab = tg.box(carried[tg.slab(level)] == value)
        if slab.any():
            plane = slab.mean(axis=0) >= 0.5
            if plane.any():
                out[level] = np.asarray(plane, bool)
    return out


def synthetic_mask(
    brain: npt.NDArray[np.bool_], spacing: Sequence[float], rng: np.random.Generator
) -> npt.NDArray[np.int16]:
    """One synthetic lesion on a subject grid (z, y, x), inside the brain: label 1 (edema), maybe 2 (core)."""
    sx, sy, sz = spacing
    pts = np.argwhere(brain)
    centre = pts[rng.integers(len(pts))].astype(float)
    shape = rng.choice(["ellipsoid", "blob", "lobulated"])
    radii = rng.uniform(4, 20, 3)
    z, y, x = np.ogrid[: brain.shape[0], : brain.shape[1], : brain.shape[2]]

    def ell(c: npt.NDArray[np.float64], r: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        return np.asarray(
            ((x - c[2]) * sx / r[0]) ** 2 + ((y - c[1]) * sy / r[1]) ** 2 + ((z - c[0]) * sz / r[2]) ** 2 <= 1
        )

    if shape == "ellipsoid":
        m = ell(centre, radii)
    elif shape == "blob":
        m = np.zeros(brain.shape, bool)
        for _ in range(3):
            off = rng.normal(0, radii.mean() / 2, 3) / np.array([sz, sy, sx])
            m |= ell(centre + off, radii * rng.uniform(0.5, 0.8))
    else:  # lobulated: an ellipsoid whose radius varies with direction
        d = np.sqrt(((x - centre[2]) * sx) ** 2 + ((y - centre[1]) * sy) ** 2 + ((z - centre[0]) * sz) ** 2) + 1e-6
        ang = np.arctan2((y - centre[1]) * sy, (x - centre[2]) * sx)
        k = int(rng.integers(3, 7))
        m = np.asarray(d <= radii.mean() * (1 + 0.3 * np.sin(k * ang + rng.uniform(0, 6.3))))
    m &= brain
    out = m.astype(np.int16)
    if rng.random() < 1 / 3:
        core = ell(centre, radii * 0.4) & m
        out[core] = 2
    return out


def shifted(plane: npt.NDArray[np.bool_], dy: int, dx: int) -> npt.NDArray[np.bool_]:
    out = np.zeros_like(plane)
    h, w = plane.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = plane[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def sketches(plane: npt.NDArray[np.bool_], rng: np.random.Generator) -> Iterator[tuple[str, npt.NDArray[np.bool_]]]:
    """The query variants of one exact plane (1 mm box pixels)."""
    from scipy import ndimage

    def disk(r: int) -> npt.NDArray[np.bool_]:
        yy, xx = np.ogrid[-r : r + 1, -r : r + 1]
        return np.asarray(yy**2 + xx**2 <= r * r)

    yield "exact", plane
    yield "dilated", ndimage.binary_dilation(plane, disk(3))
    eroded = ndimage.binary_erosion(plane, disk(2))
    if eroded.any():
        yield "eroded", eroded
    a = rng.uniform(0, 2 * np.pi)
    yield "shifted", shifted(plane, round(5 * np.sin(a)), round(5 * np.cos(a)))
    yield "mirrored", plane[:, ::-1]


def dice2d(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    t = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / t if t else 0.0


def ndcg(gains: Sequence[float], ideal: Sequence[float], k: int = 10) -> float:
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float(np.sum(np.asarray(gains[:k], float) * disc[: len(gains[:k])]))
    best = sorted(ideal, reverse=True)[:k]
    idcg = float(np.sum(np.asarray(best, float) * disc[: len(best)]))
    return dcg / idcg if idcg > 0 else 0.0


def evaluate(
    snap: LesionSnapshot,
    enc: LesionEncoder,
    patients: Mapping[str, Patient],
    queries: Sequence[str],
    *,
    options: SketchOptions | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Recall@k, top-1, MRR and nDCG@k (Dice gain) per sketch variant; the mirrored control's rank-1 rate."""
    options = options or SketchOptions(k=10)
    rng = np.random.default_rng(seed)
    k = options.k
    per: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for name in queries:
        p = patients[name]
        level = max(p.planes, key=lambda lv: int(p.planes[lv].sum()))
        exact = p.planes[level]
        ideal = [
            max((dice2d(exact, o.planes[lv]) for lv in o.planes if abs(lv - level) <= options.tolerance), default=0.0)
            for o in patients.values()
        ]
        for variant, sk in sketches(exact, rng):
            try:
                q = encode_sketches(enc, {"edema": sk.astype(float)}, level)
            except ValueError:
                continue  # the variant sets no cell (a tiny lesion eroded or mirrored onto nothing)
            hits, _ = search_snapshot(snap, q, level, options)
            names = [h.patient for h in hits]
            rank = names.index(name) + 1 if name in names else 0
            gains = [
                dice2d(exact, patients[h.patient].planes.get(int(snap.level[h.row]), np.zeros_like(exact)))
                for h in hits
            ]
            per[variant].append(
                {"patient": name, "rank": rank, "ndcg": ndcg(gains, ideal, k), "lateral_mm": p.lateral_mm}
            )
    return {v: summarise(rows, k) for v, rows in per.items()} | {"_rows": per}


def summarise(rows: Sequence[Mapping[str, Any]], k: int) -> dict[str, Any]:
    if not rows:
        return {"queries": 0}
    ranks = np.array([r["rank"] for r in rows])
    lateral = np.array([r["lateral_mm"] >= 10 for r in rows])
    return {
        "queries": len(rows),
        f"recall@{k}": round(float((ranks > 0).mean()), 3),
        "top1": round(float((ranks == 1).mean()), 3),
        "mrr": round(float(np.where(ranks > 0, 1.0 / np.maximum(ranks, 1), 0.0).mean()), 3),
        f"ndcg@{k}": round(float(np.mean([r["ndcg"] for r in rows])), 3),
        "lateral_queries": int(lateral.sum()),
        "top1_lateral": round(float((ranks[lateral] == 1).mean()), 3) if lateral.any() else None,
        f"in_top{k}_lateral": round(float((ranks[lateral] > 0).mean()), 3) if lateral.any() else None,
    }
