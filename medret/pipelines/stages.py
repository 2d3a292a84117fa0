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

import json
import logging
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from medret import kinds
from medret.errors import DataError, MedretError, fault_of
from medret.index.schema import FEATURE_COLUMN, METADATA_COLUMNS
from medret.index.store import FragmentTarget
from medret.kinds import Item, ReadContext, Unit
from medret.models import rerank
from medret.storage.cache import object_names

log = logging.getLogger(__name__)

READ_AHEAD = 8  # whole-object GETs in flight per read task
#: index columns an item's metadata may set, typed as the code table types them (the rest goes to ``extra``)
INDEX_COLUMNS = tuple(
    c for c in METADATA_COLUMNS if c not in ("item_id", "source_uri", "etag", "encoder_id", "indexed_at")
)
_TEXT = tuple(c for c in INDEX_COLUMNS if pa.types.is_string(METADATA_COLUMNS[c][0]) and c != "extra")
_INTS = tuple(c for c in INDEX_COLUMNS if pa.types.is_integer(METADATA_COLUMNS[c][0]))
_FLOATS = tuple(c for c in INDEX_COLUMNS if pa.types.is_floating(METADATA_COLUMNS[c][0]))
#: ``fault`` says whose fault ``error`` is (:func:`medret.errors.fault_of`): "object", "infra", "auth" or "gone"
STRING_COLUMNS = ("item_id", "uri", "etag", "kind", "unit_id", "error", "fault", *_TEXT)

#: what every stage needs; pickled into the Ray tasks and actors
StageContext = ReadContext


def error_text(err: BaseException) -> str:
    """One line that says what was wrong, naming the object rather than a local copy of it."""
    text = object_names(str(err) if isinstance(err, MedretError) else f"{type(err).__name__}: {err}")
    return text.splitlines()[0][:500] if text else type(err).__name__


# -- stage 1: units --------------------------------------------------------------------
def expand(obj: dict[str, Any], ctx: ReadContext) -> list[dict[str, Any]]:
    """One unit per object, or the units its kind plans (a slide: groups of tissue tile positions)."""
    unit = {**obj, "unit_index": 0, "object_units": 1, "plan": "", "error": "", "fault": "", "plan_s": 0.0}
    t0 = time.perf_counter()
    try:
        kind = kinds.get(obj["kind"])
        if kind.listing is kinds.Listing.DETECT:
            kind = _sniff(ctx, obj)
            unit["kind"] = kind.name
        plans = kind.plan(ctx, Unit.of_row(unit))
        plan_s = time.perf_counter() - t0
        return [
            {**unit, "unit_index": i, "object_units": len(plans), "plan": plan, "plan_s": plan_s if i == 0 else 0.0}
            for i, plan in enumerate(plans)
        ]
    except Exception as err:  # a bad object becomes an error unit; the job goes on
        return [{**unit, "error": error_text(err), "fault": fault_of(err), "plan_s": time.perf_counter() - t0}]


def _sniff(ctx: ReadContext, obj: dict[str, Any]) -> kinds.Kind:
    from medret.storage.cache import local_copy

    kind = kinds.detect(obj["uri"], ctx.store.read_range(obj["key"], 0, kinds.HEAD_BYTES))
    if kind.needs_file():
        kind = kind.resolve(local_copy(ctx.store, obj["key"], obj["etag"], ctx.cache_dir))
    return kind


# -- stage 2: read, decode, preprocess ----------------------------------------------
def _read(ctx: ReadContext, key: str) -> tuple[bytes, float]:
    t0 = time.perf_counter()
    data = ctx.store.read_bytes(key)
    return data, time.perf_counter() - t0


def _items_of(
    ctx: ReadContext, unit: dict[str, Any], fetched: Future[tuple[bytes, float]] | None = None
) -> tuple[list[Item], int, float]:
    """Items of one unit, the bytes read, and the seconds spent reading (the rest is preprocessing)."""
    kind, u = kinds.get(unit["kind"]), Unit.of_row(unit)
    if not kind.whole_object:
        return kind.read_items(ctx, u)
    if fetched is not None:  # read ahead on a thread: count only the time this task waited for it
        t0 = time.perf_counter()
        data = fetched.result()[0]
        read_s = time.perf_counter() - t0
    else:
        data, read_s = _read(ctx, u.key)
    return kind.items(ctx, u, data), len(data), read_s


def _checked(ctx: ReadContext, kind: str, items: list[Item]) -> list[Item]:
    """The items, if each is one model input of the encoder's shape ((H, W) or (H, W, C)); one that is not
    (a recipe that ignores ``channels``) fails its unit, not the batch it would be stacked with."""
    for it in items:
        if it.image.shape != ctx.input_shape:
            raise DataError(
                f"the {kind} recipe {ctx.recipes.get(kind, '?')!r} made an input of shape {it.image.shape} "
                f"for item {it.suffix or '(whole object)'!r}; the encoder takes {ctx.input_shape}"
            )
    return items


class _ReadAhead:
    """Whole objects fetched READ_AHEAD at a time on threads while earlier ones are decoded:
    object-store GETs cost milliseconds each, which one-at-a-time reads would add up."""

    def __init__(self, ctx: ReadContext, units: list[dict[str, Any]]) -> None:
        self.ctx, self.units = ctx, units
        self.wanted = [u for u, unit in enumerate(units) if not unit["error"] and kinds.get(unit["kind"]).whole_object]
        self.order = {u: position for position, u in enumerate(self.wanted)}
        self.fetches: dict[int, Future[tuple[bytes, float]]] = {}
        self.pool = ThreadPoolExecutor(READ_AHEAD) if len(self.wanted) > 1 else None
        for position in range(READ_AHEAD):
            self._submit(position)

    def _submit(self, position: int) -> None:
        if self.pool is not None and position < len(self.wanted):
            u = self.wanted[position]
            self.fetches[u] = self.pool.submit(_read, self.ctx, str(self.units[u]["key"]))

    def take(self, u: int) -> Future[tuple[bytes, float]] | None:
        """Unit ``u``'s fetch, if it was read ahead; the next object's fetch starts in its place."""
        if u in self.fetches:
            self._submit(self.order[u] + READ_AHEAD)
        return self.fetches.pop(u, None)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def load(batch: dict[str, npt.NDArray[Any]], ctx: StageContext) -> dict[str, npt.NDArray[Any]]:
    """A batch of units -> item rows (model-ready images, (H, W) or (H, W, C), and index metadata)."""
    rows: list[dict[str, Any]] = []
    images: list[npt.NDArray[np.float32]] = []
    units = [{k: v[u] for k, v in batch.items()} for u in range(len(batch["uri"]))]
    ahead = _ReadAhead(ctx, units)
    try:
        for u, unit in enumerate(units):
            t0 = time.perf_counter()
            error, fault, nbytes, read_s = str(unit["error"]), str(unit.get("fault", "")), 0, 0.0
            items: list[Item] = []
            fetched = ahead.take(u)
            if not error:
                try:
                    items, nbytes, read_s = _items_of(ctx, unit, fetched)
                    items = _checked(ctx, str(unit["kind"]), items)
                except Exception as err:
                    error, fault, items = error_text(err), fault_of(err), []
            stats = {
                "bytes_read": nbytes,
                "read_s": read_s,
                "prep_s": time.perf_counter() - t0 - read_s + float(unit["plan_s"]),
                "n_tiles": len(items) if kinds.get(unit["kind"]).tiles else 0,
            }
            rows += _unit_rows(unit, items, stats, error, fault)
            images += [it.image for it in items] or [np.zeros(ctx.input_shape, np.float32)]
    finally:
        ahead.close()
    return _to_columns(rows, np.stack(images).astype(np.float32, copy=False))


def _unit_rows(
    unit: dict[str, Any], items: list[Item], stats: dict[str, Any], error: str, fault: str
) -> list[dict[str, Any]]:
    """One row per item of a unit (its stats on the first), or one marker row carrying its error."""
    base = {
        "uri": unit["uri"],
        "etag": unit["etag"],
        "kind": unit["kind"],
        "unit_id": f"{unit['uri']}@{unit['unit_index']}",
        "object_units": int(unit["object_units"]),
        "unit_rows": max(1, len(items)),
    }
    if not items:
        return [{**base, **stats, "ok": False, "error": error, "fault": fault, "item_id": ""}]
    side = json.loads(unit["meta"]) if unit["meta"] else {}
    return [
        {
            **base,
            **({} if i else stats),
            "ok": True,
            "error": "",
            "item_id": unit["uri"] + it.suffix,
            **_columns({**it.meta, **side}),
        }
        for i, it in enumerate(items)
    ]


def _columns(meta: dict[str, Any]) -> dict[str, Any]:
    """Item metadata -> the index's columns, typed as the table types them; the rest as JSON in ``extra``."""
    out: dict[str, Any] = {}
    extra = {}
    for k, v in meta.items():
        if k in _TEXT:
            out[k] = str(v)
        elif k in _INTS:
            out[k] = int(v)
        elif k in _FLOATS:
            out[k] = float(v)
        else:
            extra[k] = v
    out["extra"] = json.dumps(extra, sort_keys=True, default=str) if extra else ""
    return out


def _to_columns(rows: list[dict[str, Any]], images: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[Any]]:
    cols: dict[str, npt.NDArray[Any]] = {}
    for c in (*STRING_COLUMNS, "extra"):
        cols[c] = np.array([str(r.get(c, "")) for r in rows], dtype=object)
    for c in ("object_units", "unit_rows", "bytes_read", "n_tiles"):
        cols[c] = np.array([int(r.get(c, 0)) for r in rows], dtype=np.int64)
    for c in _INTS:
        cols[c] = np.array([int(r.get(c, -1)) for r in rows], dtype=np.int64)
    for c in ("read_s", "prep_s"):
        cols[c] = np.array([float(r.get(c, 0.0)) for r in rows], dtype=np.float64)
    for c in _FLOATS:
        cols[c] = np.array([float(r.get(c, np.nan)) for r in rows], dtype=np.float64)
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
        keep_features = self.target is not None and FEATURE_COLUMN in self.target.schema.names
        features = np.zeros((len(ok), rerank.DIMS), np.int8) if keep_features else None
        if ok.any():
            images = np.asarray(batch["image"])[ok]
            if features is not None:  # the table keeps compact features for re-ranking: one model pass for both
                codes[ok], features[ok] = rerank.codes_and_features(self.encoder, images)
            else:
                codes[ok] = self.encoder.encode(images)
        out = {k: v for k, v in batch.items() if k != "image"}
        out["code"] = codes
        if features is not None:
            out["feature"] = features
        out["encode_s"] = np.full(len(ok), (time.perf_counter() - t0) / max(1, len(ok)))
        return out if self.target is None else write(out, self.target)


# -- stage 4: write ----------------------------------------------------------------------


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
        columns = index_columns(good)
        if "feature" in good:
            feats = np.ascontiguousarray(good["feature"], dtype=np.int8)
            columns["feature"] = pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel(), pa.int8()), feats.shape[1])
        fragments = target.write(good["item_id"].tolist(), codes, **columns) if ok.any() else []
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
