"""Thumbnails: an indexed item rendered again from its source, as the encoder saw it, as PNG.

A thumbnail reads only the item's own ``source_uri``, and only when it lies under a root the
service may read: the configured ``roots``, else the sources the indexing jobs recorded in the
table's manifest. The item's kind (said by its id's suffix, else by the object's content)
renders it at ``thumb_px``; rendered PNGs are kept in a small LRU keyed by item and etag.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import numpy.typing as npt

from medret import kinds
from medret.errors import Forbidden, MedretError, NotFound, ObjectNotFoundError
from medret.index.manifest import manifest_name
from medret.index.store import CodeIndex, list_tables
from medret.kinds import Unit
from medret.serve.config import ServiceConfig
from medret.serve.tables import read_context

#: rendered thumbnails kept in memory
CACHE_SIZE = 2048


def _unit8(x: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    lo, hi = float(np.min(x)), float(np.max(x))
    if not (lo >= 0.0 and hi <= 1.0):  # z-scored inputs: stretch for display
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return np.clip(np.asarray(x) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def png_bytes(image: npt.NDArray[Any]) -> bytes:
    """A float image in [0, 1] (grey or RGB) or a uint8 image as PNG bytes.

    >>> png_bytes(np.zeros((4, 4), np.float32))[:8]
    b'\\x89PNG\\r\\n\\x1a\\n'
    """
    from PIL import Image

    arr = image if image.dtype == np.uint8 else _unit8(image)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def norm_root(uri: str) -> str:
    """A root as a prefix to compare sources with: normalised, no query, one trailing slash.

    >>> norm_root("/data/archive")
    '/data/archive/'
    """
    from medret.storage.uri import parse_uri

    return str(parse_uri(uri).without_query()).rstrip("/") + "/"


class Thumbnails:
    """Renders items of the index at ``cfg.index`` from their sources, within the roots. Thread-safe."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._roots: dict[str, tuple[str, ...]] = {}
        self._cache: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    def roots(self, idx: CodeIndex) -> tuple[str, ...]:
        """Where this table's thumbnails may be read from: configured roots, else the recorded sources."""
        if self.cfg.roots:
            return tuple(norm_root(r) for r in self.cfg.roots)
        with self._lock:
            if idx.name not in self._roots:
                sources: tuple[str, ...] = ()
                if manifest_name(idx.name) in list_tables(self.cfg.index, self.cfg.s3):
                    from medret.index.manifest import Manifest

                    rows = Manifest(self.cfg.index, idx.name, self.cfg.s3, create=False).as_rows()
                    sources = tuple(sorted({norm_root(r["source"]) for r in rows if r.get("source")}))
                self._roots[idx.name] = sources
            return self._roots[idx.name]

    def store_for(self, idx: CodeIndex, source_uri: str) -> tuple[Any, str]:
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

    def png(self, idx: CodeIndex, item_id: str, row: dict[str, Any]) -> bytes:
        """A PNG of the item (its table ``row``) as the encoder saw it (slide tiles in colour)."""
        key = (idx.name, item_id + "|" + str(row.get("etag", "")))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        source = str(row["source_uri"])
        store, obj_key = self.store_for(idx, source)
        try:
            png = png_bytes(self._render(idx, store, obj_key, source, item_id[len(source) :]))
        except ObjectNotFoundError as err:
            raise NotFound(f"the source of item {item_id[:200]!r} is gone: {err}") from err
        with self._lock:
            self._cache[key] = png
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return png

    def _render(self, idx: CodeIndex, store: Any, key: str, source: str, suffix: str) -> npt.NDArray[Any]:
        """The item's kind (said by its suffix, else by the object's content) renders it at thumbnail size."""
        size = (self.cfg.thumb_px, self.cfg.thumb_px)
        ctx = read_context(idx, pixel_budget=self.cfg.pixel_budget, store=store, input_size=size)
        kind = kinds.for_item(suffix)
        etag = kind.version(store, key) if kind is not None else store.info(key).etag
        if kind is None:
            kind = kinds.of_item(store, key, source, suffix, etag)
        return kind.render(ctx, Unit(source, key, etag), suffix)
