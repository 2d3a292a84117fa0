"""The Serve-config start path (``app_builder``, as ``serve deploy`` and a RayService run it), for real.

A fresh Ray in a subprocess whose environment holds ``MEDRET_TOKEN`` (as a RayService pod's
would), serving a small real index: the token from the environment is enforced; stalled
bodies without a token do not stop a query or the health probe; a stalled body with the
token is cut off; the hostile corpus is refused while the replica's memory stays bounded;
expensive MRI uploads run in their bounded pool while a PNG query goes by.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hostile
import pytest
import requests

from medret.storage.s3local import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

TOKEN = "deploy-" + os.urandom(8).hex()
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APP = "medret-hostile"
#: most the replica's resident memory may grow while refusing the hostile corpus
RSS_BOUND_MB = 400

_SERVER = r"""
import json, sys, time
import ray
from ray import serve
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2]), "request_timeout_s": 120})
from medret.serve.deployment import app_builder
serve.run(app_builder(json.loads(sys.argv[1])), name=sys.argv[3], route_prefix="/")
print("READY", flush=True)
while True:
    time.sleep(3600)
"""


def stop_group(proc: subprocess.Popen[str]) -> None:
    """End a server started in its own session, and every process it started."""
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    from test_serve_guard import index as build_index

    return dict(build_index.__wrapped__(data_dir, tmp_path_factory))  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def deployed(small_index: dict[str, Any]) -> Iterator[dict[str, Any]]:
    index = small_index
    port = free_port()
    args = {
        "index": index["index"],
        "max_ongoing_requests": 16,
        "body_idle_s": 2,
        "body_grace_s": 1,
        "heavy_workers": 1,
        "heavy_queue": 1,
        "pixel_budget": 50_000_000,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"MEDRET_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, json.dumps(args), str(port), APP],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 240
    while not any("READY" in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.5)
    try:
        yield {**index, "url": f"http://127.0.0.1:{port}/", "port": port}
    finally:
        stop_group(proc)


# -- deploy/serve.yaml as written, through Serve's controller (what `serve deploy` and KubeRay do) ------
_CONFIG_SERVER = r"""
import json, sys, time
import ray
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema
config = ServeDeploySchema.model_validate(json.loads(sys.argv[1]))
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
serve.start(http_options=json.loads(sys.argv[1])["http_options"])
client = _get_global_client()
client.deploy_apps(config)
deadline = time.monotonic() + 300
while True:
    app = serve.status().applications.get("medret")
    state = str(getattr(app, "status", ""))
    if state.endswith("RUNNING"):
        break
    if state.endswith(("DEPLOY_FAILED", "UNHEALTHY")) or time.monotonic() > deadline:
        print("FAILED", state, getattr(app, "message", ""), flush=True)
        sys.exit(1)
    time.sleep(1)
print("READY " + json.dumps(client.get_serve_details(), default=str), flush=True)
while True:
    time.sleep(3600)
"""


def test_the_serve_config_deploys_as_written_through_the_controller(small_index: dict[str, Any]) -> None:
    """deploy/serve.yaml with only the index, the address and the replicas' CPUs changed (this machine
    has 2): Serve applies its autoscaling bounds, both minimum replicas come up and answer with auth.
    (First in the module, before ``deployed`` starts another Ray.)"""

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "serve.yaml").read_text())
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    app["args"]["index"] = small_index["index"]
    (dep,) = app["deployments"]
    dep["ray_actor_options"]["num_cpus"] = 0.25
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"MEDRET_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CONFIG_SERVER, json.dumps(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(("READY ", "FAILED")):
                break
        assert lines and lines[-1].startswith("READY "), "".join(lines)[-3000:]
        details = json.loads(lines[-1][len("READY ") :])
        deployment = details["applications"]["medret"]["deployments"]["medret-query"]
        scaling = deployment["deployment_config"]["autoscaling_config"]
        assert (scaling["min_replicas"], scaling["max_replicas"]) == (2, 8)
        assert scaling["target_ongoing_requests"] == dep["autoscaling_config"]["target_ongoing_requests"]
        running = [r for r in deployment["replicas"] if str(r["state"]).endswith("RUNNING")]
        assert len(running) == 2, deployment["replicas"]
        url = f"http://127.0.0.1:{port}/"
        assert requests.get(url + "healthz", timeout=30).json() == {"status": "ok", "auth": True}
        assert requests.get(url + "v1/tables", timeout=30).status_code == 401
        r = requests.get(url + "v1/tables", headers=AUTH, timeout=30)
        assert r.status_code == 200 and r.json()[0]["rows"] == 40
    finally:
        stop_group(proc)


def test_the_token_from_the_environment_is_enforced(deployed: dict[str, Any]) -> None:
    url = deployed["url"]
    assert requests.get(url + "v1/tables", timeout=30).status_code == 401
    assert requests.get(url + "v1/tables", headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
    r = requests.get(url + "v1/tables", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()[0]["rows"] == 40
    assert requests.get(url + "healthz", timeout=30).json() == {"status": "ok", "auth": True}


def stalled(port: int, n: int, *, token: bool) -> list[socket.socket]:
    """``n`` clients that send headers and ~150 bytes of a 100 kB body, then stall."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = (
            f"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: multipart/form-data; boundary=xx\r\nContent-Length: 100000\r\n"
            + (f"Authorization: Bearer {TOKEN}\r\n" if token else "")
            + "\r\n"
        )
        s.sendall(
            head.encode() + b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + b"a" * 60
        )
        socks.append(s)
    return socks


def search(url: str, data: bytes, **form: Any) -> requests.Response:
    return requests.post(url + "v1/search", files={"file": ("q.png", data)}, data=form, headers=AUTH, timeout=60)


def test_stalled_bodies_do_not_stop_queries_or_the_health_probe(deployed: dict[str, Any]) -> None:
    url, port = deployed["url"], deployed["port"]
    png = (deployed["src"] / "001.png").read_bytes()
    socks = stalled(port, 48, token=False)  # three times max_ongoing_requests
    try:
        t0 = time.monotonic()
        assert requests.get(url + "healthz", timeout=15).status_code == 200
        r = search(url, png, k="3")
        assert r.status_code == 200 and r.json()["results"][0]["distance"] == 0
        answers = [s.recv(200) for s in socks[:5]]
        assert all(a.startswith(b"HTTP/1.1 401") for a in answers), answers
        assert time.monotonic() - t0 < 30
    finally:
        for s in socks:
            s.close()
    # with the token, a stalled body is cut off after body_idle_s instead of holding its slot
    (s,) = stalled(port, 1, token=True)
    try:
        s.settimeout(30)
        assert s.recv(200).startswith(b"HTTP/1.1 408")
    finally:
        s.close()


def replica_rss_mb() -> float:
    """Resident memory of this module's Serve replica, from /proc (the process Ray titles after it)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"ServeReplica:{APP}".encode() in (proc / "cmdline").read_bytes():
                status = (proc / "status").read_text()
                return int(status.split("VmRSS:")[1].split()[0]) / 1024
        except OSError:
            continue
    raise AssertionError("no replica process found")


def test_the_hostile_corpus_is_refused_while_the_replica_memory_stays_bounded(
    deployed: dict[str, Any], data_dir: Path
) -> None:
    url = deployed["url"]
    cases = [
        (*hostile.nifti_gzip_bomb(768), {}),  # each would cost the replica 768 MB and more unguarded
        (*hostile.deflated_dicom_bomb(768), {}),
        (*hostile.jpeg_dicom_bomb(), {}),
        (*hostile.j2k_siz_edited(data_dir / "dicom" / "pydicom-data__RG1_J2KI.dcm"), {}),
        (*hostile.many_page_tiff(), {}),
        (*hostile.small_png(), {"kind": "tile", "mpp": "100"}),
    ]
    search(url, (deployed["src"] / "002.png").read_bytes())  # warm
    base = replica_rss_mb()
    peak = base
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, replica_rss_mb())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for name, data, form in cases:
            r = requests.post(url + "v1/search", files={"file": (name, data)}, data=form, headers=AUTH, timeout=120)
            assert r.status_code == 413, (name, r.status_code, r.text[:300])
            assert name in r.json()["detail"], r.text[:300]
    finally:
        stop.set()
        sampler.join()
    print(f"\nreplica RSS {base:.0f} MB before, peak {peak:.0f} MB while refusing {len(cases)} hostile uploads")
    assert peak - base < RSS_BOUND_MB


def test_mri_uploads_run_in_their_own_bounded_pool(deployed: dict[str, Any], data_dir: Path) -> None:
    url = deployed["url"]
    mri = (data_dir / "mri" / "brainles__TCGA-FG-6692_t1.nii.gz").read_bytes()
    png = (deployed["src"] / "003.png").read_bytes()
    done: dict[str, float] = {}

    def ask(what: str) -> requests.Response:
        r = requests.post(
            url + "v1/search",
            files={
                "file": ("t1.nii.gz" if what.startswith("mri") else "q.png", mri if what.startswith("mri") else png)
            },
            headers=AUTH,
            timeout=300,
        )
        done[what] = time.monotonic()
        return r

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(ask, "mri1")
        time.sleep(1.0)  # the first volume is being registered
        second = pool.submit(ask, "mri2")
        quick = pool.submit(ask, "png")
        busy, answer, volume = second.result(), quick.result(), first.result()
    assert busy.status_code == 503 and busy.headers.get("Retry-After") and "heavy_queue=1" in busy.json()["detail"]
    assert answer.status_code == 200 and answer.json()["results"][0]["distance"] == 0
    assert volume.status_code == 200 and volume.json()["query"]["kind"] == "nifti"
    assert done["png"] < done["mri1"]  # the PNG did not wait behind the registration
