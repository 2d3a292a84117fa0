"""The slide table: one bag (mosaic) of tile codes per indexed slide, beside the tile table.

A code table ``T`` that holds slide tiles gets a companion table ``T__slides`` with one row per
slide (keyed by the slide's ``source_uri``): the tiles :func:`~medret.slides.mosaic.select_mosaic`
picked, with their item ids, coordinates and codes, and a digest of the slide's tiles as the
tile table holds them. The table's metadata records the mosaic config and the tile table's
encoder id.

The bags are derived data, kept in step with the tiles by :meth:`SlideBags.sync`:

- the indexing job syncs the slides of every commit right after it, and
- syncs the whole table when it finishes (:meth:`SlideBags.reconcile`): a slide whose tiles
  changed (or that has no bag, e.g. the job was killed between the two commits) gets its bag
  made again, and a bag whose slide has no tiles left (deleted by an incremental run) goes.

A bag is a pure function of the slide's tile rows and the mosaic config, so a rerun makes the
same bag, and ``merge_insert`` on ``source_uri`` keeps exactly one row per slide.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from medret.config import S3Config
from medret.errors import ConfigError, TableNotFoundError
from medret.index.filters import quote
from medret.index.store import CodeIndex, CompanionTable, connect
from medret.slides.match import BagGallery
from medret.slides.mosaic import MosaicConfig, select_mosaic

log = logging.getLogger(__name__)

SUFFIX = "__slides"
MOSAIC_KEY = b"medret.mosaic"
TILE_ENCODER_KEY = b"medret.tile_encoder_id"
#: the tile table's columns a bag is made from
TILE_COLUMNS = ["item_id", "source_uri", "slide_id", "code", "tile_x", "tile_y", "mpp", "label"]
#: rows of the tile table that are slide tiles
IS_TILE = "slide_id IS NOT NULL AND slide_id != '' AND tile_x IS NOT NULL"


def slides_table(table: str) -> str:
    """The name of the slide table beside the code table ``table``."""
    return f"{table}{SUFFIX}"


def is_slides_table(name: str) -> bool:
    return name.endswith(SUFFIX)


def bag_schema(code_bytes: int, mosaic: MosaicConfig, encoder_id: str) -> pa.Schema:
    fields = [
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("mpp", pa.float64()),
        pa.field("n_tiles", pa.int64(), nullable=False),
        pa.field("digest", pa.string(), nullable=False),
        pa.field("tile_ids", pa.list_(pa.string()), nullable=False),
        pa.field("tile_x", pa.list_(pa.int64()), nullable=False),
        pa.field("tile_y", pa.list_(pa.int64()), nullable=False),
        pa.field("codes", pa.list_(pa.list_(pa.uint8(), code_bytes)), nullable=False),
        pa.field("updated_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
    meta = {
        MOSAIC_KEY: json.dumps(dataclasses.asdict(mosaic), sort_keys=True).encode(),
        TILE_ENCODER_KEY: encoder_id.encode(),
    }
    return pa.schema(fields, metadata=meta)


@dataclass(frozen=True)
class SlideTiles:
    """One slide's tiles as the tile table holds them, in a canonical order (by item id)."""

    source_uri: str
    slide_id: str
    label: str | None
    mpp: float | None
    item_ids: npt.NDArray[np.object_]
    xy: npt.NDArray[np.int64]  # (n, 2) tile_x, tile_y at level 0
    codes: npt.NDArray[np.uint8]  # (n, bytes)

    def digest(self, mosaic: MosaicConfig) -> str:
        """What the bag depends on: the tiles (ids, places, codes) and the mosaic config."""
        h = hashlib.sha256(json.dumps(dataclasses.asdict(mosaic), sort_keys=True).encode())
        h.update("\n".join(self.item_ids.tolist()).encode())
        h.update(np.ascontiguousarray(self.xy).tobytes())
        h.update(np.ascontiguousarray(self.codes).tobytes())
        return h.hexdigest()[:32]


def group_tiles(rows: pa.Table, code_bytes: int) -> list[SlideTiles]:
    """Tile rows of any number of slides -> one :class:`SlideTiles` per source object."""
    if rows.num_rows == 0:
        return []
    uris = rows.column("source_uri").to_numpy(zero_copy_only=False).astype(str)
    ids = rows.column("item_id").to_numpy(zero_copy_only=False).astype(str)
    order = np.lexsort((ids, uris))  # by slide, then by item id: the canonical order
    uris, ids = uris[order], ids[order]
    flat = rows.column("code").combine_chunks().values.to_numpy(zero_copy_only=False)
    codes = flat.reshape(rows.num_rows, code_bytes)[order]
    xy = np.stack(
        [
            rows.column(c).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)[order]
            for c in ("tile_x", "tile_y")
        ],
        axis=1,
    )
    names = rows.column("slide_id").to_numpy(zero_copy_only=False)[order]
    labels = rows.column("label").to_numpy(zero_copy_only=False)[order]
    mpps = rows.column("mpp").to_numpy(zero_copy_only=False)[order]
    starts = np.flatnonzero(np.concatenate([[True], uris[1:] != uris[:-1]]))
    ends = np.concatenate([starts[1:], [len(uris)]])
    out = []
    for a, b in zip(starts, ends, strict=True):
        mpp = mpps[a]
        out.append(
            SlideTiles(
                source_uri=str(uris[a]),
                slide_id=str(names[a]),
                label=None if labels[a] is None else str(labels[a]),
                mpp=None if mpp is None or (isinstance(mpp, float) and np.isnan(mpp)) else float(mpp),
                item_ids=ids[a:b].astype(object),
                xy=xy[a:b],
                codes=codes[a:b],
            )
        )
    return out


def make_bag(tiles: SlideTiles, mosaic: MosaicConfig) -> dict[str, Any]:
    """The slide table row of one slide: its mosaic's tiles, in canonical order."""
    pick = select_mosaic(tiles.codes, tiles.xy, config=mosaic)
    return {
        "source_uri": tiles.source_uri,
        "slide_id": tiles.slide_id,
        "label": tiles.label,
        "mpp": tiles.mpp,
        "n_tiles": len(tiles.item_ids),
        "digest": tiles.digest(mosaic),
        "tile_ids": [str(i) for i in tiles.item_ids[pick]],
        "tile_x": tiles.xy[pick, 0].tolist(),
        "tile_y": tiles.xy[pick, 1].tolist(),
        "codes": tiles.codes[pick].tolist(),
        "updated_at": datetime.now(timezone.utc),
    }


class SlideBags(CompanionTable):
    """The slide table of one code table. :meth:`open` it to read, :meth:`for_index` to keep it in step."""

    def __init__(self, table: Any, index: CodeIndex) -> None:
        self._table = table
        self.index = index
        self.name = slides_table(index.name)
        meta = table.schema.metadata or {}
        self.mosaic = MosaicConfig(**json.loads(meta[MOSAIC_KEY]))
        self.tile_encoder_id = meta.get(TILE_ENCODER_KEY, b"").decode()
        self._gallery: tuple[int, BagGallery | None, pa.Table] | None = None

    @classmethod
    def open(cls, index: CodeIndex, s3: S3Config | None = None) -> SlideBags:
        """The slide table beside ``index``; :class:`TableNotFoundError` when there is none."""
        db = connect(index.uri, s3)
        name = slides_table(index.name)
        if name not in db.list_tables().tables:
            raise TableNotFoundError(
                f"table {index.name!r} at {index.uri} has no slide table ({name!r}): it holds no slide tiles, "
                "or they were indexed before slide search existed (run the indexing job again to build it)"
            )
        return cls(db.open_table(name), index)

    @classmethod
    def for_index(cls, index: CodeIndex, mosaic: MosaicConfig | None = None, s3: S3Config | None = None) -> SlideBags:
        """Open the slide table, or create it; a different mosaic config than the recorded one is refused."""
        mosaic = mosaic or MosaicConfig()
        db = connect(index.uri, s3)
        name = slides_table(index.name)
        if name in db.list_tables().tables:
            bags = cls(db.open_table(name), index)
            if bags.mosaic != mosaic:
                raise ConfigError(
                    f"slide table {name!r} at {index.uri} was built with mosaic {dataclasses.asdict(bags.mosaic)}; "
                    f"refusing {dataclasses.asdict(mosaic)}. Drop the slide table to rebuild it with the new one."
                )
            return bags
        schema = bag_schema(index.encoder.code_bytes, mosaic, index.encoder_id)
        return cls(db.create_table(name, schema=schema), index)

    # -- writes ----------------------------------------------------------------------
    def _tiles(self, where: str) -> list[SlideTiles]:
        ds = self.index._table.to_lance()
        rows = ds.to_table(columns=TILE_COLUMNS, filter=f"({IS_TILE}) AND ({where})" if where else IS_TILE)
        return group_tiles(rows, self.index.encoder.code_bytes)

    def _digests(self, where: str | None = None) -> dict[str, str]:
        t = self._table.to_lance().to_table(columns=["source_uri", "digest"], filter=where)
        return dict(zip(t.column("source_uri").to_pylist(), t.column("digest").to_pylist(), strict=True))

    def _write(self, slides: list[SlideTiles], known: dict[str, str]) -> int:
        rows = [make_bag(s, self.mosaic) for s in slides if known.get(s.source_uri) != s.digest(self.mosaic)]
        if rows:
            table = pa.Table.from_pylist(rows, schema=self._table.schema)
            self._table.merge_insert("source_uri").when_matched_update_all().when_not_matched_insert_all().execute(
                table
            )
        return len(rows)

    def _delete(self, uris: Sequence[str]) -> None:
        for start in range(0, len(uris), 500):
            chunk = uris[start : start + 500]
            self._table.delete(f"source_uri IN ({', '.join(quote(u) for u in chunk)})")

    def sync(self, source_uris: Sequence[str]) -> dict[str, int]:
        """Bring the bags of these objects in step with their tiles (made, remade, or removed)."""
        if not source_uris:
            return {"written": 0, "deleted": 0}
        where = f"source_uri IN ({', '.join(quote(u) for u in sorted(set(source_uris)))})"
        slides = self._tiles(where)
        known = self._digests(where)
        written = self._write(slides, known)
        gone = sorted(set(source_uris) - {s.source_uri for s in slides})
        stale = [u for u in gone if u in known]
        self._delete(stale)
        return {"written": written, "deleted": len(stale)}

    def reconcile(self) -> dict[str, int]:
        """The whole slide table in step with the tile table: every slide with tiles has exactly one
        current bag, and no bag outlives its slide."""
        slides = self._tiles("")
        known = self._digests()
        written = self._write(slides, known)
        stale = sorted(set(known) - {s.source_uri for s in slides})
        self._delete(stale)
        return {"written": written, "deleted": len(stale), "slides": len(slides)}

    # -- reads -----------------------------------------------------------------------
    def rows(self, columns: Sequence[str] | None = None, where: str | None = None) -> pa.Table:
        """The slide rows, ordered by source uri."""
        cols = list(dict.fromkeys(["source_uri", *columns])) if columns else None
        t = self._table.to_lance().to_table(columns=cols, filter=where)
        t = t.take(pa.compute.sort_indices(t, [("source_uri", "ascending")]))
        return t.select(list(columns)) if columns else t

    def gallery(self) -> tuple[BagGallery | None, pa.Table]:
        """Every bag for matching (keyed by source uri; None when there is no slide), and the rows it was built
        from; cached per table version."""
        v = self.version
        cached = self._gallery
        if cached is None or cached[0] != v:
            rows = self.rows()
            bags = [bag_codes(c) for c in rows.column("codes").to_pylist()]
            gallery = BagGallery.build(bags, rows.column("source_uri").to_pylist()) if bags else None
            cached = self._gallery = (v, gallery, rows)
        return cached[1], cached[2]

    def bag(self, source_uri: str) -> dict[str, Any] | None:
        t = self.rows(where=f"source_uri = {quote(source_uri)}")
        return t.to_pylist()[0] if t.num_rows else None


def bag_codes(codes: Sequence[Sequence[int]]) -> npt.NDArray[np.uint8]:
    """A bag's ``codes`` cell as packed codes (n, bytes)."""
    return np.asarray(codes, dtype=np.uint8).reshape(len(codes), -1)


def sync_job_slides(
    index: CodeIndex, source_uris: Sequence[str] | None, mosaic: MosaicConfig, s3: S3Config | None
) -> dict[str, int] | None:
    """The indexing job's hook: sync the bags of ``source_uris`` (None: reconcile the whole table).

    Nothing is created for a table that holds no slide tiles and has no slide table yet."""
    db = connect(index.uri, s3)
    if slides_table(index.name) not in db.list_tables().tables:
        where = IS_TILE
        if source_uris is not None:
            where += f" AND source_uri IN ({', '.join(quote(u) for u in source_uris)})"
        if (not source_uris and source_uris is not None) or not index.count(where):
            return None
    bags = SlideBags.for_index(index, mosaic, s3)
    return bags.reconcile() if source_uris is None else bags.sync(source_uris)
