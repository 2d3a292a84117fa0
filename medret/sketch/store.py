"""The lesion table ``<table>__lesions``: template-space lesion codes per (volume, level, class).

One row per level and lesion class of every indexed volume that came with a lesion mask, keyed
by ``lesion_id`` (``<source_uri>#level=<i>&class=<name>``). The table's schema metadata records
the lesion encoder's config (:class:`~medret.sketch.grid.LesionGridConfig`) and the region names,
so a reader rebuilds the same query path from the table alone. :meth:`LesionTable.replace`
swaps all rows of some volumes in one commit (a ``merge_insert`` that also deletes their rows
that are gone), so a rerun makes the same rows and a volume is never half replaced.
"""

from __future__ import annotations

import json
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
from medret.index.search import to_columns
from medret.index.store import CompanionTable, connect
from medret.sketch import regions
from medret.sketch.encoder import LesionSlice
from medret.sketch.grid import LesionGridConfig

SUFFIX = "__lesions"
ENCODER_KEY = b"medret.lesion_encoder"
REGIONS_KEY = b"medret.lesion_regions"


def lesions_table(table: str) -> str:
    return f"{table}{SUFFIX}"


def lesion_schema(config: LesionGridConfig) -> pa.Schema:
    fields = [
        pa.field("lesion_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("patient", pa.string(), nullable=False),
        pa.field("mask_uri", pa.string()),
        # what the rows were made from: "<image etag>|<mask etag>" (the job remakes a volume's rows when it changes)
        pa.field("source_version", pa.string()),
        pa.field("level", pa.int32(), nullable=False),
        pa.field("level_mm", pa.float64(), nullable=False),
        pa.field("class", pa.string(), nullable=False),
        pa.field("code", pa.list_(pa.uint8(), config.bits // 8), nullable=False),
        pa.field("bits", pa.int32(), nullable=False),
        pa.field("area_mm2", pa.float64(), nullable=False),
        pa.field("centroid_mm", pa.list_(pa.float64(), 3), nullable=False),
        pa.field("hemisphere", pa.string(), nullable=False),
        pa.field("regions", pa.list_(pa.float32(), len(regions.NAMES)), nullable=False),
        pa.field("updated_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
    meta = {
        ENCODER_KEY: json.dumps(config.as_dict(), sort_keys=True).encode(),
        REGIONS_KEY: json.dumps(list(regions.NAMES)).encode(),
    }
    return pa.schema(fields, metadata=meta)


def lesion_rows(
    source_uri: str, slices: Sequence[LesionSlice], *, patient: str = "", mask_uri: str = "", version: str = ""
) -> list[dict[str, Any]]:
    """The lesion table rows of one volume (from :meth:`LesionEncoder.encode_volume`)."""
    now = datetime.now(timezone.utc)
    return [
        {
            "lesion_id": f"{source_uri}#level={s.level}&class={s.cls}",
            "source_uri": source_uri,
            "patient": patient or source_uri,
            "mask_uri": mask_uri or None,
            "source_version": version or None,
            "level": s.level,
            "level_mm": s.level_mm,
            "class": s.cls,
            "code": s.code.tolist(),
            "bits": s.bits,
            "area_mm2": s.area_mm2,
            "centroid_mm": list(s.centroid_mm),
            "hemisphere": s.hemisphere,
            "regions": s.profile.tolist(),
            "updated_at": now,
        }
        for s in slices
    ]


@dataclass(frozen=True)
class LesionSnapshot:
    """The searchable columns of one table version, in memory."""

    version: int
    cols: npt.NDArray[np.uint64]  # (w, n) word columns
    bits: npt.NDArray[np.int64]
    level: npt.NDArray[np.int64]
    cls: npt.NDArray[np.int16]  # index into ``classes``
    classes: tuple[str, ...]
    patient: npt.NDArray[np.object_]
    profiles: npt.NDArray[np.float32]  # (n, regions)
    dataset: Any = None  # the Lance dataset pinned at ``version``: full rows by position (LesionTable.take)

    @property
    def n(self) -> int:
        return int(self.bits.shape[0])

    def candidates(self, level: int, tolerance: int, cls: str | None) -> npt.NDArray[np.int64]:
        keep = np.abs(self.level - level) <= tolerance
        if cls:
            keep &= self.cls == (self.classes.index(cls) if cls in self.classes else -1)
        return np.flatnonzero(keep).astype(np.int64)


def snapshot_of(table: pa.Table, version: int, code_bytes: int, dataset: Any = None) -> LesionSnapshot:
    n = table.num_rows
    flat = table.column("code").combine_chunks().values.to_numpy(zero_copy_only=False) if n else np.zeros(0, np.uint8)
    codes = np.asarray(flat, np.uint8).reshape(n, code_bytes)
    classes, cls_codes = np.unique(np.asarray(table.column("class").to_pylist(), dtype=object), return_inverse=True)
    prof = table.column("regions").combine_chunks().values.to_numpy(zero_copy_only=False) if n else np.zeros(0)
    return LesionSnapshot(
        version=version,
        cols=to_columns(codes),
        bits=table.column("bits").to_numpy().astype(np.int64),
        level=table.column("level").to_numpy().astype(np.int64),
        cls=cls_codes.astype(np.int16),
        classes=tuple(str(c) for c in classes),
        patient=np.asarray(table.column("patient").to_pylist(), dtype=object),
        profiles=np.asarray(prof, np.float32).reshape(n, len(regions.NAMES)),
        dataset=dataset,
    )


class LesionTable(CompanionTable):
    """The lesion table of one code table: :meth:`open` it to read, :meth:`for_index` to write."""

    def __init__(self, table: Any, *, uri: str, name: str) -> None:
        self._table = table
        self.uri = uri
        self.name = name
        meta = table.schema.metadata or {}
        self.config = LesionGridConfig.from_dict(json.loads(meta[ENCODER_KEY]))
        self.region_names: list[str] = json.loads(meta.get(REGIONS_KEY, b"[]"))
        self._snapshot: LesionSnapshot | None = None

    @classmethod
    def open(cls, uri: str, table: str, s3: S3Config | None = None) -> LesionTable:
        db = connect(uri, s3)
        name = lesions_table(table)
        if name not in db.list_tables().tables:
            raise TableNotFoundError(
                f"table {table!r} at {uri} has no lesion table ({name!r}): none of its volumes came with a "
                "lesion mask (a *_seg/*_mask file beside the image or a mask_path sidecar column)"
            )
        return cls(db.open_table(name), uri=uri, name=name)

    @staticmethod
    def exists(uri: str, table: str, s3: S3Config | None = None) -> bool:
        return lesions_table(table) in connect(uri, s3).list_tables().tables

    @classmethod
    def for_index(cls, uri: str, table: str, config: LesionGridConfig, s3: S3Config | None = None) -> LesionTable:
        """Open or create; a table built with another lesion encoder config is refused."""
        db = connect(uri, s3)
        name = lesions_table(table)
        if name in db.list_tables().tables:
            out = cls(db.open_table(name), uri=uri, name=name)
            if out.config != config:
                raise ConfigError(
                    f"lesion table {name!r} at {uri} was built with {out.config.as_dict()}; refusing "
                    f"{config.as_dict()}. Drop the lesion table to rebuild it with the new config."
                )
            return out
        return cls(db.create_table(name, schema=lesion_schema(config)), uri=uri, name=name)

    def replace(self, source_uris: Sequence[str], rows: Sequence[dict[str, Any]]) -> int:
        """Rows of ``source_uris`` become ``rows`` in one commit (a volume absent from ``rows`` loses its rows)."""
        if not source_uris:
            return 0
        stray = {r["source_uri"] for r in rows} - set(source_uris)
        if stray:
            raise ValueError(f"rows for volumes not being replaced: {sorted(stray)[:3]}")
        data = pa.Table.from_pylist(list(rows), schema=self._table.schema)
        where = f"source_uri IN ({', '.join(quote(u) for u in sorted(set(source_uris)))})"
        (
            self._table.merge_insert("lesion_id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .when_not_matched_by_source_delete(where)
            .execute(data)
        )
        self._snapshot = None
        return data.num_rows

    # -- reads -------------------------------------------------------------------------
    def versions(self) -> dict[str, str]:
        """``source_uri -> source_version`` of every volume with rows ("" where none was recorded)."""
        t = self._table.to_lance().to_table(columns=["source_uri", "source_version"])
        return {str(u): str(v or "") for u, v in zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True)}

    def patients(self) -> int:
        t = self._table.to_lance().to_table(columns=["patient"])
        return len(set(t.column("patient").to_pylist()))

    def snapshot(self) -> LesionSnapshot:
        """The searchable columns of the current version, in scan order (cached per version)."""
        v = self.version
        if self._snapshot is None or self._snapshot.version != v:
            ds = self._table.to_lance()
            cols = ["code", "bits", "level", "class", "patient", "regions"]
            t = ds.to_table(columns=cols, scan_in_order=True)
            self._snapshot = snapshot_of(t, v, self.config.bits // 8, ds)
        return self._snapshot

    def take(self, positions: Sequence[int], snapshot: LesionSnapshot | None = None) -> list[dict[str, Any]]:
        """Full rows at positions of ``snapshot`` (default: the current one), in the order asked; positions
        always refer to the snapshot they were found in, whatever commits came since."""
        snap = snapshot or self.snapshot()
        if not len(positions):
            return []
        return list(snap.dataset.take(list(map(int, positions))).to_pylist())
