"""Sketch/template queries for the service and ``medret search --sketch``: templates, sketches, top patients.

The lesion tables are the ``<table>__lesions`` companions at the service's index
(:mod:`medret.sketch.store`); a request names the code table, never a path. A sketch arrives
per lesion class as a PNG (covering the template box of its level, as ``GET /v1/templates``
serves it; any non-zero pixel, or alpha, is lesion) or as polygons in template millimetres; it is
rasterised by the table's recorded lesion encoder and ranked exactly by Dice.

A hit's thumbnail is the template slice at the hit's level with the stored lesion's grid cells
outlined (red) and the query's (green): the volumes themselves are not read at query time.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.config import S3Config
from medret.errors import DataError, NotFound, TableNotFoundError
from medret.index.store import list_tables
from medret.sketch import raster, regions
from medret.sketch.encoder import LesionEncoder, create_lesion_encoder
from medret.sketch.query import SketchOptions, SketchResult, encode_sketches, search_snapshot
from medret.sketch.store import SUFFIX, LesionSnapshot, LesionTable

TABLE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
#: the most pixels a sketch PNG may decode to
MAX_SKETCH_PIXELS = 4096 * 4096


def decode_png(data: str | bytes, *, name: str) -> npt.NDArray[np.float64]:
    """A base64 PNG (or data URL) -> a 2-D 0/1 mask (alpha where there is one, else the first channel)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, str):
        data = data.split(",", 1)[1] if data.startswith("data:") else data
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError as err:
            raise DataError(f"{name}: not base64 ({err})") from None
    else:
        raw = data
    try:
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > MAX_SKETCH_PIXELS:
            raise DataError(f"{name}: {img.width}x{img.height} pixels is over the {MAX_SKETCH_PIXELS} pixel limit")
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{name}: not a readable image ({type(err).__name__})") from None
    arr = np.asarray(img.convert("RGBA"))
    alpha = arr[..., 3]
    plane = alpha if (alpha < 255).any() else arr[..., :3].max(axis=-1)
    return np.asarray(plane > 0, np.float64)


def png_bytes(rgb: npt.NDArray[np.uint8]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _grey(plane: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    hi = float(np.percentile(plane, 99.5)) or 1.0
    g = np.clip(plane / hi * 255.0, 0, 255).astype(np.uint8)
    return np.stack([g, g, g], axis=-1)


def cells_outline(bits: npt.NDArray[np.bool_], shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """The outline of a (grid, grid) bit mask upsampled to ``shape`` (box pixels)."""
    g = bits.shape[0]
    up = np.kron(bits, np.ones((shape[0] // g, shape[1] // g), bool))
    inner = up.copy()
    inner[1:-1, 1:-1] = up[1:-1, 1:-1] & up[:-2, 1:-1] & up[2:, 1:-1] & up[1:-1, :-2] & up[1:-1, 2:]
    return np.asarray(up & ~inner, bool)


class SketchSearch:
    """The lesion tables of one index, their encoders and templates; thread-safe."""

    def __init__(self, index: str, s3: S3Config | None = None, *, refresh_s: float = 5.0, data_root: str = "") -> None:
        self.index, self.s3, self.refresh_s, self.data_root = index, s3, refresh_s, data_root
        self._lock = threading.RLock()
        self._tables: dict[str, LesionTable] = {}
        self._encoders: dict[str, LesionEncoder] = {}
        self._names: tuple[float, list[str]] | None = None
        self._png: dict[tuple[str, int, bool], bytes] = {}

    def names(self) -> list[str]:
        """Code tables that have a lesion table."""
        now = time.monotonic()
        with self._lock:
            if self._names is None or now - self._names[0] >= self.refresh_s:
                found = [t[: -len(SUFFIX)] for t in list_tables(self.index, self.s3) if t.endswith(SUFFIX)]
                self._names = (now, found)
            return list(self._names[1])

    def table(self, name: str | None) -> LesionTable:
        names = self.names()
        if name is None:
            if not names:
                raise NotFound(f"no table at {self.index} has lesion masks: no volume is sketch-searchable")
            name = names[0]
        if not TABLE_NAME.match(name) or name not in names:
            raise NotFound(f"no sketch-searchable table {name[:80]!r}; tables with lesion masks: {names}")
        with self._lock:
            lt = self._tables.get(name)
            if lt is None:
                try:
                    lt = self._tables[name] = LesionTable.open(self.index, name, self.s3)
                except TableNotFoundError as err:
                    raise NotFound(str(err)) from err
            else:
                lt.refresh()
            return lt

    def encoder(self, name: str | None) -> tuple[LesionTable, LesionEncoder]:
        lt = self.table(name)
        with self._lock:
            enc = self._encoders.get(lt.name)
            if enc is None or enc.grid.config != lt.config:
                enc = self._encoders[lt.name] = create_lesion_encoder(lt.config, self.data_root)
        return lt, enc

    # -- templates ---------------------------------------------------------------------
    def templates(self) -> list[dict[str, Any]]:
        out = []
        for name in self.names():
            lt, enc = self.encoder(name)
            d = enc.grid.describe()
            for lv in d["levels"]:
                lv["png_url"] = f"/v1/templates/{name}/levels/{lv['level']}.png"
            out.append(
                {
                    "table": name,
                    **d,
                    "regions": list(regions.NAMES),
                    "patients": lt.patients(),
                    "lesion_slices": lt.count(),
                }
            )
        return out

    def level_png(self, name: str, level: int, *, outlines: bool = False) -> bytes:
        _, enc = self.encoder(name)
        tg = enc.grid
        tg.check_level(level)
        key = (name, level, outlines)
        with self._lock:
            if key not in self._png:
                rgb = _grey(tg.template_slice(level))
                if outlines:
                    reg = tg.box(
                        getattr(enc, "regions", np.zeros(tg.ref.array.shape, np.int8))[tg.slab(level)][
                            tg.config.level_mm // 2
                        ]
                    )
                    edge = np.zeros(reg.shape, bool)
                    edge[:, 1:] |= reg[:, 1:] != reg[:, :-1]
                    edge[1:, :] |= reg[1:, :] != reg[:-1, :]
                    rgb[edge] = rgb[edge] // 2 + np.array([0, 60, 120], np.uint8)
                self._png[key] = png_bytes(rgb)
            return self._png[key]

    # -- search ------------------------------------------------------------------------
    def box_masks(
        self, enc: LesionEncoder, masks: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, npt.NDArray[np.float64]]:
        """Per class ``{"png": base64}`` or ``{"polygons": [[[x, y], ...], ...]}`` -> box masks."""
        out = {}
        for cls, m in masks.items():
            name = f"sketch[{cls}]"
            if m.get("png"):
                out[cls] = raster.to_box(decode_png(m["png"], name=name), enc.grid, name=name)
            elif m.get("polygons"):
                out[cls] = raster.polygons_to_box(m["polygons"], enc.grid)
            else:
                raise DataError(f"{name}: give a 'png' or 'polygons'")
        return out

    def search(
        self,
        table: str | None,
        level: int,
        masks: Mapping[str, npt.NDArray[np.float64]] | Mapping[str, Mapping[str, Any]],
        options: SketchOptions,
        *,
        thumbnails: bool = True,
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        lt, enc = self.encoder(table)
        enc.grid.check_level(level)
        boxes: dict[str, npt.NDArray[np.float64]] = (
            self.box_masks(enc, masks)  # type: ignore[arg-type]
            if all(isinstance(m, Mapping) for m in masks.values())
            else {c: np.asarray(m, np.float64) for c, m in masks.items()}
        )
        query = encode_sketches(enc, boxes, level)
        t1 = time.perf_counter()
        snap = lt.snapshot()
        hits, n = search_snapshot(snap, query, level, options)
        t2 = time.perf_counter()
        result = SketchResult(level, query, hits, n)
        out = self._describe(lt, enc, snap, result, thumbnails=thumbnails)
        out["timings_ms"] = {
            "sketch": round((t1 - t0) * 1e3, 3),
            "search": round((t2 - t1) * 1e3, 3),
            "total": round((time.perf_counter() - t0) * 1e3, 3),
        }
        return out

    def _describe(
        self, lt: LesionTable, enc: LesionEncoder, snap: LesionSnapshot, r: SketchResult, *, thumbnails: bool
    ) -> dict[str, Any]:
        tg = enc.grid
        g = tg.config.grid
        rows = lt.take([h.row for h in r.hits], snap)
        q_bits = {c: raster.unpack(s.code, g) for c, s in r.query.items()}
        hits = []
        for rank, (h, row) in enumerate(zip(r.hits, rows, strict=True), start=1):
            prof = {n: round(float(v), 4) for n, v in zip(lt.region_names, row["regions"], strict=True) if v > 0}
            hit: dict[str, Any] = {
                "rank": rank,
                "patient": h.patient,
                "source_uri": row["source_uri"],
                "level": row["level"],
                "level_mm": row["level_mm"],
                "class": row["class"],
                "dice": round(h.dice, 6),
                "score": round(h.score, 6),
                "per_class_dice": {c: round(v, 6) for c, v in h.per_class.items()},
                "area_mm2": round(row["area_mm2"], 1),
                "centroid_mm": [round(v, 1) for v in row["centroid_mm"]],
                "hemisphere": row["hemisphere"],
                "regions": prof,
            }
            if thumbnails:
                hit["thumbnail"] = data_url(self._thumbnail(tg, row, q_bits))
            hits.append(hit)
        return {
            "table": lt.name[: -len(SUFFIX)],
            "template": tg.config.template,
            "level": r.level,
            "level_mm": round(tg.level_mm(r.level), 2),
            "candidates": r.candidates,
            "patients_searchable": lt.patients(),
            "query": {
                c: {
                    "bits": int(s.bits),
                    "grid": q_bits[c].astype(int).tolist(),
                    "hemisphere": s.hemisphere,
                    "regions": {n: round(float(v), 4) for n, v in zip(regions.NAMES, s.profile, strict=True) if v > 0},
                    "png": data_url(png_bytes((np.kron(q_bits[c], np.ones(tg.cell, bool)) * 255).astype(np.uint8))),
                }
                for c, s in r.query.items()
            },
            "results": hits,
        }

    def _thumbnail(self, tg: Any, row: Mapping[str, Any], q_bits: Mapping[str, npt.NDArray[np.bool_]]) -> bytes:
        rgb = _grey(tg.template_slice(int(row["level"])))
        stored = raster.unpack(np.asarray(row["code"], np.uint8), tg.config.grid)
        for bits in q_bits.values():
            rgb[cells_outline(bits, rgb.shape[:2])] = (40, 220, 40)
        rgb[cells_outline(stored, rgb.shape[:2])] = (230, 30, 30)
        return png_bytes(rgb)


_SEARCHES: weakref.WeakKeyDictionary[Any, SketchSearch] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def sketch_search_of(service: Any) -> SketchSearch:
    """The service's :class:`SketchSearch`, made on first use (one per service object)."""
    with _LOCK:
        s = _SEARCHES.get(service)
        if s is None:
            cfg = service.cfg
            s = _SEARCHES[service] = SketchSearch(cfg.index, cfg.s3, refresh_s=cfg.refresh_s)
        return s


def options(k: int, tolerance: int = 1, region_weight: float = 0.0) -> SketchOptions:
    return SketchOptions(k=k, tolerance=tolerance, region_weight=region_weight)


__all__: Sequence[str] = ["SketchSearch", "decode_png", "options", "sketch_search_of"]
