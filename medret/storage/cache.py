"""Local copies of objects that libraries must open by path (slides, ambiguous TIFFs).

A local source hands back the file itself; any other store's object is downloaded once
per node into a cache keyed by URI and etag, streamed to disk and landed atomically, so
every task on the node shares one copy and a slide is never held in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path, PurePosixPath

from medret.storage.objects import ObjectStore

#: local copy -> object URI, so errors raised by libraries name the object, not the cache file
LOCAL_NAMES: dict[str, str] = {}


def cache_root(cache_dir: str = "") -> Path:
    return Path(cache_dir or os.environ.get("MEDRET_CACHE") or Path.home() / ".cache" / "medret" / "objects")


def local_copy(store: ObjectStore, key: str, etag: str, cache_dir: str = "") -> Path:
    """A local file with the object's content: the file itself for a local source, else a cached download."""
    local = store.local_path(key)
    if local is not None:  # the reader opens it itself: a failing mount is met here, through the retries
        store.call(lambda: store.info(key))
        return local
    target = store.call(lambda: _download(store, key, etag, cache_root(cache_dir)))  # a broken download restarts
    LOCAL_NAMES[str(target)] = store.uri_of(key)
    return target


def _download(store: ObjectStore, key: str, etag: str, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(f"{store.uri_of(key)}|{etag}".encode()).hexdigest()[:32]
    target = cache / (digest + "".join(PurePosixPath(key.lower()).suffixes[-2:]))
    if not target.exists():
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out, store.open(key) as src:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    return target


def object_names(text: str) -> str:
    """``text`` with local copies' paths replaced by the URIs of their objects."""
    for local, uri in LOCAL_NAMES.items():
        text = text.replace(local, uri)
    return text
