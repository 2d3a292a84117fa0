"""The objects an indexing job quarantined: list them with the class of their reason, and index them again.

A retry is the indexing job itself (:func:`medret.pipelines.backfill.run_index`), run once per source
the objects were listed under, on those objects only, into the same table with the encoder the
table was built with (unless another is named).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from medret.config import S3Config
from medret.errors import ConfigError

if TYPE_CHECKING:
    from medret.pipelines.commits import Summary


def quarantined(index: str, table: str = "codes", s3: S3Config | None = None) -> list[dict[str, Any]]:
    """The manifest rows of the quarantined objects, by URI, each with its ``reason_class``
    (``"object"``: the object itself is bad; ``"storage"``: a storage fault an older medret recorded)."""
    from medret.index.manifest import Manifest, reason_class

    manifest = Manifest(index, table, s3 or S3Config(), create=False)
    rows = manifest.as_rows("status = 'quarantined'")
    for r in rows:
        r["reason_class"] = reason_class(str(r["error"]))
    return rows


def by_source(rows: Iterable[Mapping[str, Any]], uris: Iterable[str] = ()) -> dict[str, list[str]]:
    """Source -> the URIs of ``rows`` to retry under it: those in ``uris``, or all when it is empty.

    >>> rows = [{"uri": "s3://b/x/a.png", "source": "s3://b/x"}, {"uri": "s3://b/y/c.png", "source": "s3://b/y"}]
    >>> by_source(rows)
    {'s3://b/x': ['s3://b/x/a.png'], 's3://b/y': ['s3://b/y/c.png']}
    >>> by_source(rows, ["s3://b/y/c.png"])
    {'s3://b/y': ['s3://b/y/c.png']}
    """
    rows = list(rows)
    wanted = set(uris) or {str(r["uri"]) for r in rows}
    out: dict[str, list[str]] = {}
    for r in rows:
        if r["uri"] in wanted:
            out.setdefault(str(r["source"]), []).append(str(r["uri"]))
    return out


def retry(
    index: str,
    table: str = "codes",
    *,
    s3_endpoint: str | None = None,
    uris: Iterable[str] = (),
    checkpoint: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    out: str | None = None,
    progress: bool | None = None,
) -> Iterator[Summary]:
    """Index the quarantined objects (``uris``, or all of them) again; yields each source's job summary
    as that job ends. ``overrides`` are any further ``IndexJobConfig`` fields (dotted keys)."""
    from medret.config import load_config
    from medret.index.store import CodeIndex
    from medret.pipelines.backfill import run_index
    from medret.pipelines.config import IndexJobConfig

    s3 = S3Config(endpoint_url=s3_endpoint)
    rows = quarantined(index, table, s3)
    unknown = set(uris) - {str(r["uri"]) for r in rows}
    if unknown:
        raise ConfigError(f"not quarantined in {index} table {table!r}: {sorted(unknown)[:5]}")
    todo = by_source(rows, uris)
    if not todo:
        return
    checkpoint = checkpoint or CodeIndex.open(index, table=table, s3=s3).checkpoint
    for source, objects in sorted(todo.items()):
        config = {
            "source": source,
            "index.uri": index,
            "index.table": table,
            "encoder": checkpoint,
            "only": objects,
            "s3.endpoint_url": s3_endpoint,
            "out": out,
            "progress": progress,
            **(overrides or {}),
        }
        yield run_index(load_config(IndexJobConfig, None, overrides=config))
