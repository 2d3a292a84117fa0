"""The storage layer against local folders and the real SeaweedFS server, with the same tests."""

from __future__ import annotations

import http.client
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from medret.config import S3Config
from medret.errors import InvalidURIError, ObjectNotFoundError, StorageAuthError
from medret.storage import ObjectStore, open_store, parse_uri
from medret.storage.s3 import S3Store


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return open_store(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/archive", request.getfixturevalue("s3_config"), page_size=7)


def test_write_list_read_delete(store: ObjectStore) -> None:
    keys = [f"cxr/{i:03d}.dcm" for i in range(20)] + ["wsi/slide.svs", "notes.txt"]
    for i, key in enumerate(keys):
        store.write_bytes(key, bytes([i]) * (i + 1))
    listed = list(store.list())  # 22 objects over several pages on S3 (page_size=7)
    assert [o.key for o in listed] == sorted(keys)
    assert {o.key: o.size for o in listed} == {k: i + 1 for i, k in enumerate(keys)}
    assert all(o.etag for o in listed)
    assert [o.key for o in store.list("wsi/")] == ["wsi/slide.svs"]
    assert store.read_bytes("cxr/003.dcm") == bytes([3]) * 4
    assert store.read_range("cxr/019.dcm", 2, 5) == bytes([19]) * 5
    with store.open("notes.txt") as f:
        assert f.read() == bytes([21]) * 22
    store.delete("notes.txt")
    assert not store.exists("notes.txt")
    assert store.exists("wsi/slide.svs")
    assert listed[0].uri == store.uri_of(listed[0].key)


def test_etag_changes_when_object_changes(store: ObjectStore) -> None:
    first = store.write_bytes("a.png", b"one")
    assert store.info("a.png").etag == first.etag
    second = store.write_bytes("a.png", b"two!")
    assert second.etag != first.etag
    assert [o.etag for o in store.list()] == [second.etag]


def test_streaming_upload(store: ObjectStore) -> None:
    payload = bytes(range(256)) * 40_000  # 10 MB, multipart on S3
    info = store.upload("big/blob.bin", io.BytesIO(payload))
    assert info.size == len(payload)
    assert store.read_bytes("big/blob.bin") == payload


def test_missing_object_names_uri(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFoundError, match="nope.dcm"):
        store.read_bytes("nope.dcm")
    with pytest.raises(FileNotFoundError):  # a built-in callers already know
        store.info("nope.dcm")


def test_local_store_refuses_keys_outside_root(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("x")
    store = open_store(str(tmp_path / "root"))
    with pytest.raises(ObjectNotFoundError, match="escapes"):
        store.read_bytes("../secret.txt")


def test_parse_uri() -> None:
    assert parse_uri("s3://bucket/a/b/").path == "a/b"
    assert parse_uri("s3://bucket").path == ""
    assert not parse_uri("relative/dir").is_s3
    for bad in ("", "s3://B!/x", "gs://x/y"):
        with pytest.raises(InvalidURIError):
            parse_uri(bad)


@pytest.mark.s3
def test_s3_rejects_wrong_keys(s3_config: S3Config, s3_bucket: str) -> None:
    good = open_store(f"s3://{s3_bucket}", s3_config)
    good.write_bytes("x", b"1")
    bad_cfg = s3_config.model_copy(update={"secret_access_key": "wrong-secret", "max_attempts": 1})
    bad = open_store(f"s3://{s3_bucket}", bad_cfg)
    with pytest.raises(StorageAuthError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        list(bad.list())
    with pytest.raises(PermissionError):
        bad.read_bytes("x")
    unknown = open_store(
        f"s3://{s3_bucket}", s3_config.model_copy(update={"access_key_id": "nobody", "max_attempts": 1})
    )
    with pytest.raises(StorageAuthError):
        unknown.write_bytes("y", b"2")


class _FlakyProxy(http.server.BaseHTTPRequestHandler):
    """Answers the first ``failures`` requests with 503 SlowDown, then forwards to S3."""

    upstream: tuple[str, int]
    failures: int
    seen: list[str]

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append(self.command)
        if len(self.seen) <= self.failures:
            msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_endpoint(s3_config: S3Config) -> Iterator[tuple[str, list[str]]]:
    host, port = s3_config.endpoint_url.removeprefix("http://").split(":")  # type: ignore[union-attr]
    seen: list[str] = []
    handler = type("H", (_FlakyProxy,), {"upstream": (host, int(port)), "failures": 3, "seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


@pytest.mark.s3
def test_s3_retries_throttling_then_succeeds(
    s3_config: S3Config, s3_bucket: str, flaky_endpoint: tuple[str, list[str]]
) -> None:
    endpoint, seen = flaky_endpoint
    open_store(f"s3://{s3_bucket}", s3_config).write_bytes("k", b"payload")
    store = S3Store(
        parse_uri(f"s3://{s3_bucket}"), s3_config.model_copy(update={"endpoint_url": endpoint, "max_attempts": 5})
    )
    assert store.read_bytes("k") == b"payload"
    assert len(seen) == 4  # three 503 SlowDown answers, then the real one


@pytest.mark.s3
def test_s3_gives_up_after_max_attempts(
    s3_config: S3Config, s3_bucket: str, flaky_endpoint: tuple[str, list[str]]
) -> None:
    from medret.errors import StorageError

    endpoint, seen = flaky_endpoint
    store = S3Store(
        parse_uri(f"s3://{s3_bucket}"), s3_config.model_copy(update={"endpoint_url": endpoint, "max_attempts": 2})
    )
    with pytest.raises(StorageError, match=f"s3://{s3_bucket}/k"):
        store.read_bytes("k")
    assert len(seen) == 2
