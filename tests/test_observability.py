from __future__ import annotations

from pathlib import Path

import numpy as np
from prometheus_client import REGISTRY, generate_latest

from medret.index import CodeIndex
from medret.models.encoder import EncoderConfig


def _value(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_index_and_search_metrics_move(tmp_path: Path) -> None:
    index = CodeIndex.create(str(tmp_path), EncoderConfig(name="m", bits=16), table="metrics")
    searches = _value("medret_search_seconds_count", {"path": "exact"})
    written = _value("medret_index_rows_written_total", {"table": "metrics"})
    index.upsert(index.rows(["a", "b", "c"], np.zeros((3, 2), np.uint8), source_uri=["u"] * 3))
    index.search(np.zeros((1, 2), np.uint8), 2)
    assert _value("medret_index_rows_written_total", {"table": "metrics"}) == written + 3
    assert _value("medret_search_seconds_count", {"path": "exact"}) == searches + 1
    assert _value("medret_index_rows", {"table": "metrics"}) == 3
    assert b"# TYPE medret_search_seconds histogram" in generate_latest(REGISTRY)
