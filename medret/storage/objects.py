"""List, read and write objects under a root URI, on S3 or a local folder, with one interface.

>>> import tempfile
>>> root = tempfile.mkdtemp()
>>> store = open_store(root)
>>> _ = store.write_bytes("a/b.txt", b"hi")
>>> [(o.key, o.size) for o in store.list()]
[('a/b.txt', 2)]
>>> store.read_bytes("a/b.txt")
b'hi'
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from medret.config import DicomWebConfig, S3Config
from medret.errors import (
    UNAVAILABLE_ERRNO,
    ConfigError,
    ObjectNotFoundError,
    StorageAuthError,
    StorageUnavailableError,
)
from medret.storage.uri import StorageURI, parse_uri

T = TypeVar("T")

#: errno values of a local path whose storage (a network mount, a failing disk) is failing


@dataclass(frozen=True)
class ObjectInfo:
    """One object: its full URI, key relative to the store root, size and version tag.

    On S3 ``etag`` is the server's ETag; locally it is ``"<mtime_ns hex>-<size hex>"``,
    which changes whenever the file is rewritten.
    """

    uri: str
    key: str
    size: int
    etag: str


class ObjectStore(ABC):
    """Objects under one root. Keys are ``/``-separated and relative to the root."""

    root: StorageURI

    def uri_of(self, key: str) -> str:
        return str(self.root.join(key))

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """All objects whose key starts with ``prefix``, recursively, in key order."""

    @abstractmethod
    def info(self, key: str) -> ObjectInfo: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes: ...

    @abstractmethod
    def open(self, key: str) -> IO[bytes]:
        """A readable binary stream; the caller closes it."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> ObjectInfo: ...

    @abstractmethod
    def upload(self, key: str, stream: IO[bytes]) -> ObjectInfo:
        """Write from a stream without holding it all in memory."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def local_path(self, key: str) -> Path | None:
        """The object as a local file, when the store is a folder (no download needed); else None."""
        return None

    #: the kind of every object whose key no route claims (a DICOMweb server holds only DICOM), else None
    default_kind: str | None = None

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, a few calls on this store that belong together (a whole download, say).

        A plain store runs it once; :class:`~medret.storage.retry.RetryingStore` retries it
        through an outage.
        """
        return fn()

    @property
    def name(self) -> str:
        """The store as a person names it in a message: its root, and the endpoint for S3."""
        return str(self.root)

    def exists(self, key: str) -> bool:
        try:
            self.info(key)
        except ObjectNotFoundError:
            return False
        return True


class LocalStore(ObjectStore):
    def __init__(self, root: StorageURI) -> None:
        self.root = root
        self._base = Path(root.path)

    def _path(self, key: str) -> Path:
        p = (self._base / key).resolve()
        if p != self._base and self._base not in p.parents:
            raise ObjectNotFoundError(f"key {key!r} escapes the store root {str(self._base)!r}")
        return p

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def _info(self, p: Path, st: os.stat_result) -> ObjectInfo:
        key = p.relative_to(self._base).as_posix()
        return ObjectInfo(str(p), key, st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}")

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every file under the root, sorted by key.

        A root that is not there is an error, never an empty listing (an incremental run would
        take it for every object deleted); a folder that cannot be read is one too, never skipped.
        """
        try:
            is_dir = stat.S_ISDIR(self._base.stat().st_mode)
        except FileNotFoundError:
            raise ConfigError(
                f"source folder {str(self._base)!r} does not exist (a share not mounted, or a typo?)"
            ) from None
        except OSError as err:  # a stale or cut network mount at the root itself
            mapped = _local_error(err, self._base)
            if mapped is err:
                raise
            raise mapped from err
        if not is_dir:
            raise ConfigError(f"source folder {str(self._base)!r} is not a folder")
        stack = [self._base]
        found: list[tuple[str, ObjectInfo]] = []
        while stack:
            d = stack.pop()
            try:
                with os.scandir(d) as it:
                    for entry in it:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file():
                            key = Path(entry.path).relative_to(self._base).as_posix()
                            if key.startswith(prefix):
                                with contextlib.suppress(FileNotFoundError):  # deleted while listed
                                    found.append((key, self._info(Path(entry.path), entry.stat())))
            except PermissionError as err:
                raise StorageAuthError(f"cannot list {d}: {err.strerror or err}; fix its permissions") from err
            except FileNotFoundError:
                if d == self._base:
                    raise
            except OSError as err:
                mapped = _local_error(err, d)
                if mapped is err:
                    raise
                raise mapped from err
        for _, info in sorted(found, key=lambda kv: kv[0]):
            yield info

    def info(self, key: str) -> ObjectInfo:
        p = self._path(key)
        try:
            return self._info(p, p.stat())
        except FileNotFoundError as err:
            raise ObjectNotFoundError(f"no such file: {p}") from err
        except OSError as err:
            raise _local_error(err, p) from err

    def read_bytes(self, key: str) -> bytes:
        p = self._path(key)
        try:
            return p.read_bytes()
        except FileNotFoundError as err:
            raise ObjectNotFoundError(f"no such file: {p}") from err
        except OSError as err:
            raise _local_error(err, p) from err

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with self.open(key) as f:
            f.seek(start)
            return f.read(length)

    def open(self, key: str) -> IO[bytes]:
        p = self._path(key)
        try:
            return p.open("rb")
        except FileNotFoundError as err:
            raise ObjectNotFoundError(f"no such file: {p}") from err
        except OSError as err:
            raise _local_error(err, p) from err

    def write_bytes(self, key: str, data: bytes) -> ObjectInfo:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".medret-tmp")
        tmp.write_bytes(data)
        tmp.replace(p)  # atomic: readers never see half a file
        return self.info(key)

    def upload(self, key: str, stream: IO[bytes]) -> ObjectInfo:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".medret-tmp")
        with tmp.open("wb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
        tmp.replace(p)
        return self.info(key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def _local_error(err: OSError, path: Path) -> OSError:
    """A failing mount or disk is the storage's fault; anything else (permissions...) stays as it is."""
    if err.errno in UNAVAILABLE_ERRNO:
        return StorageUnavailableError(f"reading {path}: {err.strerror or err} (errno {err.errno})")
    return err


def open_store(
    uri: str | StorageURI,
    s3: S3Config | None = None,
    *,
    page_size: int = 1000,
    dicomweb: DicomWebConfig | None = None,
) -> ObjectStore:
    """The store for ``uri``: :class:`S3Store` for ``s3://``, a DICOMweb server for
    ``dicomweb+http(s)://``, :class:`LocalStore` otherwise."""
    parsed = parse_uri(uri) if isinstance(uri, str) else uri
    if parsed.is_s3:
        from medret.storage.s3 import S3Store

        return S3Store(parsed, s3, page_size=page_size)
    if parsed.is_dicomweb:
        from medret.storage.dicomweb import DicomWebStore

        return DicomWebStore(parsed, dicomweb)
    return LocalStore(parsed)
