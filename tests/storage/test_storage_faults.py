"""A failing store is not a bad file: storage faults during indexing lose nothing and quarantine nothing.

The faults are real: a SeaweedFS server of the test's own, SIGKILLed mid-run and started
again on the same data folder and port; a loopback proxy in front of the real server that
answers 503 SlowDown for a while; a port nobody listens on. Only a genuinely corrupt
object is quarantined.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from botocore import exceptions as bx
from PIL import Image

from medret.config import S3Config
from medret.errors import (
    ConfigError,
    JobStoppedError,
    ObjectNotFoundError,
    QuarantineStormError,
    StorageAuthError,
    StorageError,
    StorageUnavailableError,
    fault_of,
)
from medret.eval.benchmarks import medmnist4
from medret.index.manifest import Entry, Manifest
from medret.index.store import CodeIndex
from medret.pipelines.backfill import run_index
from medret.pipelines.config import IndexJobConfig
from medret.storage.retry import retry_unavailable
from medret.storage.s3 import S3Store, _s3_error
from medret.storage.s3local import SeaweedS3, free_port
from medret.storage.uri import parse_uri

CORRUPT = "0/corrupt.png"  # listed early, so the first run reaches it too
#: objects in the archives the kill tests index: ten times the commit the store is killed after (commit_rows=40),
#: so the first run stops far from its end and the rerun still commits several times
ARCHIVE = 400


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pngs(data_dir: Path) -> list[bytes]:
    gallery = medmnist4(data_dir / "medmnist")["gallery"]
    return [png(gallery.images[i * 5]) for i in range(ARCHIVE)]


def put_archive(store: Any, pngs: list[bytes], n: int) -> list[str]:
    """``n`` real PNGs under ``store`` plus one corrupt one; returns the good keys."""
    keys = [f"{i % 10}/{i:05d}.png" for i in range(n)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: store.write_bytes(*kv), zip(keys, pngs[:n], strict=True)))
    store.write_bytes(CORRUPT, b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return keys


# -- classification -------------------------------------------------------------------------------
def client_error(code: str, status: int) -> bx.ClientError:
    return bx.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


@pytest.mark.parametrize(
    ("err", "kind", "fault"),
    [
        (bx.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), StorageUnavailableError, "infra"),
        (bx.ReadTimeoutError(endpoint_url="http://h"), StorageUnavailableError, "infra"),
        (bx.ConnectionClosedError(endpoint_url="http://h"), StorageUnavailableError, "infra"),
        (client_error("SlowDown", 503), StorageUnavailableError, "infra"),
        (client_error("InternalError", 500), StorageUnavailableError, "infra"),
        (client_error("Whatever", 502), StorageUnavailableError, "infra"),
        (client_error("ExpiredToken", 400), StorageAuthError, "auth"),
        (client_error("InvalidAccessKeyId", 403), StorageAuthError, "auth"),
        (bx.NoCredentialsError(), StorageAuthError, "auth"),
        (client_error("NoSuchKey", 404), ObjectNotFoundError, "gone"),
        (client_error("InvalidObjectState", 403), StorageError, "object"),
    ],
)
def test_s3_failures_are_classified_where_they_happen(err: Exception, kind: type, fault: str) -> None:
    mapped = _s3_error(err, "reading s3://b/k")
    assert type(mapped) is kind and "s3://b/k" in str(mapped)
    assert fault_of(mapped) == fault


def test_decoder_oserrors_are_the_objects_fault() -> None:
    with pytest.raises(OSError) as caught:
        Image.open(io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)).load()
    assert fault_of(caught.value) == "object"  # Pillow's OSError is about the bytes, not the store


def test_a_failing_mount_under_a_reader_that_opens_files_itself_is_infrastructure(tmp_path: Path) -> None:
    """A slide reader opening a file on a stale NFS mount sees a bare OSError; that is the store's fault."""
    import errno

    from medret.errors import CorruptFileError
    from medret.storage.objects import open_store

    stale = OSError(errno.ESTALE, "Stale file handle")
    assert fault_of(stale) == "infra"
    try:
        raise CorruptFileError("s.svs", "cannot open") from stale
    except CorruptFileError as err:
        assert fault_of(err) == "infra"
    assert fault_of(OSError(errno.EACCES, "Permission denied")) == "object"
    with pytest.raises(ConfigError, match="does not exist"):
        list(open_store(str(tmp_path / "nope")).list())


def test_retries_share_one_outage_budget() -> None:
    """A store down for longer than the budget fails every caller at once; a success clears it."""
    slept: list[float] = []
    calls = {"n": 0}

    def failing() -> None:
        calls["n"] += 1
        raise StorageUnavailableError("reading s3://b/k: connection refused")

    with pytest.raises(StorageUnavailableError, match="storage_retry_s=0.5"):
        retry_unavailable(failing, store="s3://one", budget_s=0.5, sleep=lambda s: (slept.append(s), time.sleep(s)))
    assert calls["n"] >= 2 and sum(slept) <= 0.6
    calls["n"] = 0
    with pytest.raises(StorageUnavailableError):  # the same outage: no second budget
        retry_unavailable(failing, store="s3://one", budget_s=0.5, sleep=time.sleep)
    assert calls["n"] == 1
    assert retry_unavailable(lambda: 7, store="s3://one", budget_s=0.5) == 7
    flaky = iter([StorageUnavailableError("503 SlowDown"), StorageUnavailableError("503 SlowDown"), None])

    def recovers() -> str:
        e = next(flaky)
        if e:
            raise e
        return "ok"

    assert retry_unavailable(recovers, store="s3://one", budget_s=5, sleep=lambda s: None) == "ok"
    with pytest.raises(ObjectNotFoundError):  # not retried: the object's own answer
        retry_unavailable(lambda: (_ for _ in ()).throw(ObjectNotFoundError("gone")), store="s3://one", budget_s=5)


# -- the source store killed mid-backfill ----------------------------------------------------------
@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path / "weed", port=free_port(), access_key="fault-key", secret_key="fault-secret")
    server.start()
    yield server
    server.stop()


def cli(server: SeaweedS3, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
    small = ["commit_rows=40", "resources.read_batch=8", "resources.encode_batch=16", "storage_retry_s=3"]
    small += ["s3.max_attempts=2", "s3.connect_timeout_s=1", "s3.read_timeout_s=5"]
    cmd = [sys.executable, "-m", "medret.cli.main", "index", *args, "--s3-endpoint", server.endpoint, "--json"]
    for s in small:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def kill_when_committed(proc: subprocess.Popen[str], server: SeaweedS3, manifest: Any, at_least: int) -> int:
    """SIGKILL the S3 server once the running job has committed ``at_least`` objects."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            committed = manifest().counts().get("indexed", 0)
        except Exception:
            continue
        if committed >= at_least:
            server.kill()
            return int(committed)
    raise AssertionError(f"the job ended (rc {proc.returncode}) before the store could be killed mid-run")


def assert_exactly_once(index: CodeIndex, uris: set[str]) -> None:
    ids = index.to_arrow(["item_id"]).column("item_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate items"
    assert set(ids) == uris, f"{len(uris - set(ids))} lost, {len(set(ids) - uris)} unexpected"


@pytest.mark.slow
@pytest.mark.s3
def test_source_store_killed_mid_backfill_loses_nothing(own_s3: SeaweedS3, pngs: list[bytes], tmp_path: Path) -> None:
    cfg = own_s3.config()
    store = S3Store(parse_uri("s3://arch/png"), cfg)
    store.ensure_bucket()
    keys = put_archive(store, pngs, ARCHIVE)
    index = tmp_path / "index"
    args = ["--source", "s3://arch/png", "--index", str(index)]

    first = cli(own_s3, *args, "--out", str(tmp_path / "o1"))
    committed = kill_when_committed(first, own_s3, lambda: Manifest(str(index), "codes", create=False), 40)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 75, err[-3000:]
    assert "s3://arch/png" in err and "unreachable" in err and "Nothing was lost" in err, err[-2000:]
    assert "same command" in err
    summary = json.loads(out)
    assert summary["stopped"] and summary["indexed"] >= committed
    entries = Manifest(str(index), "codes", create=False).entries()
    assert {e.uri for e in entries.values() if e.status == "quarantined"} <= {store.uri_of(CORRUPT)}
    assert len(entries) < len(keys)  # it really stopped part-way

    own_s3.start()  # same data folder, same port
    second = cli(own_s3, *args, "--out", str(tmp_path / "o2"))
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    s = json.loads(out)
    assert not s["stopped"] and s["unchanged"] >= committed
    assert_exactly_once(CodeIndex.open(str(index)), {store.uri_of(k) for k in keys})
    entries = Manifest(str(index), "codes", create=False).entries()
    assert {e.uri for e in entries.values() if e.status == "quarantined"} == {store.uri_of(CORRUPT)}
    assert "not a" in entries[store.uri_of(CORRUPT)].error or "PNG" in entries[store.uri_of(CORRUPT)].error


@pytest.mark.slow
@pytest.mark.s3
def test_index_store_killed_mid_commit_loses_nothing(own_s3: SeaweedS3, pngs: list[bytes], tmp_path: Path) -> None:
    from medret.storage.objects import open_store

    cfg = own_s3.config()
    S3Store(parse_uri("s3://idx"), cfg).ensure_bucket()
    src = tmp_path / "src"
    keys = put_archive(open_store(str(src)), pngs, ARCHIVE)
    args = ["--source", str(src), "--index", "s3://idx/index"]

    first = cli(own_s3, *args, "--out", str(tmp_path / "o1"))
    kill_when_committed(first, own_s3, lambda: Manifest("s3://idx/index", "codes", cfg, create=False), 40)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 75, err[-3000:]
    assert "index storage s3://idx/index" in err and "Nothing was lost" in err, err[-2000:]

    own_s3.start()
    second = cli(own_s3, *args, "--out", str(tmp_path / "o2"))
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    assert json.loads(out)["stopped"] == ""
    assert_exactly_once(CodeIndex.open("s3://idx/index", s3=cfg), {str(src / k) for k in keys})
    counts = Manifest("s3://idx/index", "codes", cfg, create=False).counts()
    assert counts == {"indexed": len(keys), "quarantined": 1}


# -- throttling: a loopback proxy answering 503 SlowDown for a while ---------------------------------
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class ThrottlingProxy:
    """Forwards S3 requests to ``upstream`` (Host header kept, so signatures hold), but answers
    503 SlowDown to every request during the first ``throttle_s`` seconds after the first one."""

    def __init__(self, upstream: str, throttle_s: float) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.throttled = self.passed = 0
        self._start: float | None = None
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                now = time.monotonic()
                proxy._start = proxy._start or now
                if now - proxy._start < throttle_s:
                    proxy.throttled += 1
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                proxy.passed += 1
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ThrottlingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.s3
@pytest.mark.usefixtures("ray_local")
def test_throttling_is_ridden_out_and_a_corrupt_object_is_still_quarantined(
    s3_config: S3Config, s3_bucket: str, pngs: list[bytes], tmp_path: Path
) -> None:
    store = S3Store(parse_uri(f"s3://{s3_bucket}/png"), s3_config)
    keys = put_archive(store, pngs, 120)
    endpoint = s3_config.endpoint_url
    assert endpoint
    with ThrottlingProxy(endpoint, throttle_s=2.5) as proxy:
        cfg = IndexJobConfig(
            source=f"s3://{s3_bucket}/png",
            index={"uri": str(tmp_path / "index")},
            # no boto3 retries: every 503 reaches medret's own outage budget
            s3=s3_config.model_copy(update={"endpoint_url": proxy.endpoint, "max_attempts": 1}),
            storage_retry_s=60,
            out=str(tmp_path / "out"),
            progress=False,
        )
        summary = run_index(cfg)
    assert proxy.throttled > 0 and proxy.passed > len(keys)
    assert (summary.indexed, summary.quarantined, summary.retry_later) == (len(keys), 1, 0)
    entries = Manifest(str(tmp_path / "index")).entries()
    bad = entries[store.uri_of(CORRUPT)]
    assert bad.status == "quarantined" and "corrupt.png" in bad.error and "SlowDown" not in bad.error
    assert_exactly_once(CodeIndex.open(str(tmp_path / "index")), {store.uri_of(k) for k in keys})


# -- a run that would quarantine most of an archive stops instead ----------------------------------------
@pytest.mark.usefixtures("ray_local")
def test_a_quarantine_storm_stops_the_job_and_quarantines_nothing(pngs: list[bytes], tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(110):
        (src / f"bad{i:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes([i]) * 64)
    for i in range(10):
        (src / f"good{i}.png").write_bytes(pngs[i])
    cfg = IndexJobConfig(
        source=str(src), index={"uri": str(tmp_path / "index")}, out=str(tmp_path / "o"), progress=False, commit_rows=8
    )
    with pytest.raises(QuarantineStormError, match="max_quarantine_share=0.5") as caught:
        run_index(cfg)
    assert "none of them was quarantined" in str(caught.value) and caught.value.exit_code == 75
    assert Manifest(str(tmp_path / "index")).counts().get("quarantined", 0) == 0
    # if they really are bad files, say so: then they are quarantined, each with its reason
    s = run_index(cfg.model_copy(update={"max_quarantine_share": 1.0}))
    assert s.quarantined == 110 and Manifest(str(tmp_path / "index")).counts()["quarantined"] == 110


# -- quarantines recorded by an older medret for storage faults ------------------------------------------
@pytest.mark.usefixtures("ray_local")
def test_old_storage_fault_quarantines_are_listed_apart_and_retried(
    pngs: list[bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medret.cli.main import main

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(pngs[i])
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    index = str(tmp_path / "index")
    cfg = IndexJobConfig(source=str(src), index={"uri": index}, out=str(tmp_path / "o"), progress=False)
    run_index(cfg)
    manifest = Manifest(index)
    old = manifest.entries()[str(src / "1.png")]
    CodeIndex.open(index).delete_sources([old.uri])
    reason = f'reading {old.uri}: Could not connect to the endpoint URL: "http://127.0.0.1:8333/arch/1.png"'
    manifest.record([Entry(**{**old.__dict__, "status": "quarantined", "items": 0, "error": reason})])

    assert main(["quarantine", "list", "--index", index]) == 0
    text = capsys.readouterr().out
    bad_part, _, storage_part = text.partition("recorded for a storage fault")
    assert "1 bad object(s)" in bad_part and "bad.png" in bad_part and "1.png" not in bad_part
    assert str(src / "1.png") in storage_part and "retries them" in text

    again = run_index(cfg)  # no --force, no quarantine retry
    assert (again.indexed, again.unchanged) == (1, 3)
    assert Manifest(index).entries()[old.uri].status == "indexed"
    assert CodeIndex.open(index).count() == 3


# -- a source folder that is gone or empty is not "every object deleted" ----------------------------------
@pytest.mark.usefixtures("ray_local")
def test_an_unmounted_source_folder_deletes_nothing(pngs: list[bytes], tmp_path: Path) -> None:
    src = tmp_path / "share"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.png").write_bytes(pngs[i])
    index = str(tmp_path / "index")
    cfg = IndexJobConfig(
        source=str(src), index={"uri": index}, out=str(tmp_path / "o"), progress=False, incremental=True
    )
    assert run_index(cfg).indexed == 4
    src.rename(tmp_path / "away")  # the share's mount point is gone
    with pytest.raises(ConfigError, match="share.*does not exist"):
        run_index(cfg)
    src.mkdir()  # the mount point is there, the share is not mounted on it
    with pytest.raises(JobStoppedError, match="lists no objects, yet the index holds 4") as caught:
        run_index(cfg)
    assert caught.value.exit_code == 75
    assert Manifest(index).counts() == {"indexed": 4} and CodeIndex.open(index).count() == 4
    src.rmdir()
    (tmp_path / "away").rename(src)  # mounted again: nothing to do
    again = run_index(cfg)
    assert (again.indexed, again.deleted, again.unchanged) == (0, 0, 4)


@pytest.mark.usefixtures("ray_local")
def test_a_folder_gone_from_the_source_is_not_deleted_wholesale(pngs: list[bytes], tmp_path: Path) -> None:
    """One sub-share not mounted: most of the index would go; the run stops and says where."""
    src = tmp_path / "share"
    for i in range(6):
        (src / ("mri" if i < 4 else "cxr")).mkdir(parents=True, exist_ok=True)
        (src / ("mri" if i < 4 else "cxr") / f"{i}.png").write_bytes(pngs[i])
    index = str(tmp_path / "index")
    cfg = IndexJobConfig(
        source=str(src), index={"uri": index}, out=str(tmp_path / "o"), progress=False, incremental=True
    )
    assert run_index(cfg).indexed == 6
    (src / "mri").rename(tmp_path / "mri-away")
    with pytest.raises(JobStoppedError, match=r"no longer lists 4 of the 6 .*max_delete_share=0.5.*under: mri") as e:
        run_index(cfg)
    assert e.value.exit_code == 75 and CodeIndex.open(index).count() == 6
    assert run_index(cfg.model_copy(update={"max_delete_share": 1.0})).deleted == 4  # they really were deleted
