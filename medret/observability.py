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
ENCODER_LOADED = Gauge(
    "medret_query_encoder_loaded",
    "1 for each encoder this query process has loaded (at warm-up or first use).",
    ["encoder_id"],
)
INDEX_ROWS_WRITTEN = Counter("medret_index_rows_written_total", "Rows upserted into an index table.", ["table"])

# -- indexing jobs (recorded by the driver from what the stages report with each row) --
INGEST_OBJECTS = Counter(
    "medret_ingest_objects_total",
    "Source objects by outcome: seen (listed), unchanged (skipped), indexed, quarantined, deleted.",
    ["status"],
)
INGEST_ITEMS = Counter("medret_ingest_items_total", "Items (images, frames, slices, tiles) written to the index.")
INGEST_TILES = Counter("medret_ingest_tiles_total", "Whole-slide tiles encoded.")
INGEST_BYTES = Counter("medret_ingest_read_bytes_total", "Bytes read from the source (slide tiles: decoded pixels).")
INGEST_STAGE_SECONDS = Counter(
    "medret_ingest_stage_seconds_total", "Seconds spent per stage, summed over workers.", ["stage"]
)
INGEST_COMMIT_SECONDS = Histogram(
    "medret_ingest_commit_seconds",
    "Time to commit one batch of finished objects (index merge + manifest).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
INGEST_ITEMS_PER_SECOND = Gauge("medret_ingest_items_per_second", "Items written per second since the job started.")

# -- the query service -----------------------------------------------------------------
QUERY_REQUESTS = Counter("medret_query_requests_total", "HTTP requests by route and status code.", ["route", "code"])
QUERY_REQUEST_SECONDS = Histogram(
    "medret_query_request_seconds",
    "Time to answer an HTTP request, by route.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
QUERY_STAGE_SECONDS = Histogram(
    "medret_query_stage_seconds",
    "Time per query stage: decode, preprocess, encode (batch wait included), search, total.",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
QUERY_BATCH_SIZE = Histogram(
    "medret_query_encode_batch_size",
    "Queries encoded together in one model call.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
QUERY_MODEL_SECONDS = Histogram(
    "medret_query_model_seconds",
    "Time of one model call on a batch of queries (the encode stage less its wait).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
