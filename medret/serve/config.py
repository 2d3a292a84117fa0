"""What the query service (and ``medret search``) is configured with: :class:`ServiceConfig`.

Kept apart from the engine so that the guard, the secrets and the CLI can read a config
without importing the model and table code.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from medret.config import DicomWebConfig, Frozen, S3Config

#: what a table name may be; anything else a request names is no table
TABLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


class ServiceConfig(Frozen):
    """How the query service (and ``medret search``) reaches the index and what it accepts."""

    index: str = Field(default="medret-out/index", description="index URI: local folder or s3://bucket/prefix")
    table: str | None = Field(
        default=None,
        description="default table (else the only or first one); an upload named no table is answered from a "
        "table that serves its kind, this one when it does",
    )
    s3: S3Config = S3Config()
    dicomweb: DicomWebConfig = Field(
        default=DicomWebConfig(), description="how to read items back from a DICOMweb source (credentials: env)"
    )
    checkpoint: str | None = Field(
        default=None, description="encoder checkpoint to use when the one the table names is not reachable here"
    )
    roots: tuple[str, ...] = Field(
        default=(),
        description="source prefixes thumbnails may be read from (default: the sources the indexing jobs recorded)",
    )
    refresh_s: float = Field(default=5.0, ge=0, description="how often to look for a newer table version")
    ivf_min_rows: int | None = Field(
        default=None,
        ge=1,
        description="search tables at least this large through their IVF index (CodeIndex.create_ivf), if any",
    )
    ivf_nprobes: int = Field(default=20, ge=1, description="IVF partitions probed per query")
    mih_min_rows: int | None = Field(
        default=100_000,
        ge=1,
        description="build an exact multi-index (hashing) for tables at least this large and answer through it "
        "where it measures faster than the scan (results are identical); null: always scan",
    )
    token: str | None = Field(
        default=None,
        repr=False,
        exclude=True,
        description="bearer token; auth is on when set. Give it as MEDRET_TOKEN or token_file, never as an "
        "argument: it is never serialised (replicas read it from their environment or the file)",
    )
    token_file: str | None = Field(
        default=None, description="file holding the bearer token (a Kubernetes secret mount); also MEDRET_TOKEN_FILE"
    )
    secrets_file: str | None = Field(
        default=None,
        description="JSON file with token and S3 keys that `medret serve` writes (0600) for its replicas",
    )
    allow_anonymous: bool = Field(
        default=False, description="serve /v1 without a token on a non-loopback address (off: refuse to start)"
    )
    auth_required: bool = Field(
        default=False,
        description="a replica that finds no token refuses to start instead of serving anonymously; set by the "
        "builder whenever it saw a token",
    )
    max_upload_bytes: int = Field(default=64 << 20, ge=1024)
    pixel_budget: int = Field(default=50_000_000, ge=1, description="most pixels an upload may declare")
    max_k: int = Field(default=1000, ge=1)
    metadata_in_memory_rows: int | None = Field(
        default=1_000_000,
        ge=0,
        description="tables at most this large keep their rows' metadata in memory beside the codes, so a hit's "
        "row is a take, not a table read (about 100-300 bytes a row); null: always read from the table",
    )
    rerank_candidates: int = Field(
        default=100,
        ge=1,
        description="a query re-ranks the Hamming top max(k, this) by the items' compact features, where the "
        "table keeps them (rerank=false in a request: the pure Hamming order)",
    )
    encoder_runtime: Literal["onnx", "torch"] = Field(
        default="onnx",
        description="onnx: a torch encoder answers queries through its ONNX Runtime twin (several times faster "
        "for one image; the same codes: values near the sign threshold are encoded again by torch); torch: eager",
    )
    encoder_threads: int = Field(default=1, ge=1, le=64, description="threads of the ONNX Runtime encoder")
    thumb_px: int = Field(default=128, ge=16, le=1024)
    batch_max_size: int = Field(default=32, ge=1, le=1024)
    batch_wait_s: float = Field(default=0.0, ge=0, le=1, description="how long a batch waits to fill")
    max_ongoing_requests: int = Field(default=128, ge=1)
    max_queued_requests: int = Field(default=256, ge=1, description="requests a replica queue holds before 503")
    request_timeout_s: float = Field(default=300.0, gt=0, description="Serve ends a request running this long")
    body_idle_s: float = Field(default=10.0, gt=0, description="longest wait for the next piece of a request body")
    body_grace_s: float = Field(default=5.0, ge=0, description="after this long a body must arrive at min_body_rate")
    min_body_rate: int = Field(default=32 << 10, ge=1, description="bytes per second a body must average (408)")
    heavy_workers: int = Field(default=1, ge=1, description="threads for expensive uploads (MRI registration)")
    heavy_queue: int = Field(
        default=4, ge=1, description="expensive uploads admitted at once (running + waiting); more get 503"
    )
    allowed_hosts: tuple[str, ...] = Field(
        default=(), description="Host header values accepted (e.g. medret.hospital.org); empty: any"
    )
    replicas: int = Field(default=1, ge=1)
    shards: int = Field(
        default=1,
        ge=1,
        description="split each table's codes over this many Ray actors (index/shards.py), shared by the replicas; "
        "1: each replica holds its tables' codes itself",
    )
    shard_cpus: float = Field(default=1.0, ge=0, description="CPUs Ray reserves for each shard")
    shard_timeout_s: float = Field(
        default=10.0, gt=0, description="a query waits this long for its slowest shard, then answers 503"
    )
    shard_lease_s: float = Field(
        default=600.0,
        gt=0,
        description="shared shards end by themselves this long after the last replica stopped renewing them "
        "(the service deleted, or redeployed with another shard count), freeing their memory",
    )

    @field_validator("table")
    @classmethod
    def _table_name(cls, v: str | None) -> str | None:
        if v is not None and not TABLE_NAME.match(v):
            raise ValueError("must be a table name (letters, digits, '_' and '-')")
        return v
