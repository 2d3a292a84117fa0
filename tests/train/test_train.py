"""Every method trains through Ray Train with 2 CPU workers on a 2-CPU Ray, and resumes.

Training runs on two small MedMNIST files given as a user's own data (breast and retina),
so this also covers ``--data x.npz``: each file becomes an organ.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medret.errors import ConfigError
from medret.methods import METHODS
from medret.models.encoder import load_encoder
from medret.train.config import TrainConfig
from medret.train.trainer import fit

pytestmark = pytest.mark.slow


def small_data(data_dir: Path) -> list[str]:
    return [str(data_dir / "medmnist" / f) for f in ("breastmnist.npz", "retinamnist.npz")]


def config(data_dir: Path, tmp_path: Path, method: str, epochs: int, **kw: object) -> TrainConfig:
    return TrainConfig(
        method=method,
        bits=16,
        data=small_data(data_dir),
        epochs=epochs,
        batch_size=64,
        max_steps=8,
        samples_per_epoch=512,
        num_workers=2,
        val_queries=100,
        name=f"{method}-test",
        storage_path=str(tmp_path / "runs"),
        **kw,  # type: ignore[arg-type]
    )


def check_trained(report: Any, data_dir: Path, tmp_path: Path, method: str, epochs: int) -> None:
    assert [h["epoch"] for h in report.history] == list(range(epochs))
    # the loss on a fixed validation batch (a mining method's training loss is not comparable across epochs)
    losses = [h["val_loss"] for h in report.history]
    assert losses[-1] < losses[0], losses
    encoder = load_encoder(report.encoder_path)
    assert encoder.config.method == method and encoder.config.bits == 16
    assert encoder.config.extra["organs"] == ["breastmnist", "retinamnist"]
    assert encoder.config.extra["provenance"]["data"] == config(data_dir, tmp_path, method, 1).data
    assert encoder.config.channels == 3  # RetinaMNIST is RGB: a user's colour file trains in colour
    codes = encoder.encode(np.zeros((3, 28, 28, 3), np.uint8))
    assert codes.shape == (3, 2) and codes.dtype == np.uint8


# ``default`` trains in the resume test below (one Ray Train run fewer: each costs ~40 s here)
@pytest.mark.parametrize("method", [m for m in METHODS.names() if m != "default"])
def test_every_method_trains_on_two_workers(method: str, ray_local: None, data_dir: Path, tmp_path: Path) -> None:
    check_trained(fit(config(data_dir, tmp_path, method, epochs=3)), data_dir, tmp_path, method, 3)


@pytest.mark.s3
def test_the_default_trains_and_a_second_run_resumes_from_its_checkpoint_on_s3(
    ray_local: None, data_dir: Path, tmp_path: Path, s3_config: object, s3_bucket: str
) -> None:
    """Checkpoints go to the session's S3 server and the second run resumes from there (one pair of
    Ray Train runs for both: each run costs ~40 s here)."""
    from medret.config import S3Config
    from medret.storage.objects import open_store

    assert isinstance(s3_config, S3Config)
    kw = {"storage_path": f"s3://{s3_bucket}/runs", "s3": s3_config, "output": str(tmp_path / "out")}
    cfg = config(data_dir, tmp_path, "default", epochs=3).model_copy(update=kw)
    first = fit(cfg)
    check_trained(first, data_dir, tmp_path, "default", 3)
    assert all(h["start_epoch"] == 0 for h in first.history)
    keys = [o.key for o in open_store(f"s3://{s3_bucket}/runs", s3_config).list()]
    assert any(k.endswith("/encoder.npz") for k in keys) and any(k.endswith("/state.pt") for k in keys), keys
    # same name and storage: Ray Train hands the workers the latest checkpoint
    second = fit(cfg.model_copy(update={"epochs": 4}))
    assert [h["epoch"] for h in second.history] == [0, 1, 2, 3]
    assert [h["start_epoch"] for h in second.history[3:]] == [3]
    assert second.history[:3] == first.history  # history carried over, not retrained
    assert (tmp_path / "out" / "encoder.npz").is_file()


def test_refit_trains_the_epochs_chosen_on_val_again_on_train_and_val(
    ray_local: None, data_dir: Path, tmp_path: Path
) -> None:
    from medret.train.feeds import MemoryFeed

    cfg = config(data_dir, tmp_path, "dnhn", epochs=2, refit=True)
    plain, refit = MemoryFeed(cfg), MemoryFeed(cfg, with_val=True)
    assert refit.n_train == plain.n_train + len(plain.split["val"])
    report = fit(cfg)
    assert report.refit is not None
    chosen = report.refit["chosen_on_val"]["best_epoch"]
    assert report.refit["epochs"] == chosen + 1
    assert [h["epoch"] for h in report.history] == list(range(chosen + 1))  # the refit run stops there
    run = tmp_path / "runs" / "dnhn-test"
    assert len(json.loads((run / "history.json").read_text())) == 2
    provenance = load_encoder(run / "encoder.npz").config.extra["provenance"]
    assert provenance["metrics"] == {"refit_epochs": chosen + 1, "trained_on": "train+val"}
    summary = json.loads((run / "train.json").read_text())
    assert summary["refit"]["epochs"] == chosen + 1
    assert summary["val_map100"] == report.refit["chosen_on_val"]["val_map100"]  # not the refit's own, on seen data
    with pytest.raises(ConfigError, match="trains without labels"):
        fit(config(data_dir, tmp_path, "selfsup", epochs=1, refit=True))


def test_requests_larger_than_the_cluster_fail_fast(ray_local: None, data_dir: Path, tmp_path: Path) -> None:
    cfg = config(data_dir, tmp_path, "dnhn", epochs=1, cpus_per_worker=1.5)
    with pytest.raises(ConfigError, match="needs 3 CPUs but the cluster has 2"):
        fit(cfg)


def test_unknown_method_and_hyperparameter_are_named(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown training method 'dsh'; known: clshash, default, dml, dnhn"):
        TrainConfig(method="dsh")
    with pytest.raises(ValueError, match=r"nope.npz: no such file \(give MedMNIST-layout .npz files or 'medmnist-4'\)"):
        TrainConfig(data=[str(tmp_path / "nope.npz")])
    from medret.methods.base import TaskInfo

    cls = METHODS.get("dnhn")
    with pytest.raises(ValueError, match=r"no hyperparameter\(s\) \['alpha3'\]; known: alpha1, alpha2, beta"):
        cls(TaskInfo(bits=16, n_classes=4, n_organs=2), "lenet5", {}, {"alpha3": 1})


def registered_checkpoints(run_dir: Path) -> int:
    """The checkpoints Ray Train has recorded in the run's snapshot: those a rerun is handed (a checkpoint
    folder can be in storage before it is recorded there)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or read mid-write
        return 0
    return len(snapshot.get("checkpoint_results") or [])


def test_killed_run_resumes_from_its_last_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    """``medret train`` killed with SIGKILL after its first checkpoint; the same command resumes."""
    storage = tmp_path / "runs"
    cmd = [
        sys.executable, "-m", "medret.cli.main", "train", "--method", "dnhn", "--bits", "16",
        "--data", *small_data(data_dir), "--epochs", "40", "--batch-size", "32", "--num-workers", "2",
        "--name", "killed", "--storage", str(storage), "--set", "max_steps=60", "--set", "samples_per_epoch=1920",
        "--set", "val_queries=50", "--json",
    ]  # fmt: skip
    # epochs of about a second: Ray rewrites its checkpoint snapshot in place (not atomically) at each
    # checkpoint, and a kill that lands in that rewrite costs the resume; with 0.1 s epochs (a faster
    # machine) the kill, at most 0.2 s after a registration, hit the next rewrite
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    run_dir = storage / "killed"
    seen = 0
    while time.monotonic() < deadline and not seen:
        seen = registered_checkpoints(run_dir)
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert seen, "no checkpoint registered before the deadline"
    done = len(list(run_dir.glob("checkpoint_*/meta.json")))
    cmd[cmd.index("40")] = str(done + 1)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{") :])
    history = result["history"]
    assert len(history) == done + 1
    assert history[-1]["start_epoch"] >= 1  # resumed from a checkpoint of the killed run, not restarted


def test_init_from_an_encoder_of_another_shape_is_refused_before_workers_start() -> None:
    from medret.errors import ConfigError
    from medret.train.config import TrainConfig
    from medret.train.trainer import check_init

    check_init(TrainConfig(init="default"))  # the shipped default: method default, 48 bits, resnet
    with pytest.raises(ConfigError, match=r"init 'default' .* is \{'method': 'default', 'bits': 48.*this run trains"):
        check_init(TrainConfig(init="default", bits=32))
    with pytest.raises(ConfigError, match="'method': 'dnhn'"):
        check_init(TrainConfig(init="default", method="dnhn"))
    with pytest.raises(ConfigError, match="'dihedral': False}, but this run trains .*'dihedral': True"):
        check_init(TrainConfig(init="default", arch={"dihedral": True}))
    with pytest.raises(ConfigError, match="neither a file"):
        check_init(TrainConfig(init="/nonexistent/encoder.npz"))
