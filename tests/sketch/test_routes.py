"""The sketch routes over a real lesion table: templates, PNG levels, sketch search, and fuzzing (no 5xx)."""

from __future__ import annotations

import base64
import io
import json
from typing import Any
from typing import Any as Case

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medret.serve.app import create_app
from medret.serve.config import ServiceConfig
from medret.serve.service import Service
from medret.sketch.encoder import RasterEncoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(lesion_index: str) -> TestClient:
    return TestClient(create_app(Service(ServiceConfig(index=lesion_index, refresh_s=0))))


def png_b64(mask: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def tcga_sketch(case: Case, encoder: RasterEncoder) -> tuple[int, np.ndarray]:
    tg = encoder.grid
    level = int(np.argmax([(case.carried[tg.slab(i)] == 1).sum() for i in range(tg.n_levels)]))
    return level, (tg.box((case.carried[tg.slab(level)] == 1).mean(axis=0)) >= 0.5).astype(float)


def test_templates_list_levels_and_pngs(api: TestClient, encoder: RasterEncoder) -> None:
    r = api.get("/v1/templates")
    assert r.status_code == 200, r.text
    (t,) = r.json()["templates"]
    assert t["table"] == "mri" and t["template"] == "robex" and t["patients"] == 32
    assert t["classes"] == ["edema", "enhancing"] and len(t["levels"]) == encoder.grid.n_levels
    png = api.get(t["levels"][10]["png_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(png.content))
    assert img.size == (encoder.grid.width, encoder.grid.height)
    outlined = api.get(t["levels"][10]["png_url"] + "?regions=true")
    assert outlined.status_code == 200 and outlined.content != png.content
    assert api.get("/v1/templates/mri/levels/999.png").status_code == 400
    assert api.get("/v1/templates/nope/levels/1.png").status_code == 404


def test_a_sketch_over_the_real_lesion_finds_its_patient_first(
    api: TestClient, encoder: RasterEncoder, tcga_case: Case
) -> None:
    level, mask = tcga_sketch(tcga_case, encoder)
    body = {"table": "mri", "level": level, "masks": {"edema": {"png": png_b64(mask)}}, "k": 5}
    r = api.post("/v1/sketch/search", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    top = out["results"][0]
    assert top["patient"] == "TCGA-FG-6692" and top["dice"] > 0.8 and abs(top["level"] - level) <= 1
    assert top["hemisphere"] in ("right", "both") and max(top["regions"], key=top["regions"].get).startswith("right_")
    assert top["thumbnail"].startswith("data:image/png;base64,")
    q = out["query"]["edema"]
    assert np.asarray(q["grid"]).shape == (32, 32) and q["bits"] == int(np.sum(q["grid"]))
    assert out["patients_searchable"] == 32
    mirrored = dict(body, masks={"edema": {"png": png_b64(mask[:, ::-1])}})
    patients = [h["patient"] for h in api.post("/v1/sketch/search", json=mirrored).json()["results"]]
    assert "TCGA-FG-6692" not in patients[:1]


def test_polygons_in_template_mm(api: TestClient, encoder: RasterEncoder, tcga_case: Case) -> None:
    level, mask = tcga_sketch(tcga_case, encoder)
    rows, cols = np.nonzero(mask)
    x, y = encoder.grid.pixel_mm([rows.min(), rows.max()], [cols.min(), cols.max()])
    square = [[x[0], y[0]], [x[1], y[0]], [x[1], y[1]], [x[0], y[1]]]
    r = api.post("/v1/sketch/search", json={"level": level, "masks": {"edema": {"polygons": [square]}}, "k": 3})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["patient"] == "TCGA-FG-6692"


def test_bad_sketches_are_client_errors_naming_the_input(api: TestClient, encoder: RasterEncoder) -> None:
    ok = np.zeros((encoder.grid.height, encoder.grid.width))
    ok[50:80, 50:80] = 1
    cases = [
        (
            {"level": 3, "masks": {"edema": {"png": png_b64(np.zeros_like(ok))}}},
            422,
            "sketch[edema]: the sketch marks no lesion",
        ),
        ({"level": 3, "masks": {"edema": {"png": png_b64(np.ones((40, 90)))}}}, 422, "must cover the template box"),
        ({"level": 999, "masks": {"edema": {"png": png_b64(ok)}}}, 400, "level must be in 0.."),
        ({"level": 3, "masks": {"necrotic": {"png": png_b64(ok)}}}, 422, "not in this table's classes"),
        ({"level": 3, "masks": {"edema": {"png": "not base64!"}}}, 422, "not base64"),
        (
            {"level": 3, "masks": {"edema": {"png": base64.b64encode(b"GIF89a junk").decode()}}},
            422,
            "not a readable image",
        ),
        ({"level": 3, "masks": {"edema": {}}}, 422, "give a 'png' or 'polygons'"),
        ({"table": "../etc", "level": 3, "masks": {"edema": {"png": png_b64(ok)}}}, 404, "no sketch-searchable table"),
        ({"level": 3, "masks": {"edema": {"png": png_b64(ok)}}, "k": 5000}, 400, "k must be at most"),
    ]
    for body, code, text in cases:
        r = api.post("/v1/sketch/search", json=body)
        assert r.status_code == code, (body.get("masks"), r.text)
        assert text in r.text, r.text


def test_fuzzed_requests_never_get_a_5xx(api: TestClient, encoder: RasterEncoder) -> None:
    rng = np.random.default_rng(5)
    tg = encoder.grid

    def value() -> object:
        pool: list[object] = [
            None,
            0,
            -1,
            1e308,
            float("nan"),
            "",
            "x" * 300,
            [],
            {},
            [[1, 2]],
            True,
            rng.integers(-5, 50).item(),
            png_b64(rng.random((int(rng.integers(1, 300)), int(rng.integers(1, 300)))) > 0.7),
            png_b64(rng.random((tg.height, tg.width)) > rng.random()),
            [[[float(v) for v in rng.uniform(-150, 150, 2)] for _ in range(int(rng.integers(0, 6)))]],
        ]
        return pool[int(rng.integers(len(pool)))]

    codes = []
    for _ in range(250):
        body: dict[str, object] = {
            "level": value() if rng.random() < 0.3 else int(rng.integers(-2, tg.n_levels + 2)),
            "masks": {
                str(rng.choice(["edema", "enhancing", "x", ""])): {str(rng.choice(["png", "polygons", "q"])): value()}
                for _ in range(int(rng.integers(0, 3)))
            },
        }
        if rng.random() < 0.3:  # a well-formed sketch, so the fuzz also reaches the search
            blob = np.zeros((tg.height, tg.width))
            r0, c0 = rng.integers(20, tg.height - 60, 2)
            blob[r0 : r0 + rng.integers(8, 60), c0 : c0 + rng.integers(8, 60)] = 1
            body = {"level": int(rng.integers(0, tg.n_levels)), "masks": {"edema": {"png": png_b64(blob)}}}
        for key in ("k", "tolerance", "region_weight", "table", "thumbnails"):
            if rng.random() < 0.15:
                body[key] = value()
        r = (
            api.post("/v1/sketch/search", content=json.dumps(body))
            if rng.random() < 0.9
            else api.post(
                "/v1/sketch/search", content=bytes(rng.integers(0, 256, int(rng.integers(0, 200))).astype(np.uint8))
            )
        )
        codes.append(r.status_code)
        assert r.status_code < 500, (body, r.text)
    for path in (
        "/v1/templates/mri/levels/-1.png",
        "/v1/templates/mri/levels/x.png",
        "/v1/templates/%2e%2e/levels/1.png",
    ):
        assert api.get(path).status_code < 500
    assert codes.count(200) >= 20 and any(c >= 400 for c in codes), sorted(set(codes))


def test_the_cli_answers_a_sketch_like_the_service(
    lesion_index: str, encoder: RasterEncoder, tcga_case: Case, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from pathlib import Path

    from medret.cli.main import main

    level, mask = tcga_sketch(tcga_case, encoder)
    png = Path(str(tmp_path)) / "sketch.png"
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(png)
    assert (
        main(
            [
                "search",
                "--index",
                lesion_index,
                "--sketch",
                str(png),
                "--level",
                str(level),
                "--class",
                "edema",
                "--k",
                "3",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["patient"] == "TCGA-FG-6692" and 1 <= len(out["results"]) <= 3
    assert main(["search", "--index", lesion_index, "--sketch", str(png), "--level", str(level)]) == 0
    text = capsys.readouterr().out
    assert "1. Dice" in text and "TCGA-FG-6692" in text and "32 sketch-searchable patients" in text
    assert main(["search", "--index", lesion_index, "--sketch", str(png)]) != 0
    assert "--sketch needs --level" in capsys.readouterr().err
    assert main(["search", "--index", lesion_index, "--sketch", str(png), "--level", "99"]) != 0
    assert "level must be in 0..30" in capsys.readouterr().err


def test_the_spec_documents_the_sketch_routes_and_schemathesis_finds_no_5xx(lesion_index: str) -> None:
    """The sketch operations, fuzzed from the OpenAPI spec like the other routes (tests/serve/test_serve.py):
    never a 5xx, never a status the spec does not document."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    app = create_app(Service(ServiceConfig(index=lesion_index)))
    spec = TestClient(app).get("/openapi.json").json()
    ours = {p: ops for p, ops in spec["paths"].items() if "sketch" in p or "templates" in p}
    assert set(ours) == {"/v1/templates", "/v1/templates/{table}/levels/{level}.png", "/v1/sketch/search"}
    for path, ops in ours.items():
        for method, op in ops.items():
            for code in ("400", "401", "404", "413", "422", "503"):
                assert code in op["responses"], (method, path, code)
    assert "masks" in json.dumps(ours["/v1/sketch/search"]["post"]["requestBody"])
    schema: Any = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[tuple[str, int, str]] = []
    cases = [0]

    def fuzz(operation: Any, mode: Any) -> None:
        documented = set(operation.definition.raw.get("responses", {}))

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            if cases[0] % 2 and case.path_parameters and "table" in case.path_parameters:
                case.path_parameters["table"] = "mri"
            if cases[0] % 2 and isinstance(case.body, dict):
                case.body["table"] = "mri"
            response = case.call(timeout=60)
            cases[0] += 1
            if response.status_code >= 500 or str(response.status_code) not in documented:
                failures.append((operation.label, response.status_code, response.text[:300]))

        try:
            run()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE

    for result in schema.get_all_operations():
        op = result.ok()
        if "sketch" in op.path or "templates" in op.path:
            for mode in GenerationMode:
                fuzz(op, mode)
    assert cases[0] >= 60
    assert not failures, failures[:5]
