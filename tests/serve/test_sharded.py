"""The query service over sharded tables: the same answers as one replica's own scan, through table
changes, filters and re-ranking; a dead shard answers 503, never a partial page; the replica holds no codes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from medret.index.store import CodeIndex
from medret.models import rerank
from medret.models.encoder import checkpoint_config
from medret.models.pretrained import encoder_path
from medret.serve.app import create_app
from medret.serve.config import ServiceConfig
from medret.serve.service import Service

pytestmark = pytest.mark.slow


def _rows(idx: CodeIndex, ids: list[str], rng: np.random.Generator) -> pa.Table:
    codes = rng.integers(0, 3, (len(ids), idx.encoder.code_bytes), dtype=np.uint8)  # few codes: many ties
    feats = rerank.compact(rng.standard_normal((len(ids), 16)))
    feature = pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel(), pa.int8()), rerank.DIMS)
    return idx.rows(ids, codes, source_uri=ids, label=[str(i % 3) for i in range(len(ids))], feature=feature)


def _page(api: TestClient, item: str, **params: Any) -> list[tuple[str, int, float | None]]:
    r = api.get(f"/v1/items/{item}/similar", params={"table": "codes", "k": 40, **params})
    assert r.status_code == 200, r.text
    return [(h["item_id"], h["distance"], h["metadata"].get("similarity")) for h in r.json()["results"]]


def test_four_shards_answer_as_one_scan_through_changes_and_a_dead_shard_is_a_503(
    ray_local: None, tmp_path: Path
) -> None:
    import ray

    from medret.index.shards import SHARD_NAMESPACE

    rng = np.random.default_rng(0)
    index = str(tmp_path / "index")
    idx = CodeIndex.create(index, checkpoint_config(encoder_path("default")), checkpoint="default")
    ids = [f"item{i:05d}" for i in range(2000)]
    idx.upsert(_rows(idx, ids, rng))
    # multi-indexes from the first row: the shards' and the replica's own (exact either way; built in the background)
    one = Service(ServiceConfig(index=index, refresh_s=0, mih_min_rows=1))
    four = Service(ServiceConfig(index=index, refresh_s=0, shards=4, shard_cpus=0, shard_timeout_s=60, mih_min_rows=1))
    plain, sharded = TestClient(create_app(one)), TestClient(create_app(four))

    def same_answers() -> None:
        for item in rng.choice(ids, 4, replace=False):
            for params in ({}, {"rerank": "false"}, {"label": "1"}, {"label": "2", "rerank": "false"}):
                want = _page(plain, item, **params)
                assert want and _page(sharded, item, **params) == want, (item, params)
        (described,) = sharded.get("/v1/tables").json()
        assert described["search"] == {"path": "shards", "shards": 4}

    same_answers()
    first = _page(sharded, ids[0])
    assert first[0][2] is not None, "re-ranked by default: hits carry similarity"
    moved = list(rng.choice(ids, 150, replace=False))
    idx.upsert(_rows(idx, moved, rng))  # recoded: they move to the end of the scan order
    ids += [f"item{i:05d}" for i in range(2000, 2200)]
    idx.upsert(_rows(idx, ids[2000:], rng))
    gone = [str(i) for i in rng.choice(ids, 100, replace=False)]
    idx.delete_sources(gone)
    ids = [i for i in ids if i not in set(gone)]
    same_answers()
    idx.compact()
    same_answers()
    served = four.engine.index("codes")
    assert served.lean and served._snapshot is None, "a sharded replica never loads the table's codes"

    # a shard gone for good: the page is a 503 that names it, with Retry-After; never a partial answer
    shard = ray.get_actor(
        next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("-2-of-4")),
        namespace=SHARD_NAMESPACE,
    )
    ray.kill(shard, no_restart=True)
    r = sharded.get(f"/v1/items/{ids[0]}/similar", params={"table": "codes", "k": 10})
    assert r.status_code == 503, r.text
    assert "shard(s) 2 of 4" in r.json()["detail"] and r.headers["retry-after"] == "5"
    four.engine.catalog.sharded(served).close()  # type: ignore[union-attr]


def test_a_sharded_service_over_a_table_made_before_features_answers_in_the_hamming_order(
    ray_local: None, tmp_path: Path
) -> None:
    import lancedb

    from medret.index import schema as sch

    rng = np.random.default_rng(1)
    index = str(tmp_path / "index")
    enc = checkpoint_config(encoder_path("default"))
    full = sch.code_schema(enc, "default")
    old = pa.schema([f for f in full if f.name != sch.FEATURE_COLUMN], metadata=full.metadata)
    lancedb.connect(index).create_table("codes", schema=old)
    idx = CodeIndex.open(index)
    ids = [f"item{i:05d}" for i in range(600)]
    codes = rng.integers(0, 3, (600, idx.encoder.code_bytes), dtype=np.uint8)
    idx.upsert(idx.rows(ids, codes, source_uri=ids, label=[str(i % 3) for i in range(600)]))
    plain = TestClient(create_app(Service(ServiceConfig(index=index, refresh_s=0))))
    four = Service(ServiceConfig(index=index, refresh_s=0, shards=4, shard_cpus=0, shard_timeout_s=60))
    sharded = TestClient(create_app(four))
    for item in ids[:3]:
        want = _page(plain, item)
        assert want and _page(sharded, item) == want and want[0][2] is None  # no similarity: not re-ranked
        r = sharded.get(f"/v1/items/{item}/similar", params={"table": "codes", "k": 5})
        assert r.json()["query"]["reranked"] is False
    four.engine.catalog.sharded(four.engine.index("codes")).close()  # type: ignore[union-attr]
