"""The command line as users run it: a real subprocess each time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3

MEDRET = [sys.executable, "-m", "medret.cli.main"]
REPO = Path(__file__).resolve().parents[2]


def run(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MEDRET, *args], capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload,no-any-return]


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys; from medret.cli.main import build_parser; build_parser().format_help(); "
        "heavy = [m for m in ('ray', 'torch', 'lancedb', 'numba', 'boto3', 'pyarrow') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    for args in ([], ["demo"], ["dev", "s3"]):
        res = run(*args, "--help")
        assert res.returncode == 0 and "usage: medret" in res.stdout


def test_bad_config_value_is_a_clear_error(tmp_path: Path) -> None:
    res = run("demo", "--train-samples", "10", "--out", str(tmp_path))
    assert res.returncode == 1
    assert "train_samples" in res.stderr and "10" in res.stderr and "greater than or equal to 64" in res.stderr
    assert "Traceback" not in res.stderr


def test_demo_refuses_a_taken_port_before_doing_anything(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run("demo", "--port", str(port), "--out", str(tmp_path / "out"))
    assert res.returncode == 1
    assert f"--port {port}: 127.0.0.1:{port} is not free" in res.stderr and "pass --port N" in res.stderr
    assert not (tmp_path / "out" / "s3").exists()  # no S3 server was started


def job(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), *args], capture_output=True, text=True, timeout=300
    )


def test_medmnist_index_job_indexes_and_evaluates(tmp_path: Path, data_dir: Path) -> None:
    out, index = tmp_path / "out", tmp_path / "index"
    res = job("medmnist_index.py", f"out={out}", f"index.uri={index}")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["encoder"]["method"] == "default" and summary["encoder"]["bits"] == 48
    assert summary["index"]["rows"] == 13246
    assert summary["counts"] == {"train": 39737, "val": 6623, "gallery": 13246, "query": 6634}
    micro = summary["metrics"]["micro"]
    assert micro["mAP@100"] > 0.9 and set(summary["metrics"]["per_organ"]) == {"breast", "retina", "chest", "abdomen"}
    assert len(summary["samples"]) == 4 and len(summary["samples"][0]["hits"]) == 10
    assert (out / "config.resolved.yaml").is_file() and (out / "medmnist_index.json").is_file()
    # a length the shipped encoder does not make is refused with the remedy
    res = job("medmnist_index.py", "bits=32", f"out={out}", f"index.uri={index}")
    assert res.returncode == 1 and "makes 48-bit codes; use encoder 'pca-itq'" in res.stderr
    assert "Traceback" not in res.stderr
    res = job("medmnist_index.py", "bits=50", f"out={out}")
    assert res.returncode == 1 and "multiple of 8" in res.stderr and "Traceback" not in res.stderr
    # the training-free baseline at another length (also the job entrypoint's check)
    res = job("medmnist_index.py", "encoder=pca-itq", "bits=16", f"out={out}", f"index.uri={index}")
    assert res.returncode == 0, res.stderr
    baseline = json.loads(res.stdout)
    assert baseline["encoder"]["bits"] == 16 and baseline["index"]["rows"] == 13246  # the table rebuilt, not added to


def test_dev_s3_serves_until_interrupted(tmp_path: Path) -> None:
    from medret.storage.s3local import free_port

    port = free_port()
    proc = subprocess.Popen(
        [*MEDRET, "dev", "s3", "--dir", str(tmp_path / "s3"), "--port", str(port), "--bucket", "scans"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        # as when started in the background by a non-interactive shell: SIGINT inherited ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert f"127.0.0.1:{port}" in line
        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id="medret",
            aws_secret_access_key="medret-secret",
            region_name="us-east-1",
        )
        s3.put_object(Bucket="scans", Key="a.dcm", Body=b"x")
        assert [o["Key"] for o in s3.list_objects_v2(Bucket="scans")["Contents"]] == ["a.dcm"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    time.sleep(0.5)
    assert proc.returncode in (0, 130)
    # the server went with it
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert os.path.isdir(tmp_path / "s3")


def test_index_route_reads_a_folder_of_slices_as_one_series(tmp_path: Path, data_dir: Path) -> None:
    from medret.io.volume import dicom_series, read_nifti
    from medret.preprocess.mri.recipe import MRIRecipeConfig

    study = tmp_path / "src" / "studies" / "s1"
    study.mkdir(parents=True)
    for name, blob in dicom_series(read_nifti(data_dir / "mri" / "brainles__TCGA-FG-6692_t2.nii.gz"), seed=1):
        (study / name).write_bytes(blob)
    base = ["index", "--source", str(tmp_path / "src"), "--index", str(tmp_path / "index"), "--out", str(tmp_path)]
    res = run(*base, "--route", "studies/*/*.dcm=dicom-series", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert (summary["objects_seen"], summary["indexed"]) == (1, 1)
    assert summary["items_written"] == len(MRIRecipeConfig().levels)
    for bad, words in (("studies/*.dcm", "PATTERN=KIND"), ("*.dcm=volume", "routes.0.kind")):
        res = run(*base, "--route", bad)
        assert res.returncode == 1 and words in res.stderr and "Traceback" not in res.stderr, res.stderr
