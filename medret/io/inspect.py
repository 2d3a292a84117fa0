"""What medret sees in a file: kind, reader, geometry, UIDs; decodes pixels so damage shows up here.

Used by ``medret inspect``; every reader's output is summarised as one JSON-safe dict.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from medret.config import S3Config
from medret.io.base import DEFAULT_PIXEL_BUDGET, Decoded
from medret.io.detect import HEAD_BYTES, detect_kind, resolve_tiff


@contextlib.contextmanager
def fetched(uri: str, s3: S3Config | None = None) -> Iterator[Path]:
    """A local path for ``uri``: the file itself, or an ``s3://`` object or a DICOMweb instance
    (``dicomweb+https://host/prefix/studies/{uid}/series/{uid}/instances/{uid}``) downloaded to a temp file."""
    if not uri.startswith(("s3://", "dicomweb+")):
        yield Path(uri)
        return
    from medret.storage.objects import open_store
    from medret.storage.uri import StorageURI, parse_uri

    parsed = parse_uri(uri)
    if parsed.is_dicomweb:
        store, key, name = open_store(StorageURI("dicomweb", parsed.bucket, "")), parsed.path, "instance.dcm"
    else:
        parent, _, key = parsed.path.rpartition("/")
        store = open_store(f"s3://{parsed.bucket}/{parent}" if parent else f"s3://{parsed.bucket}", s3)
        name = PurePosixPath(key).name
    with tempfile.TemporaryDirectory(prefix="medret-inspect-") as tmp:
        local = Path(tmp) / name
        local.write_bytes(store.read_bytes(key))
        yield local


def _stats(arr: np.ndarray) -> dict[str, Any]:
    return {
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "min": float(np.min(arr)),
        "max": float(np.max(arr)),
        "mean": round(float(np.mean(arr)), 4),
    }


def _decoded(d: Decoded) -> dict[str, Any]:
    return {
        **_stats(d.pixels),
        "frames": d.frames,
        "spacing_mm": list(d.spacing) if d.spacing else None,
        "photometric": d.display.photometric,
        "bits_stored": d.display.bits_stored,
        "window": {"center": list(d.display.window_center), "width": list(d.display.window_width)}
        if d.display.window_center
        else None,
        "voi_lut": d.display.voi_lut is not None,
        "meta": d.meta,
    }


def inspect_file(
    path: str | Path,
    *,
    name: str | None = None,
    mpp: float | None = None,
    preprocess: bool = False,
    pixel_budget: int = DEFAULT_PIXEL_BUDGET,
    sample_tiles: int = 8,
) -> dict[str, Any]:
    """Decode ``path`` with the reader its content calls for and describe the result."""
    p = Path(path)
    label = name or str(p)
    with open(p, "rb") as f:
        head = f.read(HEAD_BYTES)
    kind = detect_kind(label, head)
    if kind == "tiff":
        kind = resolve_tiff(str(p))
    t0 = time.perf_counter()
    out: dict[str, Any] = {"path": label, "bytes": p.stat().st_size, "kind": kind}
    if kind == "dicom":
        from medret.io.dicom import WSI_SOP_CLASS, parse_dicom, read_dicom

        raw = p.read_bytes()  # read once: the header check and the decode share it
        header = parse_dicom(raw, label, stop_before_pixels=True)
        if str(header.get("SOPClassUID", "")) == WSI_SOP_CLASS:
            kind = out["kind"] = "wsi"
        else:
            d = read_dicom(raw, name=label, pixel_budget=pixel_budget)
            out.update(reader=d.reader, **_decoded(d))
    if kind == "raster":
        from medret.io.raster import read_raster

        d = read_raster(p, name=label, pixel_budget=pixel_budget)
        out.update(reader=d.reader, **_decoded(d))
    elif kind == "nifti":
        out.update(_volume(p, label, preprocess, pixel_budget))
    elif kind == "wsi":
        out.update(_slide(p, mpp, sample_tiles))
    elif kind == "medmnist":
        from medret.io.medmnist import read_medmnist

        m = read_medmnist(p)
        out.update(reader="numpy", **_stats(m.images), labels=sorted({int(v) for v in np.unique(m.labels)}))
    out["decode_seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _volume(p: Path, label: str, preprocess: bool, pixel_budget: int) -> dict[str, Any]:
    from medret.io.volume import read_nifti

    v = read_nifti(p, name=label, pixel_budget=pixel_budget)
    out: dict[str, Any] = {
        "reader": "nibabel",
        **_stats(v.array),
        "spacing_mm": [round(s, 4) for s in v.spacing],
        "orientation": v.orientation,
        "origin_mm": [round(o, 2) for o in v.origin],
        "meta": v.meta,
    }
    if preprocess:
        from medret.preprocess.mri.recipe import describe, load_template, preprocess_brain

        out["preprocess"] = describe(preprocess_brain(v, load_template("robex")))
    return out


def _slide(p: Path, mpp: float | None, sample_tiles: int) -> dict[str, Any]:
    from medret.errors import MissingSpacingError
    from medret.io.wsi import open_slide
    from medret.preprocess.wsi.tiling import iter_tiles, tile_grid

    with open_slide(p, mpp=mpp) as s:
        thumb, down = s.thumbnail(512)
        out: dict[str, Any] = {
            "reader": s.backend,
            "vendor": s.vendor,
            "levels": s.level_count,
            "level_dimensions": [list(d) for d in s.level_dimensions],
            "level_downsamples": [round(d, 4) for d in s.level_downsamples],
            "mpp": list(s.mpp) if s.mpp else None,
            "objective_power": s.objective_power,
            "thumbnail": {**_stats(thumb), "downsample": round(down, 3)},
        }
        try:
            target = max(0.5, s.require_mpp()[0])
        except MissingSpacingError as err:
            out["tiles"] = {"error": err.reason}
            return out
        specs = tile_grid(s, tile_size=224, mpp=target, min_tissue=0.25)
        step = max(1, len(specs) // max(sample_tiles, 1))
        tiles = list(iter_tiles(s, specs[::step][:sample_tiles], tile_size=224, mpp=target, min_tissue=0.0))
        out["tiles"] = {"mpp": target, "size": 224, "grid_tissue_tiles": len(specs), "sampled": len(tiles)}
    return out
