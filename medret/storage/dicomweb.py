"""A DICOMweb server (a PACS) as a read-only source: QIDO-RS to list, WADO-RS to retrieve.

``dicomweb+https://pacs.example.org/dicom-web?Modality=CR&StudyDate=20240101-`` names every
instance of the series the QIDO-RS filters select; a path narrows it to a study or a series
(``.../dicom-web/studies/{uid}[/series/{uid}]``). Each instance is one object keyed
``studies/{study}/series/{series}/instances/{sop}``, so a ``dicom-series`` route
(``studies/*``) groups a series' instances as it groups a folder's slice files.

What a DICOMweb server tells a client, and so what an incremental run can see:

- **Identity** is the SOP Instance UID (with its study and series).
- **Version**: DICOMweb has no modification time or content hash. The etag is a digest of the
  instance's QIDO-RS attributes (SOP Class, Instance Number, creation date and time, size,
  transfer syntax where the server gives them). An instance replaced under the same UID with
  the same header goes unseen: re-index it with ``--force`` or ``--only``.
- **Deletion**: an instance the server no longer lists leaves the index on the next
  incremental run, as a deleted file does.
- **Filters** are matched at the series level (study attributes such as ``StudyDate`` and
  series attributes such as ``Modality``); how fuzzy or relational matching works is up to
  the server.

Requests go through :mod:`dicomweb_client` with its own retries off. Connection failures,
timeouts and 5xx/429 answers are :class:`~medret.errors.StorageUnavailableError`, retried
within ``storage_retry_s`` by :class:`~medret.storage.retry.RetryingStore`; 401/403 are
:class:`~medret.errors.StorageAuthError` (the job stops, naming the server, indexing nothing);
404 is a vanished object. Instances come back as stored (``transfer-syntax=*``), for medret's
own readers and their budgets to decode.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from typing import IO, Any
from urllib.parse import parse_qsl

from medret.config import DicomWebConfig
from medret.errors import (
    ObjectNotFoundError,
    StorageAuthError,
    StorageError,
    StorageUnavailableError,
)
from medret.storage.objects import ObjectInfo, ObjectStore
from medret.storage.uri import StorageURI

USER_ENV, PASSWORD_ENV, TOKEN_ENV = "MEDRET_DICOMWEB_USER", "MEDRET_DICOMWEB_PASSWORD", "MEDRET_DICOMWEB_TOKEN"

#: QIDO-RS attribute tags
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
#: instance attributes asked for and digested into the etag (RetrieveURL is left out: it names the host)
VERSION_FIELDS = ("00080016", "00200013", "00080012", "00080013", "00280008", "00083002", "00420011")
_NOT_VERSION = {"00081190"}


class DicomWebStore(ObjectStore):
    """The instances a DICOMweb server lists under ``root`` (see the module docstring)."""

    default_kind = "dicom"

    def __init__(self, root: StorageURI, cfg: DicomWebConfig | None = None) -> None:
        self.root, self.cfg = root, cfg or DicomWebConfig()
        parts = root.path.split("/") if root.path else []
        self._scope = dict(zip(parts[::2], parts[1::2], strict=True))  # {"studies": uid, "series": uid}
        self._filters = dict(parse_qsl(root.query, keep_blank_values=False))
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
            client = DICOMwebClient(self.root.bucket, session=session, timeout=self.cfg.timeout_s)
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
                    f"{TOKEN_ENV}, or dicomweb.user in the job config)"
                ) from None
            if status == 404:
                raise ObjectNotFoundError(f"{reason}: not found") from None
            if status in (408, 429) or status >= 500:
                raise StorageUnavailableError(f"{reason}: the server is unavailable") from None
            body = (err.response.text if err.response is not None else "")[:200]
            raise StorageError(f"{reason}: {body or err}") from None
        except requests.exceptions.SSLError as err:  # a ConnectionError, but no outage: retrying cannot help
            raise StorageAuthError(
                f"{what}: the TLS certificate of {self.root.bucket} is not trusted ({_short(err)}); set "
                "dicomweb.ca_bundle to the CA that signed it"
            ) from None
        except (requests.ConnectionError, requests.Timeout) as err:
            raise StorageUnavailableError(
                f"{what}: {self.root.bucket} cannot be reached ({type(err).__name__})"
            ) from None
        except requests.RequestException as err:
            raise StorageError(f"{what}: {self.root.bucket}: {type(err).__name__}: {err}") from None

    # -- listing ------------------------------------------------------------------------------
    def _paged(self, what: str, search: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        offset, limit = 0, self.cfg.page_size
        while True:
            page = self._call(what, lambda at=offset: search(limit=limit, offset=at, **kwargs)) or []
            yield from page
            if len(page) < limit:
                return
            offset += len(page)

    def _series(self) -> list[tuple[str, str]]:
        if "series" in self._scope:
            return [(self._scope["studies"], self._scope["series"])]
        client = self.client()
        found = self._paged(
            "searching series",
            client.search_for_series,
            study_instance_uid=self._scope.get("studies"),
            search_filters=self._filters or None,
            fields=[STUDY_UID, SERIES_UID],
        )
        return sorted({(_value(s, STUDY_UID), _value(s, SERIES_UID)) for s in found})

    def _instances(self, study: str, series: str, sop: str | None = None) -> Iterator[ObjectInfo]:
        found = self._paged(
            f"searching instances of series {series}",
            self.client().search_for_instances,
            study_instance_uid=study,
            series_instance_uid=series,
            search_filters={SOP_UID: sop} if sop else None,
            fields=list(VERSION_FIELDS),
        )
        for inst in found:
            uid = _value(inst, SOP_UID)
            if uid and (sop is None or uid == sop):
                key = f"studies/{study}/series/{series}/instances/{uid}"
                yield ObjectInfo(self.uri_of(key), key, 0, _etag(inst))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        out = [
            i for study, series in self._series() for i in self._instances(study, series) if i.key.startswith(prefix)
        ]
        return iter(sorted(out, key=lambda i: i.key))

    def uri_of(self, key: str) -> str:
        return str(StorageURI("dicomweb", self.root.bucket, key.lstrip("/")))

    def _uids(self, key: str) -> tuple[str, str, str]:
        parts = key.strip("/").split("/")
        if len(parts) != 6 or parts[::2] != ["studies", "series", "instances"]:
            raise ObjectNotFoundError(f"{self.uri_of(key)}: not a DICOMweb instance (studies/*/series/*/instances/*)")
        return parts[1], parts[3], parts[5]

    def info(self, key: str) -> ObjectInfo:
        study, series, sop = self._uids(key)
        for found in self._instances(study, series, sop):
            return found
        raise ObjectNotFoundError(f"{self.uri_of(key)}: the server lists no such instance")

    # -- reading ------------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        """The instance's bytes exactly as the server holds them (``transfer-syntax=*``).

        WADO-RS answers ``multipart/related``; its one part is taken out with the standard
        library's MIME parser and handed over undecoded, so medret's readers (and their
        budgets) see the file itself. (dicomweb-client's ``retrieve_instance`` would parse it
        with pydicom first, and refuse the many real files that lack a preamble.)
        """
        study, series, sop = self._uids(key)
        url = f"{self.root.bucket}/studies/{study}/series/{series}/instances/{sop}"
        what = f"retrieving {self.uri_of(key)}"
        response = self._call(
            what, lambda: self._get(url, 'multipart/related; type="application/dicom"; transfer-syntax=*')
        )
        ctype = response.headers.get("Content-Type", "")
        if not ctype.lower().startswith("multipart/related"):
            raise StorageError(f"{what}: the server answered {ctype or 'no content type'!r}, not multipart/related")
        message = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + response.content
        )
        parts = [p.get_payload(decode=True) for p in message.iter_parts()]
        if len(parts) != 1 or not isinstance(parts[0], bytes):
            raise StorageError(f"{what}: the server answered {len(parts)} parts for one instance")
        return parts[0]

    def _get(self, url: str, accept: str) -> Any:
        self.client()
        response = self._session.get(url, headers={"Accept": accept}, timeout=self.cfg.timeout_s)
        response.raise_for_status()
        return response

    def read_range(self, key: str, start: int, length: int) -> bytes:
        return self.read_bytes(key)[start : start + length]  # WADO-RS has no byte ranges

    def open(self, key: str) -> IO[bytes]:
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
    kept = {t: v.get("Value") for t, v in attrs.items() if t not in _NOT_VERSION and isinstance(v, dict)}
    return "qido-" + hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:24]
