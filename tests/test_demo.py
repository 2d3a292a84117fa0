"""``medret demo`` as a newcomer runs it: a real subprocess that starts S3, trains, backfills, serves,
evaluates and then waits; the test uses the page and API it leaves running, then stops it with Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medret.demo import first_per_organ, post_search
from medret.eval.benchmarks import medmnist4
from medret.storage.s3local import free_port

PER_ORGAN = 60


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_demo_runs_everything_serves_the_page_and_stops_cleanly_on_ctrl_c(tmp_path: Path, data_dir: Path) -> None:
    port = free_port()
    out = tmp_path / "out"
    err = (tmp_path / "stderr.log").open("w")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "medret.cli.main", "demo", "--json"),
            *("--gallery-per-organ", str(PER_ORGAN), "--train-samples", "256", "--export-samples", "2000"),
            *("--port", str(port), "--out", str(out)),
        ],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env={**os.environ, "MEDRET_DATA": str(data_dir)},
        start_new_session=True,
    )
    try:
        log = tmp_path / "stderr.log"
        deadline = time.monotonic() + 900  # a hang guard, not a timing: the suite shares the 2 cores
        while "Ctrl-C stops it" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        text = log.read_text()
        for stage in (
            "starting a SeaweedFS S3 server",
            "uploading the archive",
            "training:",
            "backfill:",
            "query service up",
            "evaluating strict mAP@k",
            "web page: http://127.0.0.1:",
        ):
            assert stage in text, stage
        url = f"http://127.0.0.1:{port}/"
        # the page and the API are up while the demo waits
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        gallery = first_per_organ(medmnist4(data_dir / "medmnist"), "gallery", PER_ORGAN)["gallery"]
        i = int(np.where(gallery.organ == 2)[0][5])  # a chest image that went into the archive
        buf = io.BytesIO()
        Image.fromarray(gallery.images[i]).save(buf, format="PNG")
        answer = post_search(url, "x.png", buf.getvalue(), k=100, table="demo")
        zero = [h["source_uri"] for h in answer["results"] if h["distance"] == 0]
        assert f"s3://medret-demo/archive/medmnist/chest/{i:05d}.png" in zero
        with urllib.request.urlopen(url + "metrics", timeout=30) as r:
            assert b'medret_query_requests_total{code="200",route="/v1/search"}' in r.read()
        s3_port = int(text.split("S3 server on http://127.0.0.1:")[1].split()[0])
        assert port_open(s3_port)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches the whole group
        stdout, _ = proc.communicate(timeout=120)
        err.close()
    text = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "interrupted: shutting down" in text and "stopped cleanly" in text
    assert not port_open(port) and not port_open(s3_port)
    summary = json.loads(stdout)
    m = summary["metrics"]
    assert m["queries"] == 6634 and m["index_codes_equal_direct_encoding"] == f"{4 * PER_ORGAN}/{4 * PER_ORGAN}"
    assert set(m["per_organ"]) == {"breast", "retina", "chest", "abdomen"}
    assert m["micro"]["mAP@10"] > 0.9  # the shipped default scores 0.966 on this 240-image gallery
    assert summary["archive"]["png"] == 4 * PER_ORGAN and summary["archive"]["dicom"] >= 4
    assert summary["archive"]["slide"] == 1 and summary["archive"]["mri"] >= 4
    assert summary["backfill"]["quarantined"] == 0 and summary["backfill"]["tiles"] > 0
    assert summary["encoder"].endswith("encoder.npz")  # indexed with the encoder it trained, not the shipped one
    assert len(summary["samples"]) == 5 and all(s["results"] for s in summary["samples"])
    assert (out / "demo.json").is_file() and (out / "config.resolved.yaml").is_file()
    assert "export_samples: 2000" in (out / "train" / "config.resolved.yaml").read_text()  # reached the trainer
