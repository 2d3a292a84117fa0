"""Prometheus metrics shared by the jobs and the query service (one definition each)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SEARCH_SECONDS = Histogram(
    "medret_search_seconds",
    "Time to answer a batch of Hamming top-k queries against an index table.",
    ["path"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
INDEX_SIZE = Gauge("medret_index_rows", "Rows in the loaded snapshot of an index table.", ["table"])
INDEX_ROWS_WRITTEN = Counter("medret_index_rows_written_total", "Rows upserted into an index table.", ["table"])
