"""What medret sees in a file: kind, reader, geometry, UIDs; decodes pixels so damage shows up here.

Used by ``medret inspect``: the file's kind (:func:`medret.kinds.detect`) describes it as one JSON-safe dict.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from medret import kinds
from medret.config import S3Config
from medret.io.base import DEFAULT_PIXEL_BUDGET


@contextlib.contextmanager
def fetched(uri: str, s3: S3Config | None = None) -> Iterator[Path]:
    """A local path for ``uri``: the file itself, or an ``s3://`` object or a DICOMweb instance
    (``dicomweb+https://host/prefix/studies/{uid}/series/{uid}/instances/{uid}``) downloaded to a temp file."""
    if not uri.startswith(("s3://", "dicomweb+")):
        yield Path(uri)
        return
    from medret.storage.objects import open_store
    from medret.storage.uri import StorageURI, parse_uri

    parsed = parse_uri(uri)
    if parsed.is_dicomweb:
        store, key, name = open_store(StorageURI("dicomweb", parsed.bucket, "")), parsed.path, "instance.dcm"
    else:
        parent, _, key = parsed.path.rpartition("/")
        store = open_store(f"s3://{parsed.bucket}/{parent}" if parent else f"s3://{parsed.bucket}", s3)
        name = PurePosixPath(key).name
    with tempfile.TemporaryDirectory(prefix="medret-inspect-") as tmp:
        local = Path(tmp) / name
        local.write_bytes(store.read_bytes(key))
        yield local


def inspect_file(
    path: str | Path,
    *,
    name: str | None = None,
    mpp: float | None = None,
    preprocess: bool = False,
    pixel_budget: int = DEFAULT_PIXEL_BUDGET,
    sample_tiles: int = 8,
) -> dict[str, Any]:
    """Decode ``path`` with the kind its content calls for and describe it (:meth:`Kind.describe`)."""
    p = Path(path)
    label = name or str(p)
    with open(p, "rb") as f:
        head = f.read(kinds.HEAD_BYTES)
    kind = kinds.detect(label, head)
    if kind.needs_file():
        kind = kind.resolve(p)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"path": label, "bytes": p.stat().st_size, "kind": kind.name}
    options = {"mpp": mpp, "preprocess": preprocess, "pixel_budget": pixel_budget, "sample_tiles": sample_tiles}
    out.update(kind.describe(p, label, **options))
    out["decode_seconds"] = round(time.perf_counter() - t0, 3)
    return out
