"""What a source holds: its objects (with etags), the kind each is read as, and sidecar metadata.

A *DICOM series* (kind ``dicom-series``, by a route) is stored a slice per file: the
matching files of one folder become one object, keyed by the folder (``.../series/``)
with an etag digested from its members' keys and etags. The manifest then holds one
row per series folder; adding, changing or removing a slice re-indexes the series,
and removing every slice deletes it.

A *sidecar* is a CSV among the objects with a ``path`` column (relative to the
CSV's folder) and metadata columns (``label``, ``dataset``, ``modality``, any
index column; others go to ``extra``). Its rows travel with the objects they name,
and a changed row re-indexes its object: the metadata digest is part of the
object's effective etag.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import logging
import posixpath
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from medret import kinds
from medret.errors import DataError
from medret.kinds import Listing
from medret.pipelines.config import Route
from medret.storage.objects import ObjectStore

log = logging.getLogger(__name__)


@dataclass
class SourceObject:
    uri: str
    key: str
    etag: str  # effective: the object's etag, plus its sidecar metadata digest when it has some
    size: int
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)  # a series folder's slice files (keys)
    mask: str = ""  # a volume's lesion mask (key): a ``_seg``/``_mask`` sibling or the sidecar's ``mask_path``
    mask_etag: str = ""  # "" when the sidecar names a mask the source does not hold

    def row(self) -> dict[str, Any]:
        """The object as a row of the jobs' Ray Datasets (what :func:`medret.pipelines.stages.expand` takes)."""
        return {
            "uri": self.uri,
            "key": self.key,
            "etag": self.etag,
            "size": self.size,
            "kind": self.kind,
            "meta": json.dumps(self.meta) if self.meta else "",
            "members": json.dumps(self.members) if self.members else "",
        }


@dataclass
class Listed:
    """A listing of the source as one table's run sees it."""

    objects: list[SourceObject]  # the objects this table takes
    sidecars: int
    uris: set[str]  # every object the source lists, those of a routed run's other tables too
    seconds: float = 0.0
    table_of: dict[str, str] | None = None  # a routed run: object URI -> the table its kind goes to

    @classmethod
    def of(cls, store: ObjectStore, routes: Sequence[Route]) -> Listed:
        """The whole source, for a table that takes every object."""
        t = time.perf_counter()
        objects, sidecars = list_source(store, routes)
        return cls(objects, len(sidecars), {o.uri for o in objects}, time.perf_counter() - t)


#: the sidecar column naming a volume's lesion mask (relative to the CSV's folder, like ``path``)
MASK_COLUMN = "mask_path"


def route(key: str, routes: Sequence[Route]) -> str:
    """The kind of the first route whose pattern matches the key (case-insensitive), else the detecting one.

    >>> from medret.pipelines.config import default_routes
    >>> [route(k, default_routes()) for k in ("studies/a/IM0001.DCM", "x/scan.nii.gz", "notes")]
    ['dicom', 'nifti', 'auto']
    """
    low = key.lower()
    for r in routes:
        if fnmatch.fnmatchcase(low, r.pattern.lower()):
            return r.kind
    return kinds.auto().name


def read_sidecar(store: ObjectStore, key: str) -> dict[str, dict[str, Any]]:
    """``{object key: metadata}`` from one sidecar CSV."""
    try:
        text = store.read_bytes(key).decode("utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(text)))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{store.uri_of(key)}: sidecar is not a UTF-8 CSV: {err}") from err
    if rows and "path" not in rows[0]:
        raise DataError(f"{store.uri_of(key)}: sidecar CSV needs a 'path' column (has {list(rows[0])})")
    folder = posixpath.dirname(key)
    out = {}
    for row in rows:
        rel = (row.pop("path") or "").strip()
        if rel:
            meta = {k: v for k, v in row.items() if k and v != ""}
            if meta.get(MASK_COLUMN):  # a lesion mask is named like the object: relative to the CSV's folder
                meta[MASK_COLUMN] = posixpath.normpath(posixpath.join(folder, meta[MASK_COLUMN].strip()))
            out[posixpath.normpath(posixpath.join(folder, rel))] = meta
    return out


def meta_digest(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]


def series_object(store: ObjectStore, folder: str, members: Sequence[tuple[str, str, int]], kind: str) -> SourceObject:
    """One object of a series kind (``dicom-series``) from the ``(key, etag, size)`` of the files in ``folder``."""
    members = sorted(members)
    digest = hashlib.sha256("\n".join(f"{k}\t{e}" for k, e, _ in members).encode()).hexdigest()[:32]
    key = f"{folder}/" if folder else ""
    return SourceObject(
        store.uri_of(key).rstrip("/") + "/",
        key,
        f"series-{len(members)}-{digest}",
        sum(size for _, _, size in members),
        kind,
        members=[k for k, _, _ in members],
    )


def list_source(store: ObjectStore, routes: Sequence[Route]) -> tuple[list[SourceObject], list[str]]:
    """Every object to index (sidecar metadata and lesion masks attached) and the sidecar keys that were read.

    Lesion masks are not indexed as images: a ``*_seg``/``*_mask`` volume beside its image
    (``case_seg.nii.gz`` beside ``case.nii.gz``: :func:`medret.sketch.ingest.image_of_mask`) or a file
    a sidecar names in its ``mask_path`` column is attached to its image instead
    (:attr:`SourceObject.mask`). One with no image beside it (a ``brain_mask.nii.gz`` alone) is indexed
    as the volume it is. The mask's etag is not part of the image's: a changed mask re-makes the
    image's lesion rows, not its codes.
    """
    from medret.sketch.ingest import image_of_mask

    listed, sidecars = [], []
    series: dict[tuple[str, str], list[tuple[str, str, int]]] = {}
    for info in store.list():
        kind = kinds.get(route(info.key, routes))
        if kind.listing is Listing.DETECT and store.default_kind:
            kind = kinds.get(store.default_kind)
        if kind.listing is Listing.SIDECAR:
            sidecars.append(info.key)
        elif kind.listing is Listing.SERIES:
            series.setdefault((kind.name, posixpath.dirname(info.key)), []).append((info.key, info.etag, info.size))
        elif kind.listing is not Listing.SKIP:
            listed.append((info, kind.name))
    meta: dict[str, dict[str, Any]] = {}
    for key in sorted(sidecars):
        meta.update(read_sidecar(store, key))
    named = {str(m[MASK_COLUMN]) for m in meta.values() if m.get(MASK_COLUMN)}
    keys = {info.key for info, _ in listed}
    beside: dict[str, list[str]] = {}  # image key -> the masks beside it, _seg before _mask
    for info, _ in sorted(listed, key=lambda x: x[0].key):
        image = image_of_mask(info.key)
        if image in keys:
            beside.setdefault(str(image), []).append(info.key)
    masks = {i.key: i.etag for i, _ in listed if i.key in named or any(i.key in m for m in beside.values())}
    objects = [SourceObject(store.uri_of(i.key), i.key, i.etag, i.size, k) for i, k in listed if i.key not in masks]
    objects += [series_object(store, folder, members, k) for (k, folder), members in sorted(series.items())]
    for o in objects:
        m = dict(meta.get(o.key.rstrip("/")) or {})  # a series folder is named in a sidecar by its path
        o.mask = str(m.pop(MASK_COLUMN, "") or "")
        if m:
            o.meta = m
            o.etag = f"{o.etag}+{meta_digest(m)}"
        found = sorted(beside.get(o.key, ()), key=lambda k: "_mask" in k.lower())  # _seg first
        if not o.mask and found:
            o.mask = found[0]
        if len(found) > 1 or (found and o.mask != found[0]):
            log.warning(
                "%s: lesion mask %s used; %s beside it left out", o.uri, o.mask, [m for m in found if m != o.mask]
            )
        o.mask_etag = masks.get(o.mask, "")
    return objects, sidecars
