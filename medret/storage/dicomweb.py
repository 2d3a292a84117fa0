"""A DICOMweb server (a PACS) as a read-only source: QIDO-RS to list, WADO-RS to retrieve.

``dicomweb+https://pacs.example.org/dicom-web?Modality=CR&StudyDate=20240101-`` names every
instance of the series the QIDO-RS filters select; a path narrows it to a study or a series
(``.../dicom-web/studies/{uid}[/series/{uid}]``). Each instance is one object keyed
``studies/{study}/series/{series}/instances/{sop}``, so a ``dicom-series`` route
(``studies/*``) groups a series' instances as it groups a folder's slice files.

What a DICOMweb server tells a client, and so what an incremental run can see:

- **Identity** is the SOP Instance UID (with its study and series).
- **Version**: DICOMweb has no modification time or content hash. The etag is a digest of a
  few instance attributes asked for by name (SOP Class, Instance Number, creation date and
  time, frames, rows, columns, transfer syntax, where the server gives them), nothing that
  names the host or the patient. An instance replaced under the same UID with the same header
  goes unseen: re-index it with ``--force`` or ``--only``.
- **Non-image objects** (structured reports, presentation states, key object notes, RT plans
  and structures, encapsulated documents, waveforms) are left out of the listing by their SOP
  Class (``dicomweb.skip_non_images``), so a PACS full of them is not a quarantine storm.
- **Deletion**: an instance the server no longer lists leaves the index on the next
  incremental run, as a deleted file does. A source narrowed by a path or filters removes only
  what it indexed itself: a ``Modality=MR`` run never takes the ``Modality=CR`` items away.
- **Filters** are matched at the series level (study attributes such as ``StudyDate`` and
  series attributes such as ``Modality``); how fuzzy or relational matching works is up to
  the server. Several values of one attribute are written DICOM's way, ``Modality=CR\\DX``.
- **Paging**: ``limit``/``offset`` pages are read until an empty one, so a server that caps
  its page size is read whole; one that ignores ``offset`` is caught rather than looped on.

Requests go through :mod:`dicomweb_client` with its own retries off. Connection failures,
timeouts and 5xx/429 answers are :class:`~medret.errors.StorageUnavailableError`, retried
within ``storage_retry_s`` by :class:`~medret.storage.retry.RetryingStore`; 401/403 are
:class:`~medret.errors.StorageAuthError` (the job stops, naming the server, indexing nothing);
404 is a vanished object. Instances come back as stored (``transfer-syntax=*``), streamed
and capped at ``dicomweb.max_instance_bytes``, for medret's own readers and their budgets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from email.message import Message
from typing import IO, Any
from urllib.parse import parse_qsl

from medret.config import DicomWebConfig
from medret.errors import (
    InvalidURIError,
    ObjectNotFoundError,
    PixelBudgetError,
    StorageAuthError,
    StorageError,
    StorageUnavailableError,
)
from medret.storage.objects import ObjectInfo, ObjectStore
from medret.storage.uri import StorageURI

USER_ENV, PASSWORD_ENV, TOKEN_ENV = "MEDRET_DICOMWEB_USER", "MEDRET_DICOMWEB_PASSWORD", "MEDRET_DICOMWEB_TOKEN"

#: QIDO-RS attribute tags
STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
#: instance attributes asked for by name and digested into the etag, with the SOP Instance UID
VERSION_FIELDS = (SOP_CLASS, "00200013", "00080012", "00080013", "00280008", "00280010", "00280011", "00083002")
#: QIDO parameters medret sets itself: not filters
RESERVED = {"limit", "offset", "includefield", "fuzzymatching"}
#: SOP Class UID prefixes of objects that hold no image: SR (incl. key object selection), presentation
#: states, RT plan/structure/dose-volume/treatment records, encapsulated documents, waveforms
NON_IMAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.481.3",
    "1.2.840.10008.5.1.4.1.1.481.4",
    "1.2.840.10008.5.1.4.1.1.481.5",
    "1.2.840.10008.5.1.4.1.1.481.6",
    "1.2.840.10008.5.1.4.1.1.481.7",
    "1.2.840.10008.5.1.4.1.1.481.8",
    "1.2.840.10008.5.1.4.1.1.481.9",
    "1.2.840.10008.5.1.4.1.1.104.",
    "1.2.840.10008.5.1.4.1.1.9.",
)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CHUNK = 1 << 20


def filters_of(query: str, label: str) -> dict[str, str]:
    """QIDO-RS filters from a source URI's query; reserved and repeated keys are refused.

    >>> filters_of("Modality=CR%5CDX&StudyDate=20240101-", "s")
    {'Modality': 'CR\\\\DX', 'StudyDate': '20240101-'}
    """
    out: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=False):
        if key.lower() in RESERVED:
            raise InvalidURIError(f"{label}: {key!r} is set by medret (dicomweb.page_size pages), not a filter")
        if key in out:
            raise InvalidURIError(f"{label}: {key!r} given twice; write several values DICOM's way, {key}=A\\B")
        out[key] = value
    return out


class DicomWebStore(ObjectStore):
    """The instances a DICOMweb server lists under ``root`` (see the module docstring)."""

    default_kind = "dicom"

    def __init__(self, root: StorageURI, cfg: DicomWebConfig | None = None) -> None:
        self.root, self.cfg = root, cfg or DicomWebConfig()
        parts = root.path.split("/") if root.path else []
        self._scope = dict(zip(parts[::2], parts[1::2], strict=True))  # {"studies": uid, "series": uid}
        self._filters = filters_of(root.query, str(root))
        self._client: Any = None
        self._session: Any = None

    # -- the client, made where it is used (workers get the store pickled, without a session) --
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_session": None}

    def client(self) -> Any:
        if self._client is None:
            import requests
            from dicomweb_client import DICOMwebClient

            session = requests.Session()
            if self.cfg.ca_bundle or not self.cfg.verify_tls:
                # per request: requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's verify
                session.mount("https://", _verified(self.cfg.ca_bundle or False))
            token = self.cfg.token.get_secret_value() if self.cfg.token else os.environ.get(TOKEN_ENV)
            user = self.cfg.user or os.environ.get(USER_ENV)
            password = self.cfg.password.get_secret_value() if self.cfg.password else os.environ.get(PASSWORD_ENV)
            if token:
                session.headers["Authorization"] = f"Bearer {token}"
            elif user:
                session.auth = (user, password or "")
            self._session = session
            client = DICOMwebClient(self.root.bucket, session=session, timeout=self.cfg.timeout_s, permissive_uid=True)
            client.set_http_retry_params(retry=False)  # RetryingStore owns retries and their budget
            self._client = client
        return self._client

    @property
    def name(self) -> str:
        return f"the DICOMweb server {self.root.bucket}"

    def _call(self, what: str, fn: Any) -> Any:
        """``fn()`` against the server, its failures classified (whose fault, retry or not)."""
        import requests

        try:
            return fn()
        except requests.HTTPError as err:
            status = err.response.status_code if err.response is not None else 0
            reason = f"{what}: HTTP {status} from {self.root.bucket}"
            if status in (401, 403):
                raise StorageAuthError(
                    f"{reason}: the server refused medret's credentials (set {USER_ENV} / {PASSWORD_ENV} or "
                    f"{TOKEN_ENV}, or dicomweb.user in the job config; a bearer token is not refreshed)"
                ) from None
            if status == 404:
                raise ObjectNotFoundError(f"{reason}: not found") from None
            if status in (408, 429) or status >= 500:
                raise StorageUnavailableError(f"{reason}: the server is unavailable") from None
            body = (err.response.text if err.response is not None else "")[:200]
            raise StorageError(f"{reason}: {body or err}") from None
        except requests.exceptions.SSLError as err:
            if "certificate verify failed" not in str(err):  # a handshake or a transfer cut short
                raise StorageUnavailableError(
                    f"{what}: TLS to {self.root.bucket} failed ({type(err).__name__})"
                ) from None
            raise StorageAuthError(  # no outage: retrying cannot help
                f"{what}: the TLS certificate of {self.root.bucket} is not trusted ({_short(err)}); set "
                "dicomweb.ca_bundle to the CA that signed it"
            ) from None
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError,
        ) as err:  # the server gone, or gone mid-answer
            raise StorageUnavailableError(
                f"{what}: {self.root.bucket} cannot be reached ({type(err).__name__})"
            ) from None
        except requests.RequestException as err:
            raise StorageError(f"{what}: {self.root.bucket}: {type(err).__name__}: {err}") from None
        except ValueError as err:  # the client's own checks (a malformed UID, JSON)
            raise StorageError(f"{what}: {self.root.bucket}: {err}") from None

    # -- listing ------------------------------------------------------------------------------
    def _paged(self, what: str, search: Any, uid_tag: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """Every result, page after page until an empty one (a server may cap pages below ``limit``)."""
        offset, seen = 0, set[str]()
        while True:
            page = self._call(what, lambda at=offset: search(limit=self.cfg.page_size, offset=at, **kwargs)) or []
            fresh = [r for r in page if _value(r, uid_tag) not in seen]
            if not page:
                return
            if not fresh:
                raise StorageError(
                    f"{what}: {self.root.bucket} answered offset {offset} with results it had already sent; "
                    "it does not page with limit/offset"
                )
            seen.update(_value(r, uid_tag) for r in fresh)
            yield from fresh
            offset += len(page)

    def _series(self) -> list[tuple[str, str]]:
        if "series" in self._scope:
            return [(self._scope["studies"], self._scope["series"])]
        found = self._paged(
            "searching series",
            self.client().search_for_series,
            SERIES_UID,
            study_instance_uid=self._scope.get("studies"),
            search_filters=self._filters or None,
            fields=[STUDY_UID, SERIES_UID],
        )
        return sorted({(_value(s, STUDY_UID), _value(s, SERIES_UID)) for s in found})

    def _instances(self, study: str, series: str, sop: str | None = None) -> Iterator[ObjectInfo]:
        found = self._paged(
            f"searching instances of series {series}",
            self.client().search_for_instances,
            SOP_UID,
            study_instance_uid=study,
            series_instance_uid=series,
            search_filters={SOP_UID: sop} if sop else None,
            fields=list(VERSION_FIELDS),
        )
        for inst in found:
            uid = _value(inst, SOP_UID)
            if not (uid and (sop is None or uid == sop)):
                continue
            if sop is None and self.cfg.skip_non_images and _value(inst, SOP_CLASS).startswith(NON_IMAGE_CLASSES):
                continue
            key = f"studies/{study}/series/{series}/instances/{uid}"
            yield ObjectInfo(self.uri_of(key), key, 0, _etag(inst))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        out = [
            i for study, series in self._series() for i in self._instances(study, series) if i.key.startswith(prefix)
        ]
        return iter(sorted(out, key=lambda i: i.key))

    def uri_of(self, key: str) -> str:
        return str(StorageURI("dicomweb", self.root.bucket, self._full(key)))

    def _full(self, key: str) -> str:
        """A key from the server's base: keys relative to a study- or series-scoped root get its path."""
        key = key.strip("/")
        return key if key.startswith("studies/") or not self.root.path else f"{self.root.path}/{key}"

    def _uids(self, key: str) -> tuple[str, str, str]:
        parts = self._full(key).split("/")
        if len(parts) != 6 or parts[::2] != ["studies", "series", "instances"]:
            raise ObjectNotFoundError(f"{self.uri_of(key)}: not a DICOMweb instance (studies/*/series/*/instances/*)")
        uids = parts[1], parts[3], parts[5]
        if not all(_UID.match(u) and len(u) <= 64 for u in uids):
            raise ObjectNotFoundError(f"{self.uri_of(key)}: not DICOM UIDs")
        return uids

    def info(self, key: str) -> ObjectInfo:
        study, series, sop = self._uids(key)
        for found in self._instances(study, series, sop):
            return found
        raise ObjectNotFoundError(f"{self.uri_of(key)}: the server lists no such instance")

    # -- reading ------------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        """The instance's bytes exactly as the server holds them (``transfer-syntax=*``).

        WADO-RS answers ``multipart/related``; the body is streamed (at most
        ``max_instance_bytes``), its boundary taken from the Content-Type by the standard
        library, and its one ``application/dicom`` part handed over undecoded, so medret's
        readers (and their budgets) see the file itself. (dicomweb-client's
        ``retrieve_instance`` would parse it with pydicom first, refusing the many real files
        that lack a preamble, and hold several copies.)
        """
        study, series, sop = self._uids(key)
        url = f"{self.root.bucket}/studies/{study}/series/{series}/instances/{sop}"
        what = f"retrieving {self.uri_of(key)}"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        ctype, body = self._call(what, lambda: self._fetch(url, accept, what))
        return _one_part(ctype, body, what)

    def _fetch(self, url: str, accept: str, what: str) -> tuple[str, bytearray]:
        self.client()
        with self._session.get(url, headers={"Accept": accept}, timeout=self.cfg.timeout_s, stream=True) as r:
            r.raise_for_status()
            body = bytearray()
            for chunk in r.iter_content(_CHUNK):
                body += chunk
                if len(body) > self.cfg.max_instance_bytes:
                    raise PixelBudgetError(
                        self.uri_of(url[len(self.root.bucket) :]),
                        f"is over dicomweb.max_instance_bytes={self.cfg.max_instance_bytes:,}; refusing to read it",
                    )
            return r.headers.get("Content-Type", ""), body

    def read_range(self, key: str, start: int, length: int) -> bytes:
        return self.read_bytes(key)[start : start + length]  # WADO-RS has no byte ranges

    def open(self, key: str) -> IO[bytes]:
        import io

        return io.BytesIO(self.read_bytes(key))

    # -- a source is read-only ------------------------------------------------------------------
    def _read_only(self, key: str) -> StorageError:
        return StorageError(f"{self.uri_of(key)}: a DICOMweb source is read-only in medret")

    def write_bytes(self, key: str, data: bytes) -> ObjectInfo:
        raise self._read_only(key)

    def upload(self, key: str, stream: IO[bytes]) -> ObjectInfo:
        raise self._read_only(key)

    def delete(self, key: str) -> None:
        raise self._read_only(key)


def _one_part(ctype: str, body: bytes | bytearray, what: str) -> bytes:
    """The single part of a ``multipart/related`` body, checked to be ``application/dicom``."""
    header = Message()
    header["Content-Type"] = ctype
    boundary = header.get_boundary()
    if header.get_content_type() != "multipart/related" or not boundary:
        raise StorageError(f"{what}: the server answered {ctype or 'no content type'!r}, not multipart/related")
    delimiter = b"--" + boundary.encode("latin-1")
    first = body.find(delimiter)
    head_end = body.find(b"\r\n\r\n", first) if first >= 0 else -1
    end = body.find(b"\r\n" + delimiter, head_end) if head_end >= 0 else -1
    if end < 0:
        raise StorageError(f"{what}: the server's multipart answer is cut short or malformed")
    part = Message()
    for line in body[first + len(delimiter) : head_end].decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            part[name.strip()] = value.strip()
    if part.get_content_type() != "application/dicom":
        raise StorageError(f"{what}: the server answered a {part.get_content_type()!r} part, not application/dicom")
    if not body.startswith(b"--", end + 2 + len(delimiter)) and body.find(b"\r\n" + delimiter, end + 2) >= 0:
        raise StorageError(f"{what}: the server answered several parts for one instance")
    return bytes(memoryview(body)[head_end + 4 : end])  # the one copy


def _verified(verify: str | bool) -> Any:
    from requests.adapters import HTTPAdapter

    class Verified(HTTPAdapter):
        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs["verify"] = verify
            return super().send(request, *args, **kwargs)

    return Verified()


def _short(err: Exception) -> str:
    """``certificate verify failed: self-signed certificate``, out of requests' nested message."""
    m = re.search(r"certificate verify failed: ([^(')]+)", str(err))
    return f"certificate verify failed: {m.group(1).strip()}" if m else type(err).__name__


def _value(attrs: dict[str, Any], tag: str) -> str:
    values = (attrs.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def _etag(attrs: dict[str, Any]) -> str:
    kept = {t: (attrs.get(t) or {}).get("Value") for t in (SOP_UID, *VERSION_FIELDS)}
    return "qido-" + hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:24]
