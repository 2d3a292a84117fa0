"""``ray job submit`` of the repo's job entrypoints to a real Ray head started here on loopback."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from medret.index.store import CodeIndex

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else "ray"


#: Ray's token authentication, on for this head: jobs are only accepted with the token
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """``ray start --head --block`` on loopback with free ports; stopping the process stops the head."""
    dashboard = free_port()
    # a short temp dir: Ray's socket paths under it must stay within AF_UNIX's 107 bytes, which
    # pytest's own temp paths (longer under pytest-xdist's per-worker folders) can exceed
    tmp = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    cmd = [
        ray_cli(),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        f"--dashboard-port={dashboard}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={free_port()}",
        # every fixed default port too: another Ray on this machine (the suite's own) holds them,
        # and a head whose job agent cannot bind refuses every job ("No available agent")
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        "--num-cpus=2",
        "--object-store-memory=300000000",
        "--disable-usage-stats",
        f"--temp-dir={tmp}",
    ]
    log = (tmp / "head.log").open("wb")
    env = {**os.environ, **AUTH}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}: {(tmp / 'head.log').read_text()[-3000:]}")
        r = subprocess.run(
            [ray_cli(), "job", "list", "--address", address], capture_output=True, text=True, timeout=60, env=env
        )
        if r.returncode == 0:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the Ray head's job server never answered: {r.stderr[-2000:]}")
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(tmp, ignore_errors=True)


def submit(address: str, *entrypoint: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``ray job submit``; while the head's job agent is still registering, the server refuses
    the job (creating nothing) and says to try again: do that, for up to two minutes."""
    env = {**os.environ, **AUTH, "RAY_ADDRESS": address}
    deadline = time.monotonic() + 120
    while True:
        r = subprocess.run(
            [ray_cli(), "job", "submit", "--address", address, "--", *entrypoint],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if r.returncode == 0 or "No available agent" not in r.stderr or time.monotonic() > deadline:
            return r
        time.sleep(2)


def last_json(text: str) -> dict[str, object]:
    start = text.rfind("\n{")
    end = text.rfind("}")
    return dict(json.loads(text[start + 1 : end + 1]))


@pytest.mark.slow
def test_backfill_and_incremental_jobs_run_through_ray_job_submit(
    ray_head: str, tmp_path: Path, data_dir: Path
) -> None:
    src = tmp_path / "src"
    (src / "cxr").mkdir(parents=True)
    for p in sorted((data_dir / "cxr").glob("*.png"))[:4]:
        shutil.copy(p, src / "cxr" / p.name)
    shutil.copy(data_dir / "dicom" / "dcmfx__fo-dicom__CR-MONO1-10-chest.dcm", src / "cr.dcm")
    (src / "broken.dcm").write_bytes(b"\x00" * 200)
    index = tmp_path / "index"
    args = [f"source={src}", f"index.uri={index}", f"out={tmp_path / 'out'}", "progress=false"]

    r = submit(ray_head, sys.executable, str(REPO / "jobs" / "backfill.py"), *args)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "succeeded" in r.stdout + r.stderr
    summary = last_json(r.stdout)
    assert (summary["indexed"], summary["quarantined"], summary["items_written"]) == (5, 1, 5)
    assert CodeIndex.open(str(index)).count() == 5

    (src / "cxr" / sorted(os.listdir(src / "cxr"))[0]).unlink()
    r = submit(ray_head, sys.executable, str(REPO / "jobs" / "incremental.py"), *args)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    summary = last_json(r.stdout)
    assert (summary["indexed"], summary["deleted"], summary["unchanged"]) == (0, 1, 5)
    assert CodeIndex.open(str(index)).count() == 4


@pytest.mark.slow
def test_train_job_runs_through_ray_job_submit(ray_head: str, tmp_path: Path) -> None:
    """jobs/train.py fine-tunes the shipped default briefly on the head and exports a loadable encoder."""
    from medret.models.encoder import load_encoder

    args = [
        "method=default",
        "init=default",
        "epochs=1",
        "samples_per_epoch=512",
        "batch_size=128",
        "num_workers=1",
        "val_queries=200",
        "name=job-test",
        f"storage_path={tmp_path / 'runs'}",
        f"output={tmp_path / 'out'}",
    ]
    r = submit(ray_head, sys.executable, str(REPO / "jobs" / "train.py"), *args)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "succeeded" in r.stdout + r.stderr
    summary = last_json(r.stdout)
    encoder = load_encoder(Path(str(summary["encoder"])))
    assert encoder.config.method == "default" and encoder.config.bits == 48
    assert len(summary["history"]) == 1  # type: ignore[arg-type]
    # fine-tuned from the shipped weights for 4 steps: already far above chance on validation
    assert summary["history"][0]["val_map100"] > 0.5  # type: ignore[index]
    assert (tmp_path / "runs" / "job-test").is_dir()  # Ray Train's checkpoints, resumable by name


def test_train_job_refuses_a_bad_override(ray_head: str, tmp_path: Path) -> None:
    r = submit(ray_head, sys.executable, str(REPO / "jobs" / "train.py"), "bits=50", f"output={tmp_path}")
    assert r.returncode != 0
    assert "bits" in r.stdout + r.stderr and "multiple of 8" in r.stdout + r.stderr
