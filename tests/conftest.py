"""Shared fixtures: the real data folder, a real S3 server (SeaweedFS) on loopback."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from medret.config import S3Config, data_root
from medret.storage.s3 import S3Store
from medret.storage.s3local import SeaweedS3
from medret.storage.uri import parse_uri

_bucket_ids = itertools.count()

# Ray Train's controller polls its workers every 2 s, so each run's end waits up to a poll (or two: a report,
# then the finish). The tests' runs train for seconds: poll every 0.5 s (a late answer is not a failure; the
# workers' health-check timeout stays 10 min). Set before any Ray starts, so the CLI subprocesses inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if not (root / "MANIFEST.tsv").is_file():
        pytest.fail(f"test data not found at {root}; put ../shared/data beside the repo or set MEDRET_DATA")
    return root


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"), access_key="medret-test", secret_key="s3cr3t-test")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_config(s3_server: SeaweedS3) -> S3Config:
    return s3_server.config()


@pytest.fixture
def s3_bucket(s3_config: S3Config) -> str:
    """A fresh, empty bucket for one test."""
    name = f"t{os.getpid()}-{next(_bucket_ids)}"
    S3Store(parse_uri(f"s3://{name}"), s3_config).ensure_bucket()
    return name


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the session, sized like the CI machine (2 CPUs); or the one an earlier test in this
    process already started (an in-process ``fit`` starts its own when none is running)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2)
    yield
    ray.shutdown()


#: the longest test modules (minutes each: real Ray jobs, kills and reruns, the demo), run first so that
#: pytest-xdist's two workers (``-n 2 --dist loadfile`` in pyproject.toml) finish together
SLOW_FIRST = (
    "train/test_train.py",
    "pipelines/test_ingest.py",
    "storage/test_storage_faults.py",
    "test_demo.py",
    "slides/test_slide_table.py",
    "train/test_archive.py",
    "serve/test_serve.py",
    "pipelines/test_jobs.py",
    "cli/test_cli.py",
    "storage/test_dicomweb.py",
)


def _slow_rank(item: pytest.Item) -> int:
    path, tests = Path(str(item.path)).resolve(), Path(__file__).resolve().parent
    rel = path.relative_to(tests).as_posix() if path.is_relative_to(tests) else ""  # doctests live in medret/
    return SLOW_FIRST.index(rel) if rel in SLOW_FIRST else len(SLOW_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slowest modules first (a stable sort: each module's own order is kept). ``gpu`` tests run only
    where CUDA is (a GPU machine: ``pytest -m gpu``); elsewhere they are skipped."""
    items.sort(key=_slow_rank)
    if not any("gpu" in item.keywords for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
