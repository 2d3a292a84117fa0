"""The query service against hostile and expensive requests, at the ASGI layer and through the real app.

Filters of every shape, auth decided before a body is read, slow and oversized bodies, the
health probe, and the OpenAPI spec's promise of every status the API returns.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any
from urllib.parse import quote

import hostile
import numpy as np
import pytest
from fastapi.testclient import TestClient

from medret.index.store import CodeIndex
from medret.pipelines.backfill import run_index
from medret.pipelines.config import IndexJobConfig
from medret.serve.app import create_app
from medret.serve.config import ServiceConfig
from medret.serve.service import Service

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def index(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """40 real PNGs with labels and datasets, indexed by the real job."""
    from test_serve import png

    from medret.eval.benchmarks import medmnist4

    root = tmp_path_factory.mktemp("guard")
    src = root / "src"
    src.mkdir()
    gallery = medmnist4(data_dir / "medmnist")["gallery"]
    rows = ["path,label,dataset"]
    for n in range(40):
        (src / f"{n:03d}.png").write_bytes(png(gallery.images[n * 97]))
        rows.append(f"{n:03d}.png,{gallery.label[n * 97]},set{n % 2}")
    (src / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = IndexJobConfig(source=str(src), index={"uri": str(root / "index")}, out=str(root / "o"), progress=False)
    assert run_index(cfg).indexed == 40
    ids = CodeIndex.open(str(root / "index")).to_arrow(["item_id"]).column("item_id").to_pylist()
    return {"src": src, "index": str(root / "index"), "ids": sorted(ids)}


def app(index: dict[str, Any], **cfg: Any) -> Any:
    return create_app(Service(ServiceConfig(index=index["index"], **cfg)))


@pytest.fixture(scope="module")
def api(index: dict[str, Any]) -> TestClient:
    return TestClient(app(index))


def upload(api: TestClient, data: bytes, **form: Any) -> Any:
    return api.post("/v1/search", files={"file": ("q.png", data)}, data={k: str(v) for k, v in form.items()})


# -- filters ------------------------------------------------------------------------------------------
def test_a_filter_that_matches_nothing_is_an_empty_answer(api: TestClient, index: dict[str, Any]) -> None:
    data = (index["src"] / "001.png").read_bytes()
    for form in ({"label": "99"}, {"modality": "MR"}, {"filters": json.dumps({"dataset": ["nope", "none"]})}):
        r = upload(api, data, **form)
        assert r.status_code == 200 and r.json()["results"] == [], (form, r.text)
    item = quote(index["ids"][0], safe="")
    r = api.get(f"/v1/items/{item}/similar", params={"label": "99"})
    assert r.status_code == 200 and r.json()["results"] == []


BAD_FILTERS = [
    ({"tile_x": 1.5}, "tile_x", "integer column"),
    ({"tile_x": "abc"}, "tile_x", "integer column"),
    ({"tile_x": [1, "x"]}, "tile_x", "integer column"),
    ({"mpp": "NaN"}, "mpp", "finite number"),
    ({"mpp": 10**400}, "mpp", "number column"),
    ({"mpp": "inf"}, "mpp", "finite number"),
    ({"tile_y": 10**30}, "tile_y", "64-bit range"),
    ({"label": ["x"] * 1001}, "label", "1 to 1000 values"),
]


@pytest.mark.parametrize(("filters", "column", "says"), BAD_FILTERS)
def test_filter_values_are_checked_against_the_column_type(api: TestClient, index, filters, column, says) -> None:
    r = upload(api, (index["src"] / "001.png").read_bytes(), filters=json.dumps(filters))
    assert r.status_code == 400, r.text
    assert column in r.json()["detail"] and says in r.json()["detail"]


def test_malformed_filter_json_is_a_400(api: TestClient, index: dict[str, Any]) -> None:
    data = (index["src"] / "001.png").read_bytes()
    for text in ("[" * 100_000, '{"mpp": NaN}', '{"label": "\\ud800"}', '{"label": {"$ne": 1}}', "null"):
        r = upload(api, data, filters=text)
        assert r.status_code == 400, (text[:30], r.status_code, r.text[:200])


def test_three_hundred_random_filter_objects_never_give_a_5xx(api: TestClient, index: dict[str, Any]) -> None:
    rng = random.Random(7)
    columns = ["modality", "dataset", "label", "tile_x", "tile_y", "mpp", "slide_id", "series_uid", "nope"]
    values: list[Any] = ["0", "1", "CR", "MR", "set0", 3, -1, 0.5, 1e308, "nan", "", "'; DROP TABLE codes; --", True]
    item = quote(index["ids"][3], safe="")
    data = (index["src"] / "002.png").read_bytes()
    codes = []
    for n in range(300):
        f = {rng.choice(columns): rng.choice([rng.choice(values), rng.sample(values, rng.randint(1, 3))])}
        text = json.dumps(f)
        r = api.get(f"/v1/items/{item}/similar", params={"filters": text}) if n % 2 else upload(api, data, filters=text)
        codes.append(r.status_code)
        assert r.status_code < 500, (f, r.text[:300])
    assert codes.count(200) > 20 and codes.count(400) > 20  # both kinds of answer were reached


# -- the ASGI guard -----------------------------------------------------------------------------------
def asgi(
    application: Any, body_chunks: list[bytes], *, headers: dict[str, str], delay: float = 0.0, root: str = ""
) -> dict:
    """Drive one POST /v1/search (under ``root``, as Serve's route_prefix) through the ASGI app; records how
    much of the body was pulled."""
    pulled = {"n": 0}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        i = pulled["n"]
        pulled["n"] += 1
        if delay:
            await asyncio.sleep(delay)
        if i < len(body_chunks):
            return {"type": "http.request", "body": body_chunks[i], "more_body": True}
        await asyncio.sleep(3600)  # then the client stalls, its body unfinished
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": f"{root}/v1/search",
        "raw_path": f"{root}/v1/search".encode(),
        "root_path": root,
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(asyncio.wait_for(application(scope, receive, send), 30))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {"status": start["status"], "body": json.loads(body or b"{}"), "pulled": pulled["n"]}


MULTIPART = {"content-type": "multipart/form-data; boundary=xx"}


def test_a_request_without_the_token_is_refused_before_its_body_is_read(index: dict[str, Any]) -> None:
    secured = app(index, token="s3cret")
    out = asgi(secured, [b"--xx\r\n" * 100] * 1000, headers={**MULTIPART, "content-length": "600000"})
    assert out["status"] == 401 and out["pulled"] == 0
    out = asgi(secured, [b"x"], headers={**MULTIPART, "authorization": "Bearer wrong"})
    assert out["status"] == 401 and out["pulled"] == 0
    out = asgi(secured, [b"--xx\r\n"] * 10, headers={**MULTIPART, "content-length": "60"}, root="/medret")
    assert out["status"] == 401 and out["pulled"] == 0  # under a Serve route_prefix too


def test_only_the_page_its_script_health_metrics_and_spec_are_public(index: dict[str, Any]) -> None:
    secured = TestClient(app(index, token="s3cret"))
    for path in ("/", "/static/sketch.js", "/healthz", "/metrics", "/openapi.json", "/docs"):
        assert secured.get(path).status_code == 200, path
    for path in ("/v1/tables", "/v1/templates", "/v1/nope", "/v2/search", "/admin", "//v1/tables", "/V1/tables"):
        assert secured.get(path).status_code == 401, path
    assert secured.get("/v1/tables", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_chunked_body_over_the_limit_is_a_413(index: dict[str, Any]) -> None:
    small = app(index, max_upload_bytes=100_000)
    head = b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    out = asgi(small, [head] + [b"a" * 60_000] * 10, headers=MULTIPART)  # no content-length: chunked
    assert out["status"] == 413 and "upload limit" in out["body"]["detail"]
    assert out["pulled"] <= 5  # refused as soon as it passed the limit


def test_stalled_and_slow_bodies_get_a_408(index: dict[str, Any]) -> None:
    # each case gets a wide margin on the other deadline, so a loaded machine cannot trip it first
    stall = app(index, body_idle_s=0.3, body_grace_s=60, min_body_rate=10_000)
    out = asgi(stall, [b"--xx\r\n"], headers={**MULTIPART, "content-length": "5000"})
    assert out["status"] == 408 and "no request body data" in out["body"]["detail"]
    slow = app(index, body_idle_s=10, body_grace_s=0.2, min_body_rate=10_000)
    out = asgi(slow, [b"--xx\r\n"] * 20, headers={**MULTIPART, "content-length": "5000"}, delay=0.1)
    assert out["status"] == 408 and "slower than 10000 bytes/s" in out["body"]["detail"]


def test_no_host_is_echoed_and_hosts_can_be_pinned(api: TestClient, index: dict[str, Any]) -> None:
    r = api.get("/v1/tables/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 404 and "evil.example" not in r.headers.get("location", "")
    pinned = TestClient(app(index, allowed_hosts=("medret.hospital.org",)), base_url="http://medret.hospital.org")
    assert pinned.get("/healthz").status_code == 200
    assert pinned.get("/healthz", headers={"Host": "evil.example"}).status_code == 400


def test_health_says_whether_the_index_answers_and_shows_no_uri(api: TestClient, index, tmp_path: Path) -> None:
    r = api.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "auth": False}
    from medret.config import S3Config
    from medret.storage.s3local import free_port

    dead = S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}", access_key_id="k", secret_access_key="s")
    down = TestClient(create_app(Service(ServiceConfig(index="s3://gone/index", s3=dead))))
    r = down.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "unavailable" and "gone" not in r.text


def test_a_huge_tile_mpp_is_refused_before_upscaling(api: TestClient) -> None:
    r = upload(api, hostile.small_png()[1], kind="tile", mpp=100)
    assert r.status_code == 413 and "mpp 100" in r.json()["detail"]


def test_the_spec_documents_every_error_with_the_body_it_has(api: TestClient) -> None:
    spec = api.get("/openapi.json").json()
    problem = spec["components"]["schemas"]["Problem"]
    assert set(problem["properties"]) == {"detail"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if not path.startswith("/v1"):
                continue
            for code in ("400", "401", "404", "413", "422", "503"):
                assert code in op["responses"], (method, path, code)
                ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/Problem"), (method, path, code)
    # medret's own 422 (a file it cannot read) and FastAPI's (a missing field) both fit Problem
    bad = api.post("/v1/search", files={"file": ("x.png", b"\x89PNG\r\n\x1a\nnope")})
    missing = api.post("/v1/search", data={"k": "1"})
    assert bad.status_code == missing.status_code == 422
    assert isinstance(bad.json()["detail"], str) and isinstance(missing.json()["detail"], list)


def test_the_token_never_travels_in_the_deployments_arguments() -> None:
    from medret.serve.deployment import app_builder, build
    from medret.serve.secrets import without_secrets

    cfg = ServiceConfig(token="s3cret", s3={"access_key_id": "AK", "secret_access_key": "SK"})
    text = without_secrets(cfg)
    assert "s3cret" not in text and "SK" not in text and "AK" not in text
    assert "s3cret" not in str(build(cfg))
    from medret.errors import ConfigError

    with pytest.raises(ConfigError, match="must not hold the token"):
        app_builder({"token": "x"})
    with pytest.raises(ConfigError, match="must not hold secrets .secret_access_key"):
        app_builder({"s3": {"secret_access_key": "SK"}, "allow_anonymous": True})
    with pytest.raises(ConfigError, match="must not hold secrets .dicomweb.password"):
        app_builder({"dicomweb": {"user": "u", "password": "pw"}, "allow_anonymous": True})
    with pytest.raises(ConfigError, match="must not hold secrets"):
        app_builder({"s3": "not a mapping", "dicomweb": {"token": "t"}, "allow_anonymous": True})
    import os

    saved = {k: os.environ.pop(k) for k in ("MEDRET_TOKEN", "MEDRET_TOKEN_FILE") if k in os.environ}
    try:
        with pytest.raises(ConfigError, match="refusing to serve a Serve application without a bearer token"):
            app_builder({"index": "x"})
        assert app_builder({"index": "x", "allow_anonymous": True}) is not None
    finally:
        os.environ.update(saved)


def test_a_replica_that_finds_no_token_refuses_to_serve_anonymously(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built with a token, a replica whose environment lacks it (one node missing the secret) fails to start."""
    from medret.errors import ConfigError
    from medret.serve.deployment import build, replica_config

    monkeypatch.delenv("MEDRET_TOKEN_FILE", raising=False)
    monkeypatch.setenv("MEDRET_TOKEN", "s3cret")
    (config_json,) = build(ServiceConfig(index="x"))._bound_deployment.init_args
    assert json.loads(config_json)["auth_required"] is True and "s3cret" not in config_json
    monkeypatch.delenv("MEDRET_TOKEN")
    with pytest.raises(ConfigError, match="finds no bearer token"):
        replica_config(config_json)
    monkeypatch.setenv("MEDRET_TOKEN", "s3cret")
    assert replica_config(config_json).token == "s3cret"


def test_secrets_come_from_the_environment_and_files(tmp_path: Path) -> None:
    from medret.serve.secrets import resolve, write_secrets_file

    assert resolve(ServiceConfig(), {"MEDRET_TOKEN": "t1"}).token == "t1"
    f = tmp_path / "token"
    f.write_text("t2\n")
    assert resolve(ServiceConfig(), {"MEDRET_TOKEN_FILE": str(f)}).token == "t2"
    assert resolve(ServiceConfig(token_file=str(f)), {}).token == "t2"
    assert resolve(ServiceConfig(token_file=str(f)), {"MEDRET_TOKEN": "inherited"}).token == "t2"
    cfg, path = write_secrets_file(ServiceConfig(token="t3", s3={"secret_access_key": "SK", "access_key_id": "AK"}))
    assert path is not None and oct(path.stat().st_mode & 0o777) == "0o600"
    bare = ServiceConfig.model_validate_json(cfg.model_dump_json())  # what a replica gets: no secrets
    assert bare.token is None and bare.secrets_file == str(path)
    again = resolve(
        bare.model_copy(update={"s3": bare.s3.model_copy(update={"secret_access_key": None, "access_key_id": None})}),
        {},
    )
    assert again.token == "t3" and again.s3.secret_access_key == "SK"
    path.unlink()


def test_the_cli_refuses_a_token_on_its_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from medret.cli.main import main

    assert main(["serve", "--index", "x", "--token", "s3cret"]) == 1
    assert "process list" in capsys.readouterr().err
    assert main(["serve", "--index", "x", "--host", "0.0.0.0"]) == 1
    assert "without a bearer token" in capsys.readouterr().err
    assert np.__name__  # keep numpy import used where tests grow
