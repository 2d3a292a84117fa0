"""Objects on S3 (or an S3-speaking server): the boto3 client, the store, and the same settings for Lance and Arrow.

Failures are classified where they happen: a missing key is the object's, credentials refused
stop the job, throttling, 5xx and connection errors are the service's (an outage, retried).
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from typing import IO, Any

from medret.config import S3Config
from medret.errors import ObjectNotFoundError, StorageAuthError, StorageError, StorageUnavailableError
from medret.storage.objects import ObjectInfo, ObjectStore
from medret.storage.uri import StorageURI, parse_uri

_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "403",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "RequestExpired",
}
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
#: answers that mean "the service, not the object": throttling and server-side failures
_UNAVAILABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "429",
}


def s3_client(cfg: S3Config | None = None) -> Any:
    """A boto3 S3 client: standard retry mode (backoff on throttling and 5xx), AWS credential chain."""
    import boto3
    from botocore.config import Config

    cfg = cfg or S3Config()
    endpoint = cfg.resolved_endpoint()
    style = cfg.addressing_style
    if style == "auto" and endpoint:
        style = "path"  # S3-compatible servers rarely do virtual-host buckets
    session = boto3.session.Session(
        aws_access_key_id=cfg.access_key_id,
        aws_secret_access_key=cfg.secret_access_key,
        region_name=cfg.region,
    )
    return session.client(
        "s3",
        endpoint_url=endpoint,
        config=Config(
            retries={"total_max_attempts": cfg.max_attempts, "mode": "standard"},
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.read_timeout_s,
            s3={"addressing_style": style},
            signature_version="s3v4",
        ),
    )


def _s3_error(err: Exception, what: str) -> StorageError:
    """Classify a boto3 failure: the object's (missing, refused for itself) or the service's (down, busy)."""
    from botocore import exceptions as bx

    if isinstance(err, bx.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        msg = f"{what}: {code} {err.response.get('Error', {}).get('Message', '')}".strip()
        if code in _AUTH_CODES:
            return StorageAuthError(f"{msg} (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        if code in _MISSING_CODES:
            return ObjectNotFoundError(msg)
        if code in _UNAVAILABLE_CODES or status >= 500 or status == 429:
            return StorageUnavailableError(msg)
        return StorageError(msg)
    if isinstance(err, bx.NoCredentialsError | bx.PartialCredentialsError | bx.CredentialRetrievalError):
        return StorageAuthError(f"{what}: {err} (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
    if isinstance(
        err,
        bx.EndpointConnectionError
        | bx.ConnectionError
        | bx.ConnectionClosedError
        | bx.ReadTimeoutError
        | bx.ConnectTimeoutError
        | bx.ResponseStreamingError
        | bx.IncompleteReadError
        | bx.HTTPClientError,
    ):
        return StorageUnavailableError(f"{what}: {err}")
    return StorageError(f"{what}: {err}")


def _stream_error(err: Exception, what: str) -> StorageError:
    """A response body that broke off while it was read (reset, timeout): the connection's fault."""
    return StorageUnavailableError(f"{what}: the response broke off: {type(err).__name__}: {err}")


class _Body(io.RawIOBase):
    """An S3 response body whose read errors are storage errors, classified like any other call."""

    def __init__(self, body: Any, what: str) -> None:
        self._body, self._what = body, what

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        try:
            return bytes(self._body.read(None if size is None or size < 0 else size))
        except Exception as err:
            raise _stream_error(err, self._what) from err

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


_CLIENT_LOCK = threading.Lock()


class S3Store(ObjectStore):
    def __init__(self, root: StorageURI, cfg: S3Config | None = None, *, page_size: int = 1000):
        self.root = root
        self.cfg = cfg or S3Config()
        self.page_size = page_size
        self._client: Any = None

    @property
    def client(self) -> Any:
        # one client per store, also when threads (a read task's read-ahead) ask at once:
        # making a boto3 client takes ~50 ms and several made together serialise on botocore's locks
        if self._client is None:
            with _CLIENT_LOCK:
                if self._client is None:
                    self._client = s3_client(self.cfg)
        return self._client

    def __getstate__(self) -> dict[str, Any]:  # boto3 clients do not pickle (Ray tasks)
        return {**self.__dict__, "_client": None}

    def _key(self, key: str) -> str:
        return f"{self.root.path}/{key}" if self.root.path else key

    def _rel(self, full: str) -> str:
        return full[len(self.root.path) + 1 :] if self.root.path else full

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kw)
        except (ClientError, BotoCoreError) as err:
            raise _s3_error(err, what) from err

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full_prefix = self._key(prefix) if prefix else (self.root.path + "/" if self.root.path else "")
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.root.bucket, "Prefix": full_prefix, "MaxKeys": self.page_size}
            if token:
                kw["ContinuationToken"] = token
            page = self._call(f"listing s3://{self.root.bucket}/{full_prefix}", self.client.list_objects_v2, **kw)
            for obj in page.get("Contents", []):
                key = self._rel(obj["Key"])
                yield ObjectInfo(self.uri_of(key), key, int(obj["Size"]), obj["ETag"].strip('"'))
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def info(self, key: str) -> ObjectInfo:
        head = self._call(
            f"reading {self.uri_of(key)}", self.client.head_object, Bucket=self.root.bucket, Key=self._key(key)
        )
        return ObjectInfo(self.uri_of(key), key, int(head["ContentLength"]), head["ETag"].strip('"'))

    def _get(self, key: str, **extra: Any) -> Any:
        return self._call(
            f"reading {self.uri_of(key)}", self.client.get_object, Bucket=self.root.bucket, Key=self._key(key), **extra
        )

    def read_bytes(self, key: str) -> bytes:
        with _Body(self._get(key)["Body"], f"reading {self.uri_of(key)}") as body:
            return body.read()

    def read_range(self, key: str, start: int, length: int) -> bytes:
        body = self._get(key, Range=f"bytes={start}-{start + length - 1}")["Body"]
        with _Body(body, f"reading {self.uri_of(key)}") as b:
            return b.read()

    def open(self, key: str) -> IO[bytes]:
        return _Body(self._get(key)["Body"], f"reading {self.uri_of(key)}")  # type: ignore[return-value]

    @property
    def name(self) -> str:
        endpoint = self.cfg.resolved_endpoint()
        return f"{self.root} (endpoint {endpoint})" if endpoint else str(self.root)

    def write_bytes(self, key: str, data: bytes) -> ObjectInfo:
        put = self._call(
            f"writing {self.uri_of(key)}",
            self.client.put_object,
            Bucket=self.root.bucket,
            Key=self._key(key),
            Body=data,
        )
        return ObjectInfo(self.uri_of(key), key, len(data), put["ETag"].strip('"'))

    def upload(self, key: str, stream: IO[bytes]) -> ObjectInfo:
        self._call(
            f"writing {self.uri_of(key)}",
            self.client.upload_fileobj,
            Fileobj=stream,
            Bucket=self.root.bucket,
            Key=self._key(key),
        )
        return self.info(key)

    def delete(self, key: str) -> None:
        self._call(
            f"deleting {self.uri_of(key)}", self.client.delete_object, Bucket=self.root.bucket, Key=self._key(key)
        )

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tests, demo, ``medret dev s3``)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.root.bucket)
        except ClientError:
            self._call(f"creating bucket {self.root.bucket}", self.client.create_bucket, Bucket=self.root.bucket)


def lance_storage_options(uri: str, s3: S3Config | None = None) -> dict[str, str] | None:
    """Options for LanceDB / Lance to reach ``uri`` with the same settings as :func:`s3_client`."""
    if not parse_uri(uri).is_s3:
        return None
    cfg = s3 or S3Config()
    opts: dict[str, str] = {"region": cfg.region}
    endpoint = cfg.resolved_endpoint()
    if endpoint:
        opts["endpoint"] = endpoint
        opts["allow_http"] = str(endpoint.startswith("http://")).lower()
        opts["virtual_hosted_style_request"] = str(cfg.addressing_style == "virtual").lower()
    key = cfg.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = cfg.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        opts["aws_access_key_id"] = key
        opts["aws_secret_access_key"] = secret
    # Lance's own retries would hold a write for minutes when the server is down; bound them like boto3's
    opts["client_max_retries"] = str(max(0, cfg.max_attempts - 1))
    opts["client_retry_timeout"] = str(int(cfg.read_timeout_s))
    opts["connect_timeout"] = f"{cfg.connect_timeout_s:g}s"
    return opts


def arrow_filesystem(uri: str, s3: S3Config | None = None) -> tuple[Any, str]:
    """``(pyarrow filesystem, path on it)`` for ``uri``, with the same settings as :func:`s3_client`.

    This is what Ray Train's ``storage_filesystem`` takes for an ``s3://`` storage path.
    """
    import pyarrow.fs as pafs

    parsed = parse_uri(uri)
    if not parsed.is_s3:
        return pafs.LocalFileSystem(), parsed.path
    cfg = s3 or S3Config()
    endpoint = cfg.resolved_endpoint()
    kwargs: dict[str, Any] = {
        "region": cfg.region,
        "connect_timeout": cfg.connect_timeout_s,
        "request_timeout": cfg.read_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.max_attempts),
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host, scheme=scheme, force_virtual_addressing=cfg.addressing_style == "virtual")
    key = cfg.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = cfg.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret)
    return pafs.S3FileSystem(**kwargs), f"{parsed.bucket}/{parsed.path}".rstrip("/")
