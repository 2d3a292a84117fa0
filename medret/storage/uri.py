"""Parse storage URIs: ``s3://bucket/prefix``, ``file:///abs/path`` or a plain path."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from medret.errors import InvalidURIError

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class StorageURI:
    """A parsed location. ``scheme`` is ``"s3"`` or ``"file"``; ``path`` has no leading slash for S3."""

    scheme: str
    bucket: str
    path: str

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    def __str__(self) -> str:
        if self.is_s3:
            return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"
        return self.path

    def join(self, *parts: str) -> StorageURI:
        tail = "/".join(p.strip("/") for p in parts if p)
        if self.is_s3:
            path = f"{self.path.rstrip('/')}/{tail}" if self.path else tail
            return StorageURI("s3", self.bucket, path.lstrip("/"))
        return StorageURI("file", "", str(Path(self.path, tail)))


def parse_uri(uri: str) -> StorageURI:
    """Parse ``uri``; local paths are made absolute.

    >>> parse_uri("s3://scans/cxr/2024")
    StorageURI(scheme='s3', bucket='scans', path='cxr/2024')
    >>> parse_uri("gs://x/y")
    Traceback (most recent call last):
    ...
    medret.errors.InvalidURIError: unsupported URI scheme 'gs' in 'gs://x/y'; use s3://bucket/prefix or a local path
    """
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidURIError(f"storage URI must be a non-empty string, got {uri!r}")
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        scheme = scheme.lower()
        if scheme == "s3":
            bucket, _, path = rest.partition("/")
            if not _BUCKET.match(bucket):
                raise InvalidURIError(f"invalid S3 bucket name {bucket!r} in {uri!r}")
            return StorageURI("s3", bucket, path.strip("/"))
        if scheme == "file":
            return StorageURI("file", "", str(Path(rest).resolve()))
        raise InvalidURIError(f"unsupported URI scheme {scheme!r} in {uri!r}; use s3://bucket/prefix or a local path")
    return StorageURI("file", "", str(Path(uri).expanduser().resolve()))
