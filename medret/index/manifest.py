"""The manifest beside a code table: one row per source object and what became of it.

Keyed by the object's URI. An object is *done* at an etag when its row says
``indexed`` or ``quarantined`` at that etag with the table's encoder; anything else
(new, changed, never committed because a run died) is indexed again. The index
commit for an object always lands before its manifest row, so a crash between the
two only means the object is indexed again, with the same item ids, replacing
itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from medret.config import S3Config
from medret.index.filters import quote
from medret.index.store import connect

STATUSES = ("indexed", "quarantined", "deleted", "moved")  # moved: a routed job sends its kind elsewhere now

#: how storage faults read in quarantine reasons recorded before medret told them from bad objects
#: (it no longer quarantines for them); such objects are retried by the next run
_STORAGE_REASON = re.compile(
    r"Could not connect to the endpoint|Connect timeout|Read timeout|Connection (?:was closed|reset|refused|aborted)"
    r"|Max retries exceeded|EndpointConnectionError|SlowDown|ServiceUnavailable|Service Unavailable|InternalError"
    r"|Throttl|RequestLimitExceeded|TooManyRequests|ExpiredToken|InvalidAccessKeyId|SignatureDoesNotMatch"
    r"|AccessDenied|Temporary failure in name resolution|Name or service not known|response broke off"
    r"|storage_retry_s=",
    re.IGNORECASE,
)


def reason_class(error: str) -> str:
    """``"object"`` for a reason that says the object is bad, ``"storage"`` for a storage fault.

    >>> reason_class("s3://b/a.png: not a PNG, JPEG, BMP or TIFF file")
    'object'
    >>> reason_class("reading s3://b/a.png: Could not connect to the endpoint URL: http://127.0.0.1:8333/b/a.png")
    'storage'
    """
    return "storage" if _STORAGE_REASON.search(error or "") else "object"


SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("source", pa.string()),  # the source root the object was listed under
        pa.field("etag", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("kind", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("items", pa.int64()),
        pa.field("encoder_id", pa.string()),
        pa.field("error", pa.string()),
        pa.field("attempts", pa.int64()),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass
class Entry:
    uri: str
    source: str
    etag: str
    size: int
    kind: str
    status: str
    items: int
    encoder_id: str
    error: str = ""
    attempts: int = 1
    updated_at: datetime | None = None


def manifest_name(table: str) -> str:
    return f"{table}__manifest"


class Manifest:
    """The manifest table of code table ``table`` at ``uri``."""

    def __init__(self, uri: str, table: str = "codes", s3: S3Config | None = None, *, create: bool = True) -> None:
        from medret.errors import TableNotFoundError

        self.uri, self.name = uri, manifest_name(table)
        db = connect(uri, s3)
        if self.name in db.list_tables().tables:
            self._table = db.open_table(self.name)
        elif create:
            self._table = db.create_table(self.name, schema=SCHEMA)
        else:
            raise TableNotFoundError(f"no manifest for table {table!r} at {uri} (nothing was indexed there)")

    def entries(self, where: str | None = None) -> dict[str, Entry]:
        self._table.checkout_latest()
        rows = self._table.to_lance().to_table(filter=where).to_pylist()
        return {r["uri"]: Entry(**r) for r in rows}

    def with_status(self, status: str) -> list[Entry]:
        return sorted(self.entries(f"status = {quote(status)}").values(), key=lambda e: e.uri)

    def record(self, entries: Iterable[Entry]) -> int:
        """Upsert entries by URI in one commit."""
        now = datetime.now(timezone.utc)
        rows = [{f.name: getattr(e, f.name) for f in fields(Entry)} | {"updated_at": now} for e in entries]
        if not rows:
            return 0
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        self._table.merge_insert("uri").when_matched_update_all().when_not_matched_insert_all().execute(table)
        return len(rows)

    def counts(self) -> dict[str, int]:
        self._table.checkout_latest()
        t = self._table.to_lance().to_table(columns=["status"])
        out: dict[str, int] = {}
        for s in t.column("status").to_pylist():
            out[s] = out.get(s, 0) + 1
        return out

    def forget(self, uris: Sequence[str]) -> None:
        for start in range(0, len(uris), 500):
            self._table.delete(f"uri IN ({', '.join(quote(u) for u in uris[start : start + 500])})")

    def as_rows(self, where: str | None = None) -> list[dict[str, Any]]:
        return [
            {**e.__dict__, "updated_at": e.updated_at.isoformat() if e.updated_at else None}
            for e in sorted(self.entries(where).values(), key=lambda e: e.uri)
        ]
