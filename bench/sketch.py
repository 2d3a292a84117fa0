"""Sketch/template query: BENCHMARKS.md "Sketch/template query", and query latency at 100,000 lesion slices.

    .venv/bin/python bench/sketch.py [--per-volume 40] [--out sketch.json] [--cache DIR] [--latency-rows 100000]

Patients and queries: see :mod:`medret.eval.sketch`. Base volumes: the real brains in
``mri/`` (ch2, chris_t1, the TCGA T1c and FLAIR, MNI152), each registered once to the ROBEX
template by the MRI recipe (``preprocess_brain``, single-threaded ITK); ``--per-volume``
synthetic patients are drawn on each, and the real TCGA case (``medret/sketch/data``) is one
more patient. All are written to a real ``<table>__lesions`` table (LanceDB in a temporary
folder) by the indexing job's hook, and queried from its snapshot, k=10, level tolerance 1.

Latency: ``--latency-rows`` lesion slices (ellipses on the 32x32 grid at random levels, 8 per
patient), one thread, the median of 200 sketch queries through ``search_snapshot`` (level filter,
Dice from Hamming, ranking, best slice per patient), at tolerance 1 (3 of 31 levels) and 10
(21 levels around the middle one).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medret.config import data_root
from medret.eval.sketch import Patient, evaluate, lesion_planes, sketches, synthetic_mask
from medret.io.volume import Volume, read_nifti
from medret.preprocess.mri.recipe import load_template, preprocess_brain
from medret.sketch.carry import carry_lesion
from medret.sketch.data import TCGA_MASK
from medret.sketch.encoder import RasterEncoder, load_grid
from medret.sketch.grid import LesionGridConfig
from medret.sketch.ingest import sync_job_lesions
from medret.sketch.query import SketchOptions, encode_sketches, search_snapshot
from medret.sketch.store import LesionTable, snapshot_of

BASES = (
    "mricron__ch2.nii.gz",
    "mricron__chris_t1.nii.gz",
    "brainles__TCGA-FG-6692_t1c.nii.gz",
    "brainles__TCGA-FG-6692_fla.nii.gz",
    "antspy__mni_MNI152_T1_1mm_brain.nii.gz",
)
REAL = "TCGA-FG-6692"
REAL_MASK = TCGA_MASK
CONFIG = LesionGridConfig(labels=((1, "edema"), (2, "enhancing")))


def patient_of(name: str, base: str, carried: np.ndarray, enc: RasterEncoder) -> Patient | None:
    planes = lesion_planes(carried, enc)
    if not planes:
        return None
    level = max(planes, key=lambda lv: int(planes[lv].sum()))
    cols = np.nonzero(planes[level])[1]
    midline = enc.grid.width / 2 - 0.5
    return Patient(name, base, planes, float(abs(cols.mean() - midline)))


def build(per_volume: int, seed: int, uri: str) -> tuple[RasterEncoder, dict[str, Patient], dict[str, float]]:
    enc = RasterEncoder(load_grid(CONFIG))
    template = load_template(CONFIG.template)
    rng = np.random.default_rng(seed)
    patients: dict[str, Patient] = {}
    volumes: dict[str, Any] = {}
    names: dict[str, str] = {}
    timings = {"register_s": 0.0, "carry_encode_s": 0.0}
    root = data_root() / "mri"
    for base in BASES:
        t0 = time.perf_counter()
        result = preprocess_brain(read_nifti(root / base), template)
        timings["register_s"] += time.perf_counter() - t0
        subj = result.subject
        t0 = time.perf_counter()
        for i in range(per_volume):
            labels = synthetic_mask(result.mask, subj.spacing, rng)
            if not labels.any():
                continue
            vol = Volume(labels.astype(np.float32), subj.spacing, subj.origin, subj.direction, {})
            carried = carry_lesion(vol, subj, result.registration, enc.grid, name=f"{base}#{i}")
            name = f"{base.split('.')[0]}-syn{i:03d}"
            p = patient_of(name, base, carried, enc)
            if p is None:
                continue
            patients[name] = p
            uri_i = f"synthetic://{name}"
            volumes[uri_i] = enc.encode_volume(carried)
            names[uri_i] = name
        if base.endswith("_fla.nii.gz"):
            carried = carry_lesion(read_nifti(REAL_MASK), subj, result.registration, enc.grid, name=REAL_MASK.name)
            p = patient_of(REAL, base, carried, enc)
            assert p is not None, "the real lesion mask produced no lesion planes"
            patients[REAL] = p
            volumes[f"file://{root / base}"] = enc.encode_volume(carried)
            names[f"file://{root / base}"] = REAL
        timings["carry_encode_s"] += time.perf_counter() - t0
    sync_job_lesions(uri, "mri", enc, volumes, patients=names)
    return enc, patients, {k: round(v, 1) for k, v in timings.items()}


def real_case(snap: Any, enc: RasterEncoder, p: Patient) -> dict[str, Any]:
    level = max(p.planes, key=lambda lv: int(p.planes[lv].sum()))
    out: dict[str, Any] = {"level": level, "area_px": int(p.planes[level].sum())}
    for variant, sk in sketches(p.planes[level], np.random.default_rng(1)):
        hits, _ = search_snapshot(
            snap, encode_sketches(enc, {"edema": sk.astype(float)}, level), level, SketchOptions()
        )
        names = [h.patient for h in hits]
        out[variant] = {"rank": names.index(REAL) + 1 if REAL in names else None, "top": names[:3]}
    return out


def random_table(n: int, enc: RasterEncoder, seed: int) -> Any:
    """``n`` lesion slices: ellipses on the grid at random levels, 8 per patient."""
    import pyarrow as pa

    g = enc.grid.config.grid
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:g, :g]
    cy, cx = rng.uniform(4, g - 4, (2, n))
    ry, rx = rng.uniform(1, 6, (2, n))
    bits = ((yy[None] - cy[:, None, None]) / ry[:, None, None]) ** 2 + (
        (xx[None] - cx[:, None, None]) / rx[:, None, None]
    ) ** 2 <= 1
    bits[bits.reshape(n, -1).sum(1) == 0, g // 2, g // 2] = True
    codes = np.packbits(bits.reshape(n, -1), axis=1)
    table = pa.table(
        {
            "code": pa.FixedSizeListArray.from_arrays(pa.array(codes.ravel(), pa.uint8()), codes.shape[1]),
            "bits": bits.reshape(n, -1).sum(1).astype(np.int32),
            "level": rng.integers(0, enc.grid.n_levels, n).astype(np.int32),
            "class": ["edema"] * n,
            "patient": [f"p{i // 8:06d}" for i in range(n)],
            "regions": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 13, np.float32)), 13),
        }
    )
    return snapshot_of(table, 0, codes.shape[1]), bits


def latency(n: int, enc: RasterEncoder, seed: int = 3) -> dict[str, Any]:
    import numba

    numba.set_num_threads(1)
    snap, bits = random_table(n, enc, seed)
    rng = np.random.default_rng(seed + 1)
    out: dict[str, Any] = {"rows": n, "patients": n // 8}
    for label, tol in (("tolerance1", 1), ("tolerance10", 10)):
        opts = SketchOptions(k=10, tolerance=tol)
        times = []
        cands = []
        for _ in range(200):
            q = bits[rng.integers(n)]
            level = int(rng.integers(0, enc.grid.n_levels)) if tol == 1 else enc.grid.n_levels // 2
            box = np.kron(q, np.ones(enc.grid.cell)).astype(float)
            query = encode_sketches(enc, {"edema": box}, level)
            t0 = time.perf_counter()
            _, c = search_snapshot(snap, query, level, opts)
            times.append(time.perf_counter() - t0)
            cands.append(c)
        out[label] = {
            "median_ms": round(1e3 * float(np.median(times)), 3),
            "p99_ms": round(1e3 * float(np.percentile(times, 99)), 3),
            "candidates_median": int(np.median(cands)),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-volume", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency-rows", type=int, default=100_000)
    ap.add_argument("--out", default="sketch.json")
    ap.add_argument("--latency-only", action="store_true", help="only the latency part")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.latency_only:
        print(json.dumps(latency(args.latency_rows, RasterEncoder(load_grid(CONFIG))), indent=1))
        return
    with tempfile.TemporaryDirectory(prefix="medret-sketch-bench-") as tmp:
        enc, patients, timings = build(args.per_volume, args.seed, tmp)
        lt = LesionTable.open(tmp, "mri")
        snap = lt.snapshot()
        result = evaluate(snap, enc, patients, sorted(patients), seed=args.seed)
        rows = result.pop("_rows")
        report = {
            "patients": len(patients),
            "lesion_slices": lt.count(),
            "build": timings,
            "variants": result,
            "real_case": real_case(snap, enc, patients[REAL]),
            "real_case_rows": {v: [r for r in rows[v] if r["patient"] == REAL] for v in rows},
        }
    report["latency"] = latency(args.latency_rows, enc)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "real_case_rows"}, indent=1))


if __name__ == "__main__":
    main()
