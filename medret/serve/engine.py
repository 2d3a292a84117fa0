"""The query path without a server: decode an upload, preprocess and encode it as the index was, search.

:class:`QueryEngine` is what ``medret search`` calls directly and what the Ray Serve
deployment (:mod:`medret.serve.app`) calls per request, so both answer the same
query the same way. Everything about *how* codes were made comes from the table:
the encoder config and checkpoint from its schema metadata, the per-kind
preprocessing recipes and slide tiling from what the indexing job recorded there.

Nothing a request names is ever opened as a path: tables are looked up by name
among the index's tables, items by id inside a table, and thumbnails read only
the item's own ``source_uri``, and only when it lies under a configured root.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator

from medret.config import DicomWebConfig, Frozen, S3Config
from medret.errors import (
    ConfigError,
    DataError,
    EncoderMismatchError,
    Forbidden,
    MedretError,
    NotFound,
    ObjectNotFoundError,
    TableNotFoundError,
    UnsupportedFormatError,
    UploadTooLarge,
)
from medret.index.manifest import manifest_name
from medret.index.store import CodeIndex, list_tables, where_clause
from medret.models.encoder import Encoder
from medret.pipelines.config import DEFAULT_RECIPES, TilingConfig

log = logging.getLogger(__name__)

TABLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
QUERY_KINDS = ("auto", "image", "dicom", "nifti", "tile")


class ServiceConfig(Frozen):
    """How the query service (and ``medret search``) reaches the index and what it accepts."""

    index: str = Field(default="medret-out/index", description="index URI: local folder or s3://bucket/prefix")
    table: str | None = Field(default=None, description="default table (else the only or first one)")
    s3: S3Config = S3Config()
    dicomweb: DicomWebConfig = Field(
        default=DicomWebConfig(), description="how to read items back from a DICOMweb source (credentials: env)"
    )
    checkpoint: str | None = Field(
        default=None, description="encoder checkpoint to use when the one the table names is not reachable here"
    )
    roots: tuple[str, ...] = Field(
        default=(),
        description="source prefixes thumbnails may be read from (default: the sources the indexing jobs recorded)",
    )
    refresh_s: float = Field(default=5.0, ge=0, description="how often to look for a newer table version")
    ivf_min_rows: int | None = Field(
        default=None,
        ge=1,
        description="search tables at least this large through their IVF index (CodeIndex.create_ivf), if any",
    )
    ivf_nprobes: int = Field(default=20, ge=1, description="IVF partitions probed per query")
    token: str | None = Field(
        default=None,
        repr=False,
        exclude=True,
        description="bearer token; auth is on when set. Give it as MEDRET_TOKEN or token_file, never as an "
        "argument: it is never serialised (replicas read it from their environment or the file)",
    )
    token_file: str | None = Field(
        default=None, description="file holding the bearer token (a Kubernetes secret mount); also MEDRET_TOKEN_FILE"
    )
    secrets_file: str | None = Field(
        default=None,
        description="JSON file with token and S3 keys that `medret serve` writes (0600) for its replicas",
    )
    allow_anonymous: bool = Field(
        default=False, description="serve /v1 without a token on a non-loopback address (off: refuse to start)"
    )
    auth_required: bool = Field(
        default=False,
        description="a replica that finds no token refuses to start instead of serving anonymously; set by the "
        "builder whenever it saw a token",
    )
    max_upload_bytes: int = Field(default=64 << 20, ge=1024)
    pixel_budget: int = Field(default=50_000_000, ge=1, description="most pixels an upload may declare")
    max_k: int = Field(default=1000, ge=1)
    thumb_px: int = Field(default=128, ge=16, le=1024)
    batch_max_size: int = Field(default=32, ge=1, le=1024)
    batch_wait_s: float = Field(default=0.0, ge=0, le=1, description="how long a batch waits to fill")
    max_ongoing_requests: int = Field(default=128, ge=1)
    max_queued_requests: int = Field(default=256, ge=1, description="requests a replica queue holds before 503")
    request_timeout_s: float = Field(default=300.0, gt=0, description="Serve ends a request running this long")
    body_idle_s: float = Field(default=10.0, gt=0, description="longest wait for the next piece of a request body")
    body_grace_s: float = Field(default=5.0, ge=0, description="after this long a body must arrive at min_body_rate")
    min_body_rate: int = Field(default=32 << 10, ge=1, description="bytes per second a body must average (408)")
    heavy_workers: int = Field(default=1, ge=1, description="threads for expensive uploads (MRI registration)")
    heavy_queue: int = Field(
        default=4, ge=1, description="expensive uploads admitted at once (running + waiting); more get 503"
    )
    allowed_hosts: tuple[str, ...] = Field(
        default=(), description="Host header values accepted (e.g. medret.hospital.org); empty: any"
    )
    replicas: int = Field(default=1, ge=1)

    @field_validator("table")
    @classmethod
    def _table_name(cls, v: str | None) -> str | None:
        if v is not None and not TABLE_NAME.match(v):
            raise ValueError("must be a table name (letters, digits, '_' and '-')")
        return v


@dataclass
class Query:
    """One uploaded image, preprocessed for a table's encoder."""

    image: npt.NDArray[np.float32]
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds


def _unit8(x: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    lo, hi = float(np.min(x)), float(np.max(x))
    if not (lo >= 0.0 and hi <= 1.0):  # z-scored inputs: stretch for display
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return np.clip(np.asarray(x) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def png_bytes(image: npt.NDArray[Any]) -> bytes:
    """A float image in [0, 1] (grey or RGB) or a uint8 image as PNG bytes."""
    from PIL import Image

    arr = image if image.dtype == np.uint8 else _unit8(image)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def parse_suffix(suffix: str) -> dict[str, str]:
    """``#x=1&y=2`` -> ``{"x": "1", "y": "2"}`` (the item-id suffixes the indexing job writes)."""
    if not suffix.startswith("#"):
        return {}
    out = {}
    for part in suffix[1:].split("&"):
        k, _, v = part.partition("=")
        out[k] = v
    return out


class QueryEngine:
    """Answers queries against the code tables at one index URI. Thread-safe."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self._lock = threading.RLock()
        self._tables: dict[str, CodeIndex] = {}
        self._encoders: dict[str, Encoder] = {}
        self._roots: dict[str, tuple[str, ...]] = {}
        self._thumbs: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._npz: OrderedDict[str, Any] = OrderedDict()
        self._names: tuple[float, list[str]] | None = None
        self._ivf: dict[tuple[str, int], bool] = {}

    # -- tables ------------------------------------------------------------------------
    def table_names(self) -> list[str]:
        """The code tables (manifests left out), listed again at most every ``refresh_s`` seconds."""
        now = time.monotonic()
        with self._lock:
            if self._names is None or now - self._names[0] >= self.cfg.refresh_s:
                names = [t for t in list_tables(self.cfg.index, self.cfg.s3) if not t.endswith("__manifest")]
                self._names = (now, names)
            return list(self._names[1])

    def default_table(self) -> str:
        if self.cfg.table:
            return self.cfg.table
        names = self.table_names()
        if not names:
            raise NotFound(f"no code tables at {self.cfg.index}; run `medret index` first")
        return names[0]

    def index(self, table: str | None = None) -> CodeIndex:
        """The table, following new versions at most every ``refresh_s`` seconds."""
        name = table or self.default_table()
        if not TABLE_NAME.match(name) or name.endswith("__manifest"):
            raise NotFound(f"no code table {name[:80]!r}: table names are letters, digits, '_' and '-'")
        with self._lock:
            idx = self._tables.get(name)
            if idx is None:
                try:
                    idx = self._tables[name] = CodeIndex.open(self.cfg.index, table=name, s3=self.cfg.s3)
                except TableNotFoundError as err:
                    raise NotFound(str(err)) from err
            else:
                idx.refresh(min_interval_s=self.cfg.refresh_s)
        return idx

    def tables(self) -> list[dict[str, Any]]:
        out = []
        for name in self.table_names():
            idx = self.index(name)
            out.append(
                {
                    "name": name,
                    "rows": idx.count(),
                    "version": idx.version,
                    "encoder_id": idx.encoder_id,
                    "encoder": idx.encoder.model_dump(mode="json"),
                    "recipes": self.recipes(idx),
                }
            )
        return out

    def recipes(self, idx: CodeIndex) -> dict[str, Any]:
        """Kind -> recipe and the slide tiling, as recorded by the indexing job (defaults for older tables)."""
        rec = idx.recipes or {}
        kinds = {"raster": idx.encoder.preprocess, "medmnist": idx.encoder.preprocess, **DEFAULT_RECIPES}
        kinds.update(rec.get("kinds", {}))
        tiling = TilingConfig(**rec.get("tiling", {})).model_dump(mode="json")
        return {"kinds": kinds, "tiling": tiling}

    def warm(self) -> None:
        """Load the default table's codes and encoder and run one search, so the first query is fast."""
        try:
            idx = self.index()
            self.search(idx, self.encode(idx, [np.zeros(idx.encoder.input_size, np.float32)])[0], 1)
        except MedretError as err:  # an empty index or a missing checkpoint: the requests will say so
            log.warning("warm-up skipped: %s", err)

    # -- the encoder -------------------------------------------------------------------
    def encoder(self, idx: CodeIndex) -> Encoder:
        """The table's encoder, loaded once; its id must equal the table's."""
        with self._lock:
            enc = self._encoders.get(idx.encoder_id)
            if enc is not None:
                return enc
            from medret.models.encoder import load_encoder
            from medret.models.pretrained import encoder_path

            tried = []
            for spec in (idx.checkpoint, self.cfg.checkpoint):
                if not spec:
                    continue
                try:
                    candidate = load_encoder(encoder_path(spec))
                except (ConfigError, DataError) as err:
                    tried.append(f"{spec}: {err}")
                    continue
                if candidate.config.encoder_id == idx.encoder_id:
                    self._encoders[idx.encoder_id] = candidate
                    return candidate
                tried.append(f"{spec}: is encoder {candidate.config.encoder_id}")
            raise EncoderMismatchError(
                f"table {idx.name!r} holds codes of encoder {idx.encoder_id}, and no checkpoint of it is reachable "
                f"here ({'; '.join(tried) or 'the table names none'}); pass the checkpoint with --checkpoint"
            )

    def encode(self, idx: CodeIndex, images: Sequence[npt.NDArray[np.float32]]) -> npt.NDArray[np.uint8]:
        return self.encoder(idx).encode(np.stack(images).astype(np.float32, copy=False))

    # -- uploads -----------------------------------------------------------------------
    def prepare(
        self,
        idx: CodeIndex,
        data: bytes,
        filename: str,
        *,
        kind: str = "auto",
        slice: int | None = None,
        mpp: float | None = None,
    ) -> Query:
        """Decode an upload and preprocess it exactly as the indexing job preprocessed its kind."""
        from medret.io.detect import HEAD_BYTES, detect_kind

        name = Path(filename or "upload").name[:200] or "upload"
        if len(data) > self.cfg.max_upload_bytes:
            raise UploadTooLarge(f"{name}: {len(data)} bytes is over the upload limit of {self.cfg.max_upload_bytes}")
        if kind not in QUERY_KINDS:
            raise ConfigError(f"kind must be one of {', '.join(QUERY_KINDS)}, got {kind[:40]!r}")
        t0 = time.perf_counter()
        detected = detect_kind(name, data[:HEAD_BYTES])
        if detected == "tiff":
            detected = "raster"  # an uploaded TIFF is an image (a slide region), never a whole slide
        if detected in ("wsi", "medmnist"):
            raise UnsupportedFormatError(
                name,
                "whole slides and .npz sets cannot be uploaded as a query; upload a region as a PNG/JPEG tile "
                "(kind=tile) or pick an indexed item",
            )
        if kind == "auto":
            kind = {"raster": "image"}.get(detected, detected)
        expected = {"image": "raster", "tile": "raster", "dicom": "dicom", "nifti": "nifti"}[kind]
        if detected != expected:
            raise UnsupportedFormatError(name, f"kind={kind} needs a {expected} file, but this is a {detected} file")
        rec = self.recipes(idx)
        size = idx.encoder.input_size
        budget = self.cfg.pixel_budget
        meta: dict[str, Any] = {}
        from medret.preprocess.recipes import RECIPES, tile_input

        if kind == "nifti":
            from medret.io.volume import read_nifti

            volume = read_nifti(data, name=name, pixel_budget=budget)
            t1 = time.perf_counter()
            prepared = RECIPES.get(rec["kinds"]["nifti"])(volume, input_size=size)
            chosen = self._choose(prepared, slice, name, "slice")
            image, meta = chosen.image, {"slice": chosen.suffix.lstrip("#")}
        else:
            if kind == "dicom":
                from medret.io.dicom import read_dicom

                decoded = read_dicom(data, name=name, pixel_budget=budget)
            else:
                from medret.io.raster import read_raster

                decoded = read_raster(data, name=name, pixel_budget=budget)
            t1 = time.perf_counter()
            if kind == "tile":
                rgb = decoded.frame(0)
                target = float(rec["tiling"]["mpp"])
                if mpp is not None and mpp > 0 and abs(mpp - target) > 1e-6:
                    from medret.io.base import check_budget
                    from medret.io.wsi import resize_rgb

                    h, w = rgb.shape[:2]
                    scale = mpp / target
                    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
                    # cost grows with the square of mpp: the rescaled tile is under the same budget
                    check_budget(name, out_w * out_h * 3, budget, f"{w}x{h} at mpp {mpp:g} -> {out_w}x{out_h}x3")
                    rgb = resize_rgb(np.asarray(rgb), (out_w, out_h))
                image, meta = tile_input(np.asarray(rgb), size), {"mpp": target}
            else:
                prepared = RECIPES.get(rec["kinds"]["dicom" if kind == "dicom" else "raster"])(decoded, input_size=size)
                chosen = self._choose(prepared, slice, name, "frame")
                image = chosen.image
                meta = {"frame": slice or 0} if len(prepared) > 1 else {}
        t2 = time.perf_counter()
        return Query(image, kind, meta, {"decode": t1 - t0, "preprocess": t2 - t1})

    @staticmethod
    def is_heavy(data: bytes, filename: str, kind: str) -> bool:
        """Whether preparing this upload is expensive (a volume: registration to the template)."""
        from medret.io.detect import HEAD_BYTES, detect_kind

        return kind == "nifti" or (kind == "auto" and detect_kind(filename or "upload", data[:HEAD_BYTES]) == "nifti")

    def health(self) -> None:
        """Raise if this engine cannot answer: the index's table list is unreachable."""
        self.table_names()

    @staticmethod
    def _choose(prepared: Sequence[Any], choice: int | None, name: str, what: str) -> Any:
        if not prepared:
            raise DataError(f"{name}: preprocessing produced no image")
        if choice is None:
            return prepared[len(prepared) // 2] if what == "slice" else prepared[0]
        if not 0 <= choice < len(prepared):
            raise ConfigError(f"{name}: {what} {choice} is out of range; this input has {len(prepared)} (0-based)")
        return prepared[choice]

    # -- search ------------------------------------------------------------------------
    def filters(self, filters: Mapping[str, Any]) -> str | None:
        return where_clause({k: v for k, v in filters.items() if v not in (None, "", [])})

    def search(
        self,
        idx: CodeIndex,
        codes: npt.NDArray[np.uint8],
        k: int = 10,
        *,
        filters: Mapping[str, Any] | None = None,
        exclude: str | None = None,
    ) -> list[dict[str, Any]]:
        """Top-``k`` hits (dicts) for one packed code; ``exclude`` drops that item (a by-id query's own)."""
        if not 1 <= k <= self.cfg.max_k:
            raise ConfigError(f"k must be between 1 and {self.cfg.max_k}, got {k}")
        where = self.filters(filters or {})
        q, want = np.asarray(codes).reshape(1, -1), k + (1 if exclude else 0)
        if self.use_ivf(idx):
            (hits,) = idx.search_ivf(q, want, nprobes=self.cfg.ivf_nprobes, where=where)
        else:
            (hits,) = idx.search(q, want, where=where)
        rows = [self._row(r) for r in hits.to_pylist() if r["item_id"] != exclude][:k]
        for rank, r in enumerate(rows):
            r["rank"] = rank
        return rows

    @staticmethod
    def _row(r: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in r.items() if v is not None and k != "indexed_at"}
        if r.get("indexed_at") is not None:
            out["indexed_at"] = r["indexed_at"].isoformat()
        if out.get("extra"):
            with contextlib.suppress(ValueError):
                out["extra"] = json.loads(out["extra"])
        else:
            out.pop("extra", None)
        return out

    def use_ivf(self, idx: CodeIndex) -> bool:
        """The approximate path, for tables at least ``ivf_min_rows`` large that have an IVF index."""
        if self.cfg.ivf_min_rows is None:
            return False
        key = (idx.name, idx.version)
        with self._lock:
            if key not in self._ivf:
                self._ivf[key] = idx.count() >= self.cfg.ivf_min_rows and idx.has_ivf()
            return self._ivf[key]

    def item(self, table: str | None, item_id: str) -> dict[str, Any]:
        idx = self.index(table)
        t = idx.get([item_id])
        if t.num_rows == 0:
            raise NotFound(f"no item {item_id[:200]!r} in table {idx.name!r}")
        row = t.drop_columns(["code"]).to_pylist()[0]
        return self._row(row)

    def similar(
        self, table: str | None, item_id: str, k: int = 10, *, filters: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        idx = self.index(table)
        try:
            codes = idx.codes_of([item_id])
        except KeyError as err:
            raise NotFound(f"no item {item_id[:200]!r} in table {idx.name!r}") from err
        return self.search(idx, codes, k, filters=filters, exclude=item_id)

    # -- thumbnails --------------------------------------------------------------------
    def roots(self, idx: CodeIndex) -> tuple[str, ...]:
        """Where this table's thumbnails may be read from: configured roots, else the recorded sources."""
        if self.cfg.roots:
            return tuple(self._norm_root(r) for r in self.cfg.roots)
        with self._lock:
            if idx.name not in self._roots:
                sources: tuple[str, ...] = ()
                if manifest_name(idx.name) in list_tables(self.cfg.index, self.cfg.s3):
                    from medret.index.manifest import Manifest

                    rows = Manifest(self.cfg.index, idx.name, self.cfg.s3, create=False).as_rows()
                    sources = tuple(sorted({self._norm_root(r["source"]) for r in rows if r.get("source")}))
                self._roots[idx.name] = sources
            return self._roots[idx.name]

    @staticmethod
    def _norm_root(uri: str) -> str:
        from medret.storage.uri import parse_uri

        return str(parse_uri(uri).without_query()).rstrip("/") + "/"

    def _store_for(self, idx: CodeIndex, source_uri: str) -> tuple[Any, str]:
        """The object store and key for an item's source, refusing anything outside the roots."""
        from medret.storage.objects import open_store
        from medret.storage.uri import parse_uri

        try:
            target = str(parse_uri(source_uri))
        except MedretError as err:
            raise Forbidden(f"item source {source_uri[:200]!r} is not a readable URI") from err
        if ".." in target.split("/"):
            raise Forbidden(f"item source {source_uri[:200]!r} is not a plain path")
        for root in self.roots(idx):
            if target.startswith(root):
                return open_store(root, self.cfg.s3, dicomweb=self.cfg.dicomweb), target[len(root) :]
        raise Forbidden(
            f"item source {source_uri[:200]!r} is outside the roots this service may read "
            f"({', '.join(self.roots(idx)) or 'none recorded'}); set roots to allow it"
        )

    def thumbnail(self, table: str | None, item_id: str) -> bytes:
        """A PNG of the item as the encoder saw it (slide tiles in colour), rendered from its source."""
        idx = self.index(table)
        row = self.item(idx.name, item_id)
        key = (idx.name, item_id + "|" + str(row.get("etag", "")))
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        source = str(row["source_uri"])
        store, obj_key = self._store_for(idx, source)
        try:
            png = png_bytes(self._render(idx, store, obj_key, source, item_id[len(source) :]))
        except ObjectNotFoundError as err:
            raise NotFound(f"the source of item {item_id[:200]!r} is gone: {err}") from err
        with self._lock:
            self._thumbs[key] = png
            while len(self._thumbs) > 2048:
                self._thumbs.popitem(last=False)
        return png

    def _render(self, idx: CodeIndex, store: Any, key: str, source: str, suffix: str) -> npt.NDArray[Any]:
        from medret.io.detect import HEAD_BYTES, detect_kind
        from medret.preprocess.recipes import RECIPES

        size = (self.cfg.thumb_px, self.cfg.thumb_px)
        parts = parse_suffix(suffix)
        rec = self.recipes(idx)
        if "split" in parts:
            images = self._medmnist(store, key, source, parts["split"])
            return np.asarray(images[int(parts["i"])])
        if "x" in parts:
            return self._tile(idx, store, key, source, int(parts["x"]), int(parts["y"]))
        data = store.read_bytes(key)
        kind = detect_kind(source, data[:HEAD_BYTES])
        if kind == "nifti":
            from medret.io.volume import read_nifti

            prepared = RECIPES.get(rec["kinds"]["nifti"])(read_nifti(data, name=source), input_size=size)
            return next((p.image for p in prepared if p.suffix == suffix), prepared[len(prepared) // 2].image)
        if kind == "dicom":
            from medret.io.dicom import read_dicom

            prepared = RECIPES.get(rec["kinds"]["dicom"])(read_dicom(data, name=source), input_size=size)
            return prepared[int(parts.get("frame", 0))].image
        from medret.io.raster import read_raster
        from medret.io.wsi import resize_rgb

        decoded = read_raster(data, name=source)
        frame = np.asarray(decoded.frame(0))
        if frame.ndim == 3 and frame.dtype == np.uint8:
            h, w = frame.shape[:2]
            scale = min(size[0] / h, size[1] / w, 1.0)
            return resize_rgb(frame, (max(1, round(w * scale)), max(1, round(h * scale))))
        (p,) = RECIPES.get(rec["kinds"]["raster"])(decoded, input_size=size)
        return p.image

    def _medmnist(self, store: Any, key: str, source: str, split: str) -> npt.NDArray[Any]:
        import tempfile

        from medret.io.medmnist import read_medmnist

        with self._lock:
            m = self._npz.get(source)
        if m is None:
            with tempfile.NamedTemporaryFile(suffix=".npz") as f:
                f.write(store.read_bytes(key))
                f.flush()
                m = read_medmnist(f.name)
            with self._lock:
                self._npz[source] = m
                while len(self._npz) > 4:
                    self._npz.popitem(last=False)
        return np.asarray(m.images[np.asarray(m.split) == split])

    def _tile(self, idx: CodeIndex, store: Any, key: str, source: str, x: int, y: int) -> npt.NDArray[Any]:
        from medret.io.wsi import resize_rgb
        from medret.pipelines.stages import StageContext, local_copy, open_cached_slide

        t = TilingConfig(**self.recipes(idx)["tiling"])
        ctx = StageContext(store=store, input_size=idx.encoder.input_size, recipes={}, tiling=t)
        etag = store.info(key).etag
        slide = open_cached_slide(local_copy(ctx, key, etag), t)
        rgb = slide.read((x, y), (t.tile_px, t.tile_px), t.mpp, "mpp")
        side = min(self.cfg.thumb_px, t.tile_px)
        return resize_rgb(np.asarray(rgb), (side, side))
