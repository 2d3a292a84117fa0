"""Metadata filters as safe LanceDB ``where`` clauses: known columns only, every value checked against its type."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pyarrow as pa

from medret.errors import SchemaError
from medret.index import schema as sch


def quote(value: object) -> str:
    """A SQL string literal: ``O'Brien`` -> ``'O''Brien'``."""
    return "'" + str(value).replace("'", "''") + "'"


def where_clause(filters: Mapping[str, object | Sequence[object]]) -> str | None:
    """Build a safe filter from ``{column: value or [values]}`` over known metadata columns.

    Every value is checked against its column's type; a value that does not fit raises
    :class:`~medret.errors.SchemaError` naming the column and the value.

    >>> where_clause({"modality": "CR", "label": ["1", "2"]})
    "modality = 'CR' AND label IN ('1', '2')"
    >>> where_clause({"tile_x": 448, "mpp": [0.5, 1]})
    'tile_x = 448 AND mpp IN (0.5, 1.0)'
    """
    parts = []
    for col, value in filters.items():
        if col not in sch.FILTER_COLUMNS:
            raise SchemaError(
                f"cannot filter on {str(col)[:80]!r}; filterable columns: {', '.join(sch.FILTER_COLUMNS)}"
            )
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        if not values or len(values) > MAX_FILTER_VALUES:
            raise SchemaError(f"filter {col!r} needs 1 to {MAX_FILTER_VALUES} values, got {len(values)}")
        literals = [_literal(col, v) for v in values]
        if isinstance(value, (list, tuple, set)):
            parts.append(f"{col} IN ({', '.join(literals)})")
        else:
            parts.append(f"{col} = {literals[0]}")
    return " AND ".join(parts) or None


MAX_FILTER_VALUES = 1000


def _literal(col: str, value: object) -> str:
    """One filter value as a SQL literal of the column's type, or a SchemaError that names both."""
    typ = sch.METADATA_COLUMNS[col][0]
    try:
        shown = repr(value)[:80]
    except ValueError:  # an int of more digits than Python will print
        raise SchemaError(f"filter {col!r}: a number too long to read") from None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SchemaError(f"filter {col!r}: values are strings or numbers, got {shown}")
    if pa.types.is_integer(typ):
        try:
            number = int(value) if isinstance(value, int) else int(str(value).strip())
        except ValueError:
            raise SchemaError(f"filter {col!r} is an integer column, got {shown}") from None
        if not -(2**63) <= number < 2**63:
            raise SchemaError(f"filter {col!r}: {shown} is out of the 64-bit range")
        return str(number)
    if pa.types.is_floating(typ):
        try:
            real = float(value)
        except (ValueError, OverflowError):
            raise SchemaError(f"filter {col!r} is a number column, got {shown}") from None
        if not math.isfinite(real):
            raise SchemaError(f"filter {col!r} needs a finite number, got {shown}")
        return repr(real)
    text = str(value)
    if len(text) > 1000 or "\x00" in text:
        raise SchemaError(f"filter {col!r}: values are at most 1000 characters with no NUL, got {shown}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SchemaError(f"filter {col!r}: {shown} is not valid Unicode text (a lone surrogate?)") from None
    return quote(text)
