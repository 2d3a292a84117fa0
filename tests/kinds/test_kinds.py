"""A kind from outside medret: a 2-D ``.npy`` reader registered through the ``medret.kinds`` entry point.

The plugin is a package written into a temporary folder with its own ``dist-info``, put
on ``PYTHONPATH`` (subprocesses, and the Ray workers they start) or ``sys.path`` (the
in-process service). No medret file knows it: everything below goes through the registry.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medret import kinds

PLUGIN = '''
"""A medret kind for 2-D NumPy arrays saved with numpy.save."""
import io
from pathlib import Path, PurePosixPath

import numpy as np

from medret.errors import CorruptFileError
from medret.io.base import Decoded
from medret.kinds import Item, Kind, stats

MAGIC = b"\\x93NUMPY"


def _array(data, name):
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise CorruptFileError(name, f"not a readable .npy array: {err}") from err
    if arr.ndim != 2:
        raise CorruptFileError(name, f"a 2-D array is needed, this one has shape {arr.shape}")
    return arr


class NpyKind(Kind):
    name = "npy"
    description = "a 2-D NumPy array (numpy.save), one image per file"
    patterns = ("*.npy",)
    suffixes = (".npy",)
    query_mode = "npy"

    def recognise(self, name, head):
        return head.startswith(MAGIC) and PurePosixPath(name.lower()).suffix == ".npy"

    def items(self, ctx, unit, data):
        arr = _array(data, unit.uri)
        decoded = Decoded(arr, kind=self.name, reader="numpy", meta={"modality": "OT"})
        return Item.of(ctx.recipe(self.name)(decoded, input_size=ctx.input_size), decoded.meta)

    def render(self, ctx, unit, suffix):
        arr = _array(ctx.store.read_bytes(unit.key), unit.uri).astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)  # its own look: the raw array stretched

    def describe(self, path, label, **options):
        return {"reader": "numpy", **stats(_array(Path(path).read_bytes(), label))}
'''

ENTRY_POINTS = "[medret.kinds]\nnpy = medret_npy_kind:NpyKind\n"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plugin")
    (root / "medret_npy_kind").mkdir()
    (root / "medret_npy_kind" / "__init__.py").write_text(PLUGIN)
    info = root / "medret_npy_kind-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: medret-npy-kind\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


@pytest.fixture
def registered(plugin: Path) -> Iterator[None]:
    sys.path.insert(0, str(plugin))
    kinds.reload()
    try:
        yield
    finally:
        sys.path.remove(str(plugin))
        sys.modules.pop("medret_npy_kind", None)
        kinds.reload()


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    out = {}
    for i in range(4):  # smooth, distinct patterns: each its own code
        y, x = np.mgrid[0:40, 0:40] / 40.0
        out[f"a{i}.npy"] = np.sin(6 * x * (i + 1)) * np.cos(5 * y * (4 - i)) + 0.1 * rng.standard_normal((40, 40))
    return out


@pytest.fixture(scope="module")
def archive(plugin: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A folder of .npy arrays beside real PNGs and one corrupt .npy, indexed by `medret index` in a subprocess."""
    from medret.eval.benchmarks import medmnist4

    root = tmp_path_factory.mktemp("npy")
    src = root / "src"
    src.mkdir()
    for name, arr in arrays().items():
        np.save(src / name, arr.astype(np.float32))
    gallery = medmnist4(data_dir / "medmnist")["gallery"]
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(gallery.images[i]).save(buf, format="PNG")
        (src / f"p{i}.png").write_bytes(buf.getvalue())
    good = (src / "a0.npy").read_bytes()
    (src / "broken.npy").write_bytes(good[:10] + b"{'descr': not a header" + bytes(40))
    index = root / "index"
    proc = medret(plugin, "index", "--source", str(src), "--index", str(index), "--out", str(root / "out"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"src": src, "index": str(index), "summary": json.loads(proc.stdout), "plugin": plugin}


def medret(plugin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "medret.cli.main", *args], capture_output=True, text=True, timeout=600, env=env
    )


def test_an_entry_point_kind_is_listed_and_inspected(plugin: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(12, dtype=np.int16).reshape(3, 4))
    listed = [json.loads(line) for line in medret(plugin, "kinds", "--json").stdout.splitlines()]
    assert {"kind": "npy", "from": "medret_npy_kind", "query": "npy"}.items() <= next(
        r for r in listed if r["kind"] == "npy"
    ).items()
    proc = medret(plugin, "inspect", str(tmp_path / "x.npy"), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["kind"] == "npy" and info["shape"] == [3, 4] and info["dtype"] == "int16" and info["max"] == 11
    assert "npy" not in kinds.names()  # nothing of it leaked into this process


def test_the_job_indexes_npy_beside_pngs_and_quarantines_a_corrupt_one(archive: dict[str, Any]) -> None:
    s = archive["summary"]
    assert s["indexed"] == 7 and s["quarantined"] == 1, s
    (bad,) = s["quarantine"]
    assert bad["uri"].endswith("broken.npy") and "not a readable .npy array" in bad["error"]
    from medret.index.store import CodeIndex

    rows = CodeIndex.open(archive["index"], table="codes").to_arrow(["item_id", "modality"]).to_pylist()
    npy = sorted(r["item_id"] for r in rows if r["item_id"].endswith(".npy"))
    assert [Path(i).name for i in npy] == ["a0.npy", "a1.npy", "a2.npy", "a3.npy"]
    assert {r["modality"] for r in rows if r["item_id"].endswith(".npy")} == {"OT"}
    assert len(rows) == 7


def test_cli_search_by_npy_finds_itself_at_distance_zero(archive: dict[str, Any]) -> None:
    query = archive["src"] / "a2.npy"
    proc = medret(archive["plugin"], "search", "--index", archive["index"], "--image", str(query), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    top = out["results"][0]
    assert top["item_id"] == str(query) and top["distance"] == 0, out["results"][:3]
    assert out["query"]["kind"] == "npy"


@pytest.mark.usefixtures("registered")
def test_http_upload_and_thumbnail_of_an_npy_item(archive: dict[str, Any]) -> None:
    from fastapi.testclient import TestClient

    from medret.serve.app import create_app
    from medret.serve.config import ServiceConfig
    from medret.serve.service import Service

    api = TestClient(create_app(Service(ServiceConfig(index=archive["index"]))))
    query = archive["src"] / "a1.npy"
    r = api.post("/v1/search", files={"file": ("q.npy", query.read_bytes())}, data={"k": "3"})
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["item_id"] == str(query) and top["distance"] == 0
    r = api.post("/v1/search", files={"file": ("q.npy", query.read_bytes())}, data={"k": "3", "kind": "npy"})
    assert r.status_code == 200 and r.json()["query"]["kind"] == "npy"
    thumb = api.get(top["thumbnail_url"])
    assert thumb.status_code == 200, thumb.text
    img = np.asarray(Image.open(io.BytesIO(thumb.content)))
    expected = np.load(query)
    assert img.shape == expected.shape  # the kind's own rendering: the array at its own size, stretched
    stretched = (expected - expected.min()) / (expected.max() - expected.min())
    assert np.abs(img / 255.0 - stretched).max() < 1 / 255 + 1e-6
    bad = api.post("/v1/search", files={"file": ("x.npy", (archive["src"] / "broken.npy").read_bytes())})
    assert bad.status_code == 422 and "x.npy" in bad.json()["detail"]
