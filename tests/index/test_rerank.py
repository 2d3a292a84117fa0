"""Two-stage search: the Hamming shortlist re-ranked by compact features kept beside the codes."""

from __future__ import annotations

from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa

from medret.index import CodeIndex
from medret.index import schema as sch
from medret.index.search import topk_reference
from medret.models import rerank
from medret.models.encoder import EncoderConfig

ENC = EncoderConfig(name="pca-itq", bits=48, weights_sha256="abc")


def test_compact_features_keep_cosines_within_a_few_hundredths() -> None:
    rng = np.random.default_rng(0)
    f = rng.standard_normal((300, 256)).astype(np.float32)
    noise = rng.uniform(0, 2, (150, 1)).astype(np.float32)  # pairs of rows, from near copies to unrelated
    f[150:] = f[:150] + noise * rng.standard_normal((150, 256)).astype(np.float32)
    c = rerank.compact(f)
    assert c.dtype == np.int8 and c.shape == (300, rerank.DIMS)
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    true = np.sum(fn[:150] * fn[150:], axis=1)
    approx = np.array([rerank.similarity(c[i], c[150 + i : 151 + i])[0] for i in range(150)]) / rerank.SCALE**2
    assert np.abs(true - approx).mean() < 0.1, np.abs(true - approx).mean()
    assert np.corrcoef(true, approx)[0, 1] > 0.8
    np.testing.assert_array_equal(rerank.compact(f), c)  # the projection is fixed: job and service agree


def _feature_array(feats: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel(), pa.int8()), rerank.DIMS)


def _table(tmp_path: Path, n: int, rng: np.random.Generator) -> tuple[CodeIndex, np.ndarray, np.ndarray]:
    index = CodeIndex.create(str(tmp_path / "index"), ENC)
    assert index.has_features
    codes = rng.integers(0, 4, (n, 6), dtype=np.uint8)  # few distinct codes: long runs of equal distance
    feats = rerank.compact(rng.standard_normal((n, 32)))
    ids = [f"item{i:05d}" for i in range(n)]
    feature = _feature_array(feats)
    none = rng.random(n) < 0.1  # some rows without features
    feature = pa.array([None if none[i] else feature[i].as_py() for i in range(n)], feature.type)
    feats[none] = 0
    index.upsert(index.rows(ids, codes, source_uri=[f"s3://a/{i}" for i in ids], feature=feature))
    return index, codes, feats


def test_the_shortlist_is_reranked_exactly_as_the_numpy_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    index, codes, feats = _table(tmp_path, 3000, rng)
    order = np.asarray(index.to_arrow(["item_id"]).column("item_id").to_pylist(), dtype=object)
    for qi in rng.integers(0, len(codes), 6):
        qf = rerank.compact(rng.standard_normal((1, 32)))[0]
        for k, cand in ((10, 100), (50, 50), (5, 300)):
            hits = index.search_reranked(codes[qi], qf, k, candidates=cand)
            pos, dist = topk_reference(codes, codes[qi : qi + 1], max(k, cand))
            pos, dist = pos[0], dist[0]
            sims = feats[pos].astype(np.int64) @ qf.astype(np.int64)
            want = pos[np.lexsort((pos, dist, -sims))][:k]
            assert hits.column("item_id").to_pylist() == list(order[want])
            assert hits.column("distance").to_pylist() == [int(d) for d in dist[np.lexsort((pos, dist, -sims))][:k]]
            got_sim = np.asarray(hits.column("similarity").to_pylist())
            assert np.all(np.diff(got_sim) <= 1e-9), "most similar first"
    # without the second stage the same table answers in the Hamming order
    ids, _ = index.search_ids(codes[:1], 10)
    pos, _ = topk_reference(codes, codes[:1], 10)
    assert list(ids[0]) == list(order[pos[0]])


def test_a_table_made_before_features_answers_in_the_hamming_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    schema = sch.code_schema(ENC)
    old = pa.schema([f for f in schema if f.name != sch.FEATURE_COLUMN], metadata=schema.metadata)
    lancedb.connect(str(tmp_path / "index")).create_table("codes", schema=old)
    index = CodeIndex.open(str(tmp_path / "index"))
    assert not index.has_features
    codes = rng.integers(0, 4, (500, 6), dtype=np.uint8)
    ids = [f"item{i:05d}" for i in range(500)]
    index.upsert(index.rows(ids, codes, source_uri=ids))
    assert index.features_of(ids[:2]) is None
    hits = index.search_reranked(codes[0], rerank.compact(rng.standard_normal((1, 8)))[0], 20, candidates=100)
    pos, _ = topk_reference(codes, codes[:1], 20)
    assert hits.column("item_id").to_pylist() == [ids[p] for p in pos[0]]
    assert set(hits.column("similarity").to_pylist()) == {0.0}
