"""Indexing straight from a PACS: a DICOMweb source against a real Orthanc.

Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``) runs on loopback with HTTP basic auth;
the real radiograph DICOMs and pydicom's test objects go in through its REST API, and medret
lists them with QIDO-RS and retrieves them with WADO-RS.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from orthanc import Orthanc, dicomweb_plugin, orthanc_binary

from medret.errors import StoreUnreachableError
from medret.index.manifest import Manifest
from medret.index.store import CodeIndex
from medret.pipelines.backfill import run_index
from medret.pipelines.config import IndexJobConfig
from medret.storage.s3local import free_port

pytestmark = [
    pytest.mark.usefixtures("ray_local"),
    pytest.mark.skipif(
        orthanc_binary() is None or dicomweb_plugin() is None,
        reason="needs Debian's orthanc and orthanc-dicomweb packages (.ci/run installs them)",
    ),
]

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
#: pydicom's own test objects: CT, MR, JPEG 2000, JPEG-LS, RLE colour, and an RT structure set (no pixels)
PYDICOM_OBJECTS = (
    "CT_small.dcm",
    "MR_small.dcm",
    "JPEG2000.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_rle.dcm",
    "rtstruct.dcm",
)


def corpus(data_dir: Path) -> list[Path]:
    files = sorted((data_dir / "cxr").glob("*.dcm")) + sorted((data_dir / "dicom").glob("*.dcm"))
    return files + [PYDICOM_FILES / n for n in PYDICOM_OBJECTS if (PYDICOM_FILES / n).exists()]


@contextlib.contextmanager
def qido_server(*, token: str | None = None, tls: Any = None) -> Iterator[tuple[int, list[str]]]:
    """A loopback HTTP(S) endpoint answering every QIDO-RS search with no results; with ``token``,
    401 unless the request carries it as a bearer token. Yields its port and the Authorization headers seen."""
    import http.server
    import threading

    seen: list[str] = []

    class Qido(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(200 if token is None or seen[-1] == f"Bearer {token}" else 401)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Qido)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd.server_address[1], seen
    finally:
        httpd.shutdown()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[dict[str, Any]]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port())
    server.start()
    stored: dict[str, dict[str, str]] = {}  # file name -> Orthanc's answer (its ID, ParentSeries...)
    for path in corpus(data_dir):
        answer = server.upload(path.read_bytes())
        if answer:
            stored[path.name] = answer
    try:
        yield {"server": server, "stored": stored}
    finally:
        server.stop()


def job(server: Orthanc, index: Path, out: Path, **extra: Any) -> IndexJobConfig:
    """The job config; credentials in it travel to the Ray workers (the CLI path uses the environment)."""
    dicomweb = {"user": server.user, "password": server.password, "timeout_s": 10, **extra.pop("dicomweb", {})}
    return IndexJobConfig(
        source=f"dicomweb+{server.dicomweb}",
        index={"uri": str(index)},
        out=str(out),
        progress=False,
        dicomweb=dicomweb,
        storage_retry_s=3,
        **extra,
    )


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def backfilled(pacs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dicomweb-index")
    # non-image objects listed too (they are left out by default): each is then quarantined with its reason
    cfg = job(pacs["server"], root / "index", root / "o", incremental=True, dicomweb={"skip_non_images": False})
    return {"cfg": cfg, "summary": run_index(cfg), "index": str(root / "index")}


def test_every_instance_is_indexed_or_quarantined_with_a_reason(
    pacs: dict[str, Any], backfilled: dict[str, Any], data_dir: Path
) -> None:
    s = backfilled["summary"]
    stored = pacs["stored"]
    instances = {a["ID"] for a in stored.values()}  # two files may be one instance (the same SOP UID)
    assert len(instances) >= 9  # Orthanc took the real radiographs and pydicom's objects
    assert s.objects_seen == len(instances) and s.indexed + s.quarantined == len(instances)
    entries = Manifest(backfilled["index"]).entries()
    assert len(entries) == len(instances)
    by_uid = {u.rsplit("/", 1)[1]: e for u, e in entries.items()}
    for path in corpus(data_dir):
        if path.name in stored:
            e = by_uid[uid_of(path)]
            assert e.status == "indexed" or (e.status == "quarantined" and e.error), (path.name, e)
    assert by_uid[uid_of(PYDICOM_FILES / "rtstruct.dcm")].status == "quarantined"  # no image in it
    for path in sorted((data_dir / "cxr").glob("*.dcm")):
        assert by_uid[uid_of(path)].status == "indexed"  # the radiographs are all in
    uri = next(iter(entries))
    assert uri.startswith(f"dicomweb+{pacs['server'].dicomweb}/studies/") and "/series/" in uri
    written = [p for p in Path(backfilled["cfg"].out).rglob("*") if p.is_file()]
    assert written and not any(pacs["server"].password in p.read_text(errors="ignore") for p in written)


def test_an_upload_finds_its_instance_at_distance_0_and_the_thumbnail_comes_by_wado(
    pacs: dict[str, Any], backfilled: dict[str, Any], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from medret.serve.app import create_app
    from medret.serve.config import ServiceConfig
    from medret.serve.service import Service

    server = pacs["server"]
    monkeypatch.setenv("MEDRET_DICOMWEB_USER", server.user)  # the service reads the PACS with env credentials
    monkeypatch.setenv("MEDRET_DICOMWEB_PASSWORD", server.password)
    api = TestClient(create_app(Service(ServiceConfig(index=backfilled["index"]))))
    radiograph = sorted((data_dir / "cxr").glob("*.dcm"))[0]
    r = api.post("/v1/search", files={"file": (radiograph.name, radiograph.read_bytes())}, data={"k": "3"})
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["distance"] == 0 and top["item_id"].endswith("/instances/" + uid_of(radiograph))
    thumb = api.get(top["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.content[:8] == b"\x89PNG\r\n\x1a\n"
    # a service whose roots leave the PACS out refuses to fetch from it
    fenced = TestClient(
        create_app(Service(ServiceConfig(index=backfilled["index"], roots=["dicomweb+http://127.0.0.1:1/"])))
    )
    r = fenced.get(top["thumbnail_url"])
    assert r.status_code == 403 and "outside the roots" in r.json()["detail"]


def test_a_second_run_indexes_nothing(backfilled: dict[str, Any], tmp_path: Path) -> None:
    s = run_index(backfilled["cfg"].model_copy(update={"out": str(tmp_path)}))
    assert (s.indexed, s.quarantined, s.deleted, s.items_written) == (0, 0, 0, 0)
    assert s.unchanged == s.objects_seen > 0


def test_an_instance_deleted_in_the_pacs_leaves_the_index(
    pacs: dict[str, Any], backfilled: dict[str, Any], tmp_path: Path
) -> None:
    server, stored = pacs["server"], pacs["stored"]
    name = "CT_small.dcm"
    uid = uid_of(PYDICOM_FILES / name)
    server.delete(stored.pop(name)["ID"])
    s = run_index(backfilled["cfg"].model_copy(update={"out": str(tmp_path)}))
    assert s.deleted == 1 and s.indexed == 0
    sources = set(CodeIndex.open(backfilled["index"]).to_arrow(["source_uri"]).column("source_uri").to_pylist())
    assert sources and not any(u.endswith("/instances/" + uid) for u in sources)
    (gone,) = [e for u, e in Manifest(backfilled["index"]).entries().items() if u.endswith(uid)]
    assert gone.status == "deleted"


def test_wrong_credentials_stop_the_job_clearly_and_index_nothing(pacs: dict[str, Any], tmp_path: Path) -> None:
    cfg = job(pacs["server"], tmp_path / "index", tmp_path / "o", dicomweb={"password": "not-the-password"})
    with pytest.raises(StoreUnreachableError, match="refused medret's credentials") as caught:
        run_index(cfg)
    assert "HTTP 401" in str(caught.value) and "not-the-password" not in str(caught.value)
    assert caught.value.exit_code == 75
    assert Manifest(str(tmp_path / "index")).counts() == {}
    saved = (tmp_path / "o").glob("*")
    assert not any("not-the-password" in p.read_text(errors="ignore") for p in saved if p.is_file())


def test_a_source_uri_with_credentials_in_it_is_refused(pacs: dict[str, Any], tmp_path: Path) -> None:
    from medret.errors import InvalidURIError
    from medret.storage.uri import parse_uri

    with pytest.raises(InvalidURIError, match="MEDRET_DICOMWEB_USER") as caught:
        parse_uri("dicomweb+http://medret:pacs-secret@127.0.0.1:8042/dicom-web")
    assert "pacs-secret" not in str(caught.value)


def test_inspect_reads_an_instance_by_wado(pacs: dict[str, Any], data_dir: Path) -> None:
    server = pacs["server"]
    radiograph = sorted((data_dir / "cxr").glob("*.dcm"))[0]
    ds = pydicom.dcmread(radiograph, stop_before_pixels=True)
    uri = (
        f"dicomweb+{server.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    env = {**os.environ, "MEDRET_DICOMWEB_USER": server.user, "MEDRET_DICOMWEB_PASSWORD": server.password}
    r = subprocess.run(
        [sys.executable, "-m", "medret.cli.main", "inspect", uri, "--json"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    assert info["kind"] == "dicom" and info["path"] == uri and info["shape"][:2] == [ds.Rows, ds.Columns]


# -- the PACS going down mid-backfill ------------------------------------------------------------------
def radiograph_copies(data_dir: Path, n: int) -> list[bytes]:
    """``n`` copies of a real radiograph, each a new instance in a new series (fresh UIDs)."""
    from pydicom.uid import generate_uid

    src = pydicom.dcmread(sorted((data_dir / "cxr").glob("*.dcm"))[0])
    out = []
    for i in range(n):
        src.StudyInstanceUID, src.SeriesInstanceUID = generate_uid(), generate_uid()
        src.SOPInstanceUID = src.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        src.InstanceNumber = i + 1
        buf = io.BytesIO()
        src.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


@pytest.mark.slow
def test_the_pacs_stopped_mid_run_is_an_unreachable_store(tmp_path: Path, data_dir: Path) -> None:
    """Orthanc killed once the job has listed it (every read still to come): the job stops with exit 75
    naming the server, quarantines nothing, and the same command finishes once Orthanc is back."""
    from test_storage_faults import assert_exactly_once

    server = Orthanc(tmp_path / "orthanc", free_port())
    server.start()
    try:
        uids = set()
        for data in radiograph_copies(data_dir, 60):
            assert server.upload(data)
            uids.add(str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID))
        index = tmp_path / "index"
        env = {**os.environ, "MEDRET_DICOMWEB_USER": server.user, "MEDRET_DICOMWEB_PASSWORD": server.password}

        def cli(out: str, *extra: str, patient: bool = False) -> subprocess.Popen[str]:
            cmd = [sys.executable, "-m", "medret.cli.main", "index", "--source", f"dicomweb+{server.dicomweb}"]
            cmd += ["--index", str(index), "--out", str(tmp_path / out), *extra]
            # short budgets to see the outage quickly; the rerun, against a PACS that is up, gets the usual
            # ones (a loaded machine can make Orthanc answer later than 3 s)
            budgets = (
                ("storage_retry_s=60", "dicomweb.timeout_s=30")
                if patient
                else ("storage_retry_s=3", "dicomweb.timeout_s=3")
            )
            for s in ("commit_rows=16", *budgets):
                cmd += ["--set", s]
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

        first = cli("o1")
        assert first.stderr is not None
        seen = []
        for line in first.stderr:  # progress: "[medret] dicomweb+http://...: 60 objects (0 sidecars), 60 to index, ..."
            seen.append(line)
            if "to index" in line:
                assert "60 objects" in line, line
                server.kill()
                break
        _, rest = first.communicate(timeout=300)
        err = "".join(seen) + rest
        assert first.returncode == 75, err[-3000:]
        assert f"the DICOMweb server {server.dicomweb}" in err and "unreachable" in err, err[-2000:]
        assert "Nothing was lost" in err and "same command" in err
        entries = Manifest(str(index), "codes", create=False).entries()
        assert not [e for e in entries.values() if e.status == "quarantined"]

        server.start()  # same storage, same port
        second = cli("o2", "--json", patient=True)
        out, err = second.communicate(timeout=600)
        assert second.returncode == 0, err[-3000:]
        assert json.loads(out)["indexed"] == len(uids) - len(entries)
        entries = Manifest(str(index), "codes", create=False).entries()
        assert {u.rsplit("/", 1)[1] for u, e in entries.items() if e.status == "indexed"} == uids
        assert_exactly_once(CodeIndex.open(str(index)), set(entries))
    finally:
        server.stop()


def test_tls_is_verified_by_default(tmp_path: Path) -> None:
    """A real TLS server with a self-signed certificate: refused unless its CA is given."""
    import ssl

    from medret.config import DicomWebConfig
    from medret.errors import StorageAuthError
    from medret.storage.dicomweb import DicomWebStore
    from medret.storage.uri import parse_uri

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)),
            *("-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        capture_output=True,
    )
    if made.returncode != 0:
        pytest.skip("openssl cannot make a test certificate here")

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    with qido_server(tls=tls) as (port, _):
        root = parse_uri(f"dicomweb+https://127.0.0.1:{port}/dicom-web")
        with pytest.raises(StorageAuthError, match="not trusted .certificate verify failed.*dicomweb.ca_bundle"):
            list(DicomWebStore(root, DicomWebConfig(timeout_s=5)).list())
        assert list(DicomWebStore(root, DicomWebConfig(timeout_s=5, ca_bundle=str(cert))).list()) == []


def test_listing_pages_through_qido_and_a_series_route_makes_volumes(pacs: dict[str, Any]) -> None:
    from medret.config import DicomWebConfig
    from medret.pipelines.config import Route, default_routes
    from medret.pipelines.sources import list_source
    from medret.storage.dicomweb import DicomWebStore
    from medret.storage.uri import parse_uri

    server = pacs["server"]
    root = parse_uri(f"dicomweb+{server.dicomweb}")
    cfg = {"user": server.user, "password": server.password}
    whole = list(DicomWebStore(root, DicomWebConfig(**cfg)).list())
    paged = DicomWebStore(root, DicomWebConfig(**cfg, page_size=2))
    assert list(paged.list()) == whole and len(whole) > 4  # pages of 2 series, and of 2 instances
    series = {i.key.rsplit("/instances/", 1)[0] for i in whole}
    objects, _ = list_source(paged, [Route(pattern="studies/*", kind="dicom-series"), *default_routes()])
    assert sorted(o.key for o in objects) == sorted(f"{s}/instances/" for s in series)
    assert all(o.kind == "dicom-series" and o.members for o in objects)
    # a filter narrows the listing on the server
    mr = DicomWebStore(parse_uri(f"dicomweb+{server.dicomweb}?Modality=MR"), DicomWebConfig(**cfg))
    assert 0 < len(list(mr.list())) < len(whole)


def test_a_bearer_token_is_sent_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DICOMweb endpoint behind a bearer token (as cloud PACSs are): the token from the environment."""
    from medret.errors import StorageAuthError
    from medret.storage.dicomweb import DicomWebStore
    from medret.storage.uri import parse_uri

    with qido_server(token="tok-123") as (port, seen):
        root = parse_uri(f"dicomweb+http://127.0.0.1:{port}/dicom-web")
        monkeypatch.setenv("MEDRET_DICOMWEB_TOKEN", "wrong")
        with pytest.raises(StorageAuthError, match="HTTP 401") as caught:
            list(DicomWebStore(root).list())
        assert "wrong" not in str(caught.value)
        monkeypatch.setenv("MEDRET_DICOMWEB_TOKEN", "tok-123")
        assert list(DicomWebStore(root).list()) == [] and seen[-1] == "Bearer tok-123"


def test_non_images_are_left_out_and_a_scoped_source_reads_back(pacs: dict[str, Any], data_dir: Path) -> None:
    from medret.config import DicomWebConfig
    from medret.storage.dicomweb import DicomWebStore
    from medret.storage.uri import parse_uri

    server = pacs["server"]
    cfg = DicomWebConfig(user=server.user, password=server.password)
    listed = {i.key.rsplit("/", 1)[1] for i in DicomWebStore(parse_uri(f"dicomweb+{server.dicomweb}"), cfg).list()}
    assert uid_of(PYDICOM_FILES / "rtstruct.dcm") not in listed and uid_of(PYDICOM_FILES / "MR_small.dcm") in listed
    radiograph = sorted((data_dir / "cxr").glob("*.dcm"))[0]
    ds = pydicom.dcmread(radiograph, stop_before_pixels=True)
    study = DicomWebStore(parse_uri(f"dicomweb+{server.dicomweb}/studies/{ds.StudyInstanceUID}"), cfg)
    (inst,) = list(study.list())
    assert study.read_bytes(inst.key) == radiograph.read_bytes()
    # keys relative to the scoped root (as the service's roots hand them over) read the same instance
    relative = inst.key.split("/", 2)[2]
    assert relative.startswith("series/") and study.read_bytes(relative) == radiograph.read_bytes()
    with pytest.raises(Exception, match="not DICOM UIDs"):
        study.read_bytes("series/1/instances/..%2F..%2Fsystem")


def test_a_filtered_incremental_run_deletes_nothing_outside_its_filter(
    backfilled: dict[str, Any], tmp_path: Path
) -> None:
    cfg = backfilled["cfg"]
    narrowed = cfg.model_copy(update={"source": cfg.source + "?Modality=MR", "out": str(tmp_path)})
    before = CodeIndex.open(backfilled["index"]).count()
    s = run_index(narrowed)
    assert s.deleted == 0 and 0 < s.objects_seen < before
    assert CodeIndex.open(backfilled["index"]).count() == before
