"""The code table's Arrow schema: one row per indexed image or tile.

The encoder's config travels in the schema metadata (``medret.encoder``), so an
opened table says exactly how its codes were made.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from medret.errors import SchemaError
from medret.models import rerank
from medret.models.encoder import EncoderConfig

ENCODER_KEY = b"medret.encoder"
ENCODER_ID_KEY = b"medret.encoder_id"
CHECKPOINT_KEY = b"medret.checkpoint"
SCHEMA_VERSION_KEY = b"medret.schema_version"
RECIPES_KEY = b"medret.recipes"  # how each kind of object was preprocessed (kind -> recipe, tiling)
SERVES_KEY = b"medret.serves"  # the kinds a routed indexing job sends to this table (absent: every kind)
FEATURES_KEY = b"medret.features"  # how the ``feature`` column's compact features are made (models/rerank.py)
FEATURE_COLUMN = "feature"
SCHEMA_VERSION = "1"

# column -> (type, required). Optional columns may be omitted on write (they become null).
METADATA_COLUMNS: dict[str, tuple[pa.DataType, bool]] = {
    "item_id": (pa.string(), True),
    "source_uri": (pa.string(), True),
    "etag": (pa.string(), False),
    "modality": (pa.string(), False),
    "dataset": (pa.string(), False),
    "label": (pa.string(), False),
    "study_uid": (pa.string(), False),
    "series_uid": (pa.string(), False),
    "instance_uid": (pa.string(), False),
    "slide_id": (pa.string(), False),
    "tile_x": (pa.int64(), False),
    "tile_y": (pa.int64(), False),
    "mpp": (pa.float64(), False),
    "encoder_id": (pa.string(), True),
    "indexed_at": (pa.timestamp("us", tz="UTC"), True),
    "extra": (pa.string(), False),  # JSON object with anything else worth keeping
}
FILTER_COLUMNS = tuple(c for c in METADATA_COLUMNS if c not in ("extra", "indexed_at"))


def code_schema(encoder: EncoderConfig, checkpoint: str = "", recipes: dict[str, Any] | None = None) -> pa.Schema:
    fields = [pa.field(name, typ, nullable=not req) for name, (typ, req) in METADATA_COLUMNS.items()]
    fields.append(pa.field("code", pa.list_(pa.uint8(), encoder.code_bytes), nullable=False))
    # compact continuous features for re-ranking (null where an item has none; tables made before have no column)
    fields.append(pa.field(FEATURE_COLUMN, pa.list_(pa.int8(), rerank.DIMS), nullable=True))
    metadata = {
        ENCODER_KEY: encoder.to_json().encode(),
        ENCODER_ID_KEY: encoder.encoder_id.encode(),
        CHECKPOINT_KEY: checkpoint.encode(),
        SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode(),
        FEATURES_KEY: json.dumps(rerank.SPEC, sort_keys=True).encode(),
    }
    if recipes:
        metadata[RECIPES_KEY] = json.dumps(recipes, sort_keys=True).encode()
    return pa.schema(fields, metadata=metadata)


def encoder_of(schema: pa.Schema) -> EncoderConfig:
    meta = schema.metadata or {}
    if ENCODER_KEY not in meta:
        raise SchemaError("table has no medret encoder metadata; it was not written by medret")
    return EncoderConfig.from_json(meta[ENCODER_KEY])


def recipes_of(schema: pa.Schema) -> dict[str, Any] | None:
    """``{"kinds": {kind: recipe}, "tiling": {...}}`` as the indexing job recorded it, or None."""
    raw = (schema.metadata or {}).get(RECIPES_KEY)
    return dict(json.loads(raw)) if raw else None


def serves_of(schema: pa.Schema) -> tuple[str, ...] | None:
    """The kinds of object a routed indexing job sends to this table, or None when none were recorded
    (a table of a single-encoder job: it takes every kind)."""
    raw = (schema.metadata or {}).get(SERVES_KEY)
    return tuple(json.loads(raw)) if raw else None


def has_features(schema: pa.Schema) -> bool:
    """Whether the table keeps compact features beside its codes (tables made before re-ranking do not)."""
    return FEATURE_COLUMN in schema.names


def checkpoint_of(schema: pa.Schema) -> str:
    return (schema.metadata or {}).get(CHECKPOINT_KEY, b"").decode()


def conform(rows: pa.Table, schema: pa.Schema) -> pa.Table:
    """Reorder / add null columns / cast ``rows`` to ``schema``, or say what does not fit."""
    unknown = set(rows.column_names) - set(schema.names)
    if unknown:
        raise SchemaError(f"unknown columns {sorted(unknown)}; the table has {schema.names}")
    arrays = []
    for field in schema:
        if field.name not in rows.column_names:
            if not field.nullable:
                raise SchemaError(f"required column {field.name!r} is missing")
            arrays.append(pa.nulls(rows.num_rows, field.type))
            continue
        col = rows.column(field.name)
        if not field.nullable and col.null_count:
            raise SchemaError(f"column {field.name!r} must not hold nulls ({col.null_count} found)")
        try:
            arrays.append(col.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise SchemaError(f"column {field.name!r} cannot be stored as {field.type}: {err}") from err
    return pa.Table.from_arrays(arrays, schema=schema)
