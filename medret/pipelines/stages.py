"""The indexing job's stages as plain callables, so Ray Data (or a test) can drive them.

Work flows as *units*: one unit per ordinary object, and a slide fans out into
units of ``tiles_per_unit`` tiles (:func:`expand`). :func:`load` reads, decodes
and preprocesses a batch of units into *item rows*, one per model input, plus one
marker row for a unit that yields nothing (an error, a slide without tissue), so the
driver can count every unit home. :class:`Encode` turns item rows into codes.

Each row carries ``unit_id``, ``unit_rows`` (rows its unit emits) and
``object_units`` (units its object has). :func:`write` (tasks) writes encoded rows
as uncommitted fragments of the code table and hands the driver one bookkeeping row
per unit of each batch; the driver commits an object's fragments once all of its
rows are written, never half of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from medret.errors import ConfigError, MedretError, fault_of
from medret.index.store import FragmentTarget
from medret.io.base import DEFAULT_PIXEL_BUDGET
from medret.pipelines.config import TilingConfig
from medret.storage.objects import ObjectStore

log = logging.getLogger(__name__)

#: index columns an item may set from its metadata (the rest of the metadata goes to ``extra``)
READ_AHEAD = 8  # whole-object GETs in flight per read task
META_COLUMNS = ("modality", "dataset", "label", "study_uid", "series_uid", "instance_uid")
#: ``fault`` says whose fault ``error`` is (:func:`medret.errors.fault_of`): "object", "infra", "auth" or "gone"
STRING_COLUMNS = ("item_id", "uri", "etag", "kind", "unit_id", "error", "fault", *META_COLUMNS, "slide_id", "extra")


@dataclass(frozen=True)
class StageContext:
    """What every stage needs; pickled into the Ray tasks and actors."""

    store: ObjectStore
    input_size: tuple[int, int]
    recipes: dict[str, str]  # kind -> recipe
    tiling: TilingConfig
    cache_dir: str = ""
    pixel_budget: int = DEFAULT_PIXEL_BUDGET  # most pixels (voxels) one object may declare


# -- local copies of objects that libraries must open by path (slides) ----------------
def local_copy(ctx: StageContext, key: str, etag: str) -> Path:
    """A local file with the object's content: the file itself for a local source, else a cached download.

    Downloads stream to disk (a slide is never held in memory) and land atomically,
    keyed by URI and etag, so every task on a node shares one copy.
    """
    local = ctx.store.local_path(key)
    if local is not None:  # the reader opens it itself: a failing mount is met here, through the retries
        ctx.store.call(lambda: ctx.store.info(key))
        return local
    target = ctx.store.call(lambda: _download(ctx, key, etag))  # a download broken off starts again
    _LOCAL_NAMES[str(target)] = ctx.store.uri_of(key)
    return target


#: local copy -> object URI, so errors raised by libraries name the object, not the cache file
_LOCAL_NAMES: dict[str, str] = {}


def _download(ctx: StageContext, key: str, etag: str) -> Path:
    cache = Path(ctx.cache_dir or os.environ.get("MEDRET_CACHE") or Path.home() / ".cache" / "medret" / "objects")
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(f"{ctx.store.uri_of(key)}|{etag}".encode()).hexdigest()[:32]
    target = cache / (digest + "".join(PurePosixPath(key.lower()).suffixes[-2:]))
    if not target.exists():
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out, ctx.store.open(key) as src:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    return target


_SLIDES: OrderedDict[str, Any] = OrderedDict()


def open_cached_slide(path: Path, tiling: TilingConfig) -> Any:
    """Slides stay open per worker process (a few at a time), so units of one slide reuse the handle."""
    from medret.io.wsi import open_slide

    key = str(path)
    if key in _SLIDES:
        _SLIDES.move_to_end(key)
        return _SLIDES[key]
    slide = open_slide(path)
    if slide.mpp is None:
        if tiling.default_mpp is None:
            try:
                slide.require_mpp()  # raises the reader's own "no pixel size" error
            finally:
                slide.close()
        mpp = float(tiling.default_mpp or 0.0)
        slide.mpp = (mpp, mpp)
    _SLIDES[key] = slide
    while len(_SLIDES) > 4:
        _SLIDES.popitem(last=False)[1].close()
    return slide


def error_text(err: BaseException) -> str:
    """One line that says what was wrong, naming the object rather than a local copy of it."""
    text = str(err) if isinstance(err, MedretError) else f"{type(err).__name__}: {err}"
    for local, uri in _LOCAL_NAMES.items():
        text = text.replace(local, uri)
    return text.splitlines()[0][:500] if text else type(err).__name__


# -- stage 1: units --------------------------------------------------------------------
def expand(obj: dict[str, Any], ctx: StageContext) -> list[dict[str, Any]]:
    """One unit per object; a slide becomes units of tile positions over its tissue."""
    unit = {**obj, "unit_index": 0, "object_units": 1, "tiles": "", "error": "", "fault": "", "plan_s": 0.0}
    t0 = time.perf_counter()
    try:
        kind = obj["kind"]
        if kind == "auto":
            kind = unit["kind"] = _sniff(ctx, obj)
        if kind != "wsi":
            return [unit]
        from medret.preprocess.wsi.tiling import tile_grid

        slide = open_cached_slide(local_copy(ctx, obj["key"], obj["etag"]), ctx.tiling)
        t = ctx.tiling
        specs = tile_grid(slide, tile_size=t.tile_px, mpp=t.mpp, min_tissue=t.min_tissue)
        groups = [specs[i : i + t.tiles_per_unit] for i in range(0, len(specs), t.tiles_per_unit)] or [[]]
        plan_s = time.perf_counter() - t0
        return [
            {
                **unit,
                "unit_index": i,
                "object_units": len(groups),
                "tiles": json.dumps([[s.x, s.y, s.tissue] for s in g]),
                "plan_s": plan_s if i == 0 else 0.0,
            }
            for i, g in enumerate(groups)
        ]
    except Exception as err:  # a bad object becomes an error unit; the job goes on
        return [{**unit, "error": error_text(err), "fault": fault_of(err), "plan_s": time.perf_counter() - t0}]


def _sniff(ctx: StageContext, obj: dict[str, Any]) -> str:
    from medret.io.detect import HEAD_BYTES, detect_kind, resolve_tiff

    head = ctx.store.read_range(obj["key"], 0, HEAD_BYTES)
    kind = detect_kind(obj["uri"], head)
    if kind == "tiff":
        kind = resolve_tiff(str(local_copy(ctx, obj["key"], obj["etag"])))
    return kind


# -- stage 2: read, decode, preprocess ----------------------------------------------
@dataclass
class _Item:
    suffix: str
    image: npt.NDArray[np.float32]
    meta: dict[str, Any]


def _recipe(ctx: StageContext, kind: str) -> Any:
    from medret.preprocess.recipes import RECIPES

    return RECIPES.get(ctx.recipes[kind])


def _read(ctx: StageContext, key: str) -> tuple[bytes, float]:
    t0 = time.perf_counter()
    data = ctx.store.read_bytes(key)
    return data, time.perf_counter() - t0


def _items_of(
    ctx: StageContext, unit: dict[str, Any], fetched: Future[tuple[bytes, float]] | None = None
) -> tuple[list[_Item], int, float]:
    """Items of one unit, the bytes read, and the seconds spent reading (the rest is preprocessing)."""
    kind, key, label = unit["kind"], unit["key"], unit["uri"]
    if kind == "wsi":
        return _tiles(ctx, unit)
    if kind == "dicom-series":
        return _series_items(ctx, unit)
    if fetched is not None:  # read ahead on a thread: count only the time this task waited for it
        t0 = time.perf_counter()
        data = fetched.result()[0]
        read_s = time.perf_counter() - t0
    else:
        data, read_s = _read(ctx, key)
    size = ctx.input_size
    if kind == "medmnist":
        return _medmnist_items(ctx, data, label), len(data), read_s
    if kind == "nifti":
        from medret.io.volume import read_nifti

        volume = read_nifti(data, name=label, pixel_budget=ctx.pixel_budget)
        prepared = _recipe(ctx, kind)(volume, input_size=size)
        meta: dict[str, Any] = {"modality": "MR", **volume.meta}
    else:
        if kind == "dicom":
            from medret.io.dicom import read_dicom

            decoded = read_dicom(data, name=label, pixel_budget=ctx.pixel_budget)
        elif kind == "raster":
            from medret.io.raster import read_raster

            decoded = read_raster(data, name=label, pixel_budget=ctx.pixel_budget)
        else:
            raise ConfigError(f"{label}: no reader for kind {kind!r}")
        prepared = _recipe(ctx, kind)(decoded, input_size=size)
        meta = dict(decoded.meta)
    return [_Item(p.suffix, p.image, {**meta, **p.meta}) for p in prepared], len(data), read_s


def _series_items(ctx: StageContext, unit: dict[str, Any]) -> tuple[list[_Item], int, float]:
    """A series folder's slice files, read in parallel -> one volume per SeriesInstanceUID -> its recipe's inputs."""
    from medret.io.volume import read_dicom_series

    keys: list[str] = json.loads(unit["members"] or "[]")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(READ_AHEAD) as pool:
        blobs = list(pool.map(ctx.store.read_bytes, keys))
    read_s = time.perf_counter() - t0
    sources = [(ctx.store.uri_of(k), b) for k, b in zip(keys, blobs, strict=True)]
    volumes = read_dicom_series(sources, pixel_budget=ctx.pixel_budget)
    recipe = _recipe(ctx, "dicom-series")
    out = []
    for volume in volumes:
        uid = volume.meta.get("series_uid", "")
        meta = {k: v for k, v in volume.meta.items() if k != "instance_uid"}  # the first slice's: not the item's
        for p in recipe(volume, input_size=ctx.input_size):
            # one folder may hold several series: the series UID keeps their item ids apart
            out.append(_Item(f"#series={uid}&{p.suffix.lstrip('#')}", p.image, {**meta, **p.meta}))
    return out, sum(len(b) for b in blobs), read_s


def _medmnist_items(ctx: StageContext, data: bytes, label: str) -> list[_Item]:
    from medret.io.base import Decoded
    from medret.io.medmnist import read_medmnist

    with tempfile.NamedTemporaryFile(suffix=".npz") as f:
        f.write(data)
        f.flush()
        m = read_medmnist(f.name)
    recipe = _recipe(ctx, "medmnist")
    counters: dict[str, int] = {}
    out = []
    for image, lab, split in zip(m.images, m.labels, m.split, strict=True):
        i = counters[str(split)] = counters.get(str(split), -1) + 1
        (p,) = recipe(Decoded(image, kind="medmnist", reader="medmnist"), input_size=ctx.input_size)
        out.append(_Item(f"#split={split}&i={i}", p.image, {"label": str(int(lab)), "split": str(split)}))
    return out


def _tiles(ctx: StageContext, unit: dict[str, Any]) -> tuple[list[_Item], int, float]:
    from medret.preprocess.recipes import tile_input
    from medret.preprocess.wsi.tissue import tissue_fraction

    t = ctx.tiling
    slide = open_cached_slide(local_copy(ctx, unit["key"], unit["etag"]), t)
    out, nbytes, read_s = [], 0, 0.0
    for x, y, tissue in json.loads(unit["tiles"] or "[]"):
        t0 = time.perf_counter()
        rgb = slide.read((x, y), (t.tile_px, t.tile_px), t.mpp, "mpp")
        read_s += time.perf_counter() - t0
        nbytes += rgb.nbytes
        frac = tissue_fraction(rgb)
        if frac < t.min_tissue:
            continue  # background after all
        image = tile_input(rgb, ctx.input_size)
        meta = {
            "modality": "SM",
            "slide_id": slide.slide_id,
            "tile_x": x,
            "tile_y": y,
            "mpp": t.mpp,
            "tissue": round(min(frac, tissue), 4),
        }
        out.append(_Item(f"#x={x}&y={y}", image, meta))
    return out, nbytes, read_s


def load(batch: dict[str, npt.NDArray[Any]], ctx: StageContext) -> dict[str, npt.NDArray[Any]]:
    """A batch of units -> item rows (model-ready images and index metadata)."""
    rows: list[dict[str, Any]] = []
    images: list[npt.NDArray[np.float32]] = []
    blank = np.zeros(ctx.input_size, np.float32)
    units = [{k: v[u] for k, v in batch.items()} for u in range(len(batch["uri"]))]
    # whole objects are fetched READ_AHEAD at a time on threads while earlier ones are decoded:
    # object-store GETs cost milliseconds each, which one-at-a-time reads would add up
    wanted = [u for u, unit in enumerate(units) if not unit["error"] and unit["kind"] not in ("wsi", "dicom-series")]
    order = {u: position for position, u in enumerate(wanted)}
    fetches: dict[int, Future[tuple[bytes, float]]] = {}
    pool = ThreadPoolExecutor(READ_AHEAD) if len(wanted) > 1 else None

    def ahead(position: int) -> None:
        if pool is not None and position < len(wanted):
            u = wanted[position]
            fetches[u] = pool.submit(_read, ctx, str(units[u]["key"]))

    for position in range(READ_AHEAD):
        ahead(position)
    for u, unit in enumerate(units):
        unit_id = f"{unit['uri']}@{unit['unit_index']}"
        t0 = time.perf_counter()
        error, fault, nbytes, read_s = str(unit["error"]), str(unit.get("fault", "")), 0, 0.0
        items: list[_Item] = []
        if u in fetches:
            ahead(order[u] + READ_AHEAD)
        if not error:
            try:
                items, nbytes, read_s = _items_of(ctx, unit, fetches.pop(u, None))
            except Exception as err:
                error, fault, items = error_text(err), fault_of(err), []
        total_s = time.perf_counter() - t0
        base = {
            "uri": unit["uri"],
            "etag": unit["etag"],
            "kind": unit["kind"],
            "unit_id": unit_id,
            "object_units": int(unit["object_units"]),
            "unit_rows": max(1, len(items)),
        }
        stats = {
            "bytes_read": nbytes,
            "read_s": read_s,
            "prep_s": total_s - read_s + float(unit["plan_s"]),
            "n_tiles": len(items) if unit["kind"] == "wsi" else 0,
        }
        side = json.loads(unit["meta"]) if unit["meta"] else {}
        if not items:
            rows.append({**base, **stats, "ok": False, "error": error, "fault": fault, "item_id": ""})
            images.append(blank)
            continue
        for i, it in enumerate(items):
            rows.append(
                {
                    **base,
                    **({} if i else stats),
                    "ok": True,
                    "error": "",
                    "item_id": unit["uri"] + it.suffix,
                    **_columns({**it.meta, **side}),
                }
            )
            images.append(it.image)
    if pool is not None:
        pool.shutdown()
    return _to_columns(rows, np.stack(images).astype(np.float32, copy=False))


def _columns(meta: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    extra = {}
    for k, v in meta.items():
        if k in META_COLUMNS or k == "slide_id":
            out[k] = str(v)
        elif k in ("tile_x", "tile_y"):
            out[k] = int(v)
        elif k == "mpp":
            out[k] = float(v)
        else:
            extra[k] = v
    out["extra"] = json.dumps(extra, sort_keys=True, default=str) if extra else ""
    return out


def _to_columns(rows: list[dict[str, Any]], images: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[Any]]:
    cols: dict[str, npt.NDArray[Any]] = {}
    for c in STRING_COLUMNS:
        cols[c] = np.array([str(r.get(c, "")) for r in rows], dtype=object)
    for c in ("object_units", "unit_rows", "bytes_read", "n_tiles"):
        cols[c] = np.array([int(r.get(c, 0)) for r in rows], dtype=np.int64)
    for c in ("tile_x", "tile_y"):
        cols[c] = np.array([int(r.get(c, -1)) for r in rows], dtype=np.int64)
    for c in ("read_s", "prep_s"):
        cols[c] = np.array([float(r.get(c, 0.0)) for r in rows], dtype=np.float64)
    cols["mpp"] = np.array([float(r.get("mpp", np.nan)) for r in rows], dtype=np.float64)
    cols["ok"] = np.array([bool(r["ok"]) for r in rows])
    cols["image"] = images
    return cols


# -- stage 3: encode ---------------------------------------------------------------------
class Encode:
    """An actor: loads the encoder once, then turns batches of item rows into packed codes."""

    def __init__(self, checkpoint: bytes, threads: int = 1, target: FragmentTarget | None = None) -> None:
        """``checkpoint`` is the encoder file's content, so actors on any node get the same model.

        With a ``target`` the actor also writes the codes as fragments of that table (:func:`write`)
        and returns the bookkeeping rows; without, it returns the encoded rows.
        """
        self.target = target
        import torch

        from medret.models.encoder import load_encoder

        torch.set_num_threads(threads)
        with tempfile.NamedTemporaryFile(suffix=".npz") as f:
            f.write(checkpoint)
            f.flush()
            self.encoder = load_encoder(f.name)
        enc: Any = self.encoder
        if getattr(enc, "module", None) is not None and torch.cuda.is_available():  # a GPU actor (num_gpus > 0)
            enc.module, enc.device = enc.module.to("cuda"), "cuda"

    def __call__(self, batch: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]] | pa.Table:
        t0 = time.perf_counter()
        ok = batch["ok"].astype(bool)
        codes = np.zeros((len(ok), self.encoder.config.code_bytes), np.uint8)
        if ok.any():
            codes[ok] = self.encoder.encode(np.asarray(batch["image"])[ok])
        out = {k: v for k, v in batch.items() if k != "image"}
        out["code"] = codes
        out["encode_s"] = np.full(len(ok), (time.perf_counter() - t0) / max(1, len(ok)))
        return out if self.target is None else write(out, self.target)


# -- stage 4: write ----------------------------------------------------------------------
#: index columns set from item metadata; empty strings, -1 and NaN mean "not known" (null)
INDEX_COLUMNS = (*META_COLUMNS, "slide_id", "tile_x", "tile_y", "mpp", "extra")


def index_columns(batch: dict[str, npt.NDArray[Any]]) -> dict[str, pa.Array]:
    """The index's metadata columns of encoded item rows (empty strings, -1 and NaN become nulls)."""
    import pyarrow.compute as pc

    cols = {"source_uri": pa.array(batch["uri"], pa.string()), "etag": pa.array(batch["etag"], pa.string())}
    for c in INDEX_COLUMNS:
        a = pa.array(batch[c])
        if pa.types.is_string(a.type) or pa.types.is_large_string(a.type):
            cols[c] = pc.if_else(pc.equal(a, ""), pa.scalar(None, a.type), a)
        elif pa.types.is_integer(a.type):
            cols[c] = pc.if_else(pc.equal(a, -1), pa.scalar(None, a.type), a)
        else:
            cols[c] = pc.if_else(pc.is_nan(a), pa.scalar(None, a.type), a)
    return cols


#: per-unit sums the driver adds to the job summary
_SUMS = ("read_s", "prep_s", "encode_s", "bytes_read", "n_tiles")


def write(batch: dict[str, npt.NDArray[Any]], target: FragmentTarget) -> pa.Table:
    """A batch of encoded rows -> fragments of the code table (not yet committed) + a row per unit.

    Each output row says how many of its unit's rows this batch held (``rows``) and how
    many went into the fragments (``items``); all rows of one call share ``batch_id`` and
    the first carries the fragments, for the driver to commit with whole objects.
    """
    t0 = time.perf_counter()
    ok = np.asarray(batch["ok"], dtype=bool)
    good = {k: np.asarray(v)[ok] for k, v in batch.items()}
    codes = np.ascontiguousarray(good["code"], dtype=np.uint8)
    fragments: list[str] = []
    failed = ""  # the index storage could not take the fragments: the whole batch is retried next run
    try:
        fragments = target.write(good["item_id"].tolist(), codes, **index_columns(good)) if ok.any() else []
    except Exception as err:
        failed = f"writing codes to the index {target.dataset_uri}: {error_text(err)}"
        log.warning("%s", failed)
    write_s = time.perf_counter() - t0
    units: dict[str, dict[str, Any]] = {}
    for i, unit_id in enumerate(batch["unit_id"].tolist()):
        u = units.get(unit_id)
        if u is None:
            u = units[unit_id] = {
                "unit_id": unit_id,
                "uri": str(batch["uri"][i]),
                "unit_rows": int(batch["unit_rows"][i]),
                "object_units": int(batch["object_units"][i]),
                "rows": 0,
                "items": 0,
                "error": failed,
                "fault": "index" if failed else "",
                **{c: 0 for c in _SUMS},
            }
        u["rows"] += 1
        u["items"] += int(ok[i]) if not failed else 0
        if not u["error"] and batch["error"][i]:
            u["error"], u["fault"] = str(batch["error"][i]), str(batch["fault"][i]) or "object"
        for c in _SUMS:
            u[c] += batch[c][i].item()
    rows = list(units.values())
    batch_id = uuid.uuid4().hex
    for i, u in enumerate(rows):
        u.update(batch_id=batch_id, batch_units=len(rows), fragments=json.dumps(fragments) if i == 0 else "")
        u["write_s"] = write_s if i == 0 else 0.0
    return pa.Table.from_pylist(rows)
