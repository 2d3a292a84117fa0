"""Parse storage URIs: ``s3://bucket/prefix``, ``file:///abs/path`` or a plain path."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from medret.errors import InvalidURIError

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class StorageURI:
    """A parsed location. ``scheme`` is ``"s3"``, ``"file"`` or ``"dicomweb"``.

    For S3 ``path`` has no leading slash. For DICOMweb ``bucket`` is the server's base URL
    (``http://host:8042/dicom-web``), ``path`` a key under it (``studies/{uid}/series/{uid}``)
    and ``query`` the QIDO-RS filters that select what a source holds (``Modality=CR``).
    """

    scheme: str
    bucket: str
    path: str
    query: str = ""

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    @property
    def is_dicomweb(self) -> bool:
        return self.scheme == "dicomweb"

    def __str__(self) -> str:
        if self.is_s3:
            return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"
        if self.is_dicomweb:
            text = f"dicomweb+{self.bucket}" + (f"/{self.path}" if self.path else "")
            return text + (f"?{self.query}" if self.query else "")
        return self.path

    def without_query(self) -> StorageURI:
        return StorageURI(self.scheme, self.bucket, self.path)

    def join(self, *parts: str) -> StorageURI:
        tail = "/".join(p.strip("/") for p in parts if p)
        if self.is_s3 or self.is_dicomweb:
            path = f"{self.path.rstrip('/')}/{tail}" if self.path else tail
            return StorageURI(self.scheme, self.bucket, path.lstrip("/"))
        return StorageURI("file", "", str(Path(self.path, tail)))


def parse_uri(uri: str) -> StorageURI:
    """Parse ``uri``; local paths are made absolute.

    >>> parse_uri("s3://scans/cxr/2024")
    StorageURI(scheme='s3', bucket='scans', path='cxr/2024', query='')
    >>> parse_uri("gs://x/y")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    medret.errors.InvalidURIError: unsupported URI scheme 'gs' in 'gs://x/y'; use s3://bucket/prefix, ...
    >>> u = parse_uri("dicomweb+http://pacs:8042/dicom-web/studies/1.2?Modality=CR")
    >>> parse_uri("dicomweb+https://pacs/dw/studies/1/series/2/instances/3").path
    'studies/1/series/2/instances/3'
    >>> u.bucket, u.path, u.query, str(u.join("series/3.4"))
    ('http://pacs:8042/dicom-web', 'studies/1.2', 'Modality=CR', 'dicomweb+http://pacs:8042/dicom-web/studies/1.2/series/3.4')
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
        if scheme in ("dicomweb+http", "dicomweb+https"):
            return _dicomweb(scheme.split("+")[1], rest, uri)
        raise InvalidURIError(
            f"unsupported URI scheme {scheme!r} in {uri!r}; use s3://bucket/prefix, dicomweb+https://host/prefix "
            "or a local path"
        )
    return StorageURI("file", "", str(Path(uri).expanduser().resolve()))


#: the levels of a DICOMweb resource path, in order
DICOMWEB_LEVELS = ("studies", "series", "instances")


def _dicomweb(http: str, rest: str, uri: str) -> StorageURI:
    from urllib.parse import urlsplit

    base, _, query = rest.partition("?")
    where, _, path = base.partition("/")
    if "@" in where:
        host = urlsplit(http + "://" + rest).hostname
        raise InvalidURIError(
            f"credentials in a DICOMweb URI would be logged and recorded: give them as MEDRET_DICOMWEB_USER / "
            f"MEDRET_DICOMWEB_PASSWORD or MEDRET_DICOMWEB_TOKEN, not in {host!r}'s URI"
        )
    if not where:
        raise InvalidURIError(f"no host in DICOMweb URI {uri!r}")
    parts = [p for p in path.split("/") if p]
    at = parts.index("studies") if "studies" in parts else len(parts)
    prefix, key = parts[:at], parts[at:]
    if key and not (len(key) % 2 == 0 and all(k == DICOMWEB_LEVELS[i] for i, k in enumerate(key[::2]))):
        raise InvalidURIError(f"{uri!r}: a DICOMweb path is studies/{{uid}}[/series/{{uid}}[/instances/{{uid}}]]")
    return StorageURI("dicomweb", f"{http}://{where}" + "".join(f"/{p}" for p in prefix), "/".join(key), query)
