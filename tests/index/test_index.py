"""The LanceDB code index: exact search against brute force, upserts, deletes, filters, versions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from medret.config import S3Config
from medret.errors import EncoderMismatchError, SchemaError, TableNotFoundError
from medret.index import CodeIndex, list_tables, where_clause
from medret.index.search import topk, topk_reference
from medret.models.encoder import EncoderConfig

ENC = EncoderConfig(name="pca-itq", bits=64, weights_sha256="abc")


def _fill(index: CodeIndex, n: int, seed: int = 0) -> np.ndarray:
    codes = np.random.default_rng(seed).integers(0, 256, (n, index.encoder.code_bytes), dtype=np.uint8)
    index.upsert(
        index.rows(
            [f"item{i:06d}" for i in range(n)],
            codes,
            source_uri=[f"s3://archive/obj{i // 4}" for i in range(n)],
            modality=["CR" if i % 3 else "MR" for i in range(n)],
            dataset=["d"] * n,
            label=[str(i % 5) for i in range(n)],
        )
    )
    return codes


@pytest.mark.parametrize("nbytes", [2, 6, 8, 16, 32])
def test_kernel_matches_brute_force_with_ties(nbytes: int) -> None:
    rng = np.random.default_rng(nbytes)
    db = rng.integers(0, 256, (100_000, nbytes), dtype=np.uint8)
    db[1000:1300] = db[5]  # 300 exact duplicates: ties and buffer compaction
    queries = np.concatenate([db[:8], rng.integers(0, 256, (40, nbytes), dtype=np.uint8)])
    for k in (1, 10, 100, 500):
        got_i, got_d = topk(db, queries, k)  # groups of queries over numba's threads
        ref_i, ref_d = topk_reference(db, queries, k)
        np.testing.assert_array_equal(got_i, ref_i)
        np.testing.assert_array_equal(got_d, ref_d)
        for a, b in ((0, 1), (6, 10), (20, 36)):  # one group: called directly, on the calling thread
            got_i, got_d = topk(db, queries[a:b], k)
            np.testing.assert_array_equal(got_i, ref_i[a:b])
            np.testing.assert_array_equal(got_d, ref_d[a:b])


def test_kernel_pads_when_k_exceeds_rows() -> None:
    db = np.array([[1], [3]], np.uint8)
    idx, dist = topk(db, np.array([[1]], np.uint8), 4)
    assert idx.tolist() == [[0, 1, -1, -1]] and dist.tolist() == [[0, 1, -1, -1]]
    idx, dist = topk(db, np.zeros((0, 1), np.uint8), 4)  # no query: nothing scanned, nothing returned
    assert idx.shape == dist.shape == (0, 4)


def test_exact_search_equals_brute_force_on_100k(tmp_path: Path) -> None:
    index = CodeIndex.create(str(tmp_path), ENC)
    codes = _fill(index, 100_000)
    queries = np.concatenate(
        [codes[[3, 77, 99_999]], np.random.default_rng(9).integers(0, 256, (30, 8), dtype=np.uint8)]
    )
    ids, dist = index.search_ids(queries, 100)
    ref_i, ref_d = topk_reference(codes, queries, 100)
    assert ids.tolist() == [[f"item{i:06d}" for i in row] for row in ref_i]
    np.testing.assert_array_equal(dist, ref_d)
    hits = index.search(queries[:1], 5)[0]
    assert hits.column("item_id").to_pylist()[0] == "item000003"
    assert hits.column("rank").to_pylist() == [0, 1, 2, 3, 4]
    assert set(hits.column_names) >= {"distance", "source_uri", "modality", "label", "indexed_at"}


def test_filtered_search_equals_brute_force_on_subset(tmp_path: Path) -> None:
    index = CodeIndex.create(str(tmp_path), ENC)
    codes = _fill(index, 20_000)
    where = where_clause({"modality": "MR", "label": ["1", "2"]})
    keep = np.array([i for i in range(20_000) if i % 3 == 0 and i % 5 in (1, 2)])
    ids, dist = index.search_ids(codes[:5], 20, where=where)
    ref_i, ref_d = topk_reference(codes[keep], codes[:5], 20)
    assert ids.tolist() == [[f"item{keep[i]:06d}" for i in row] for row in ref_i]
    np.testing.assert_array_equal(dist, ref_d)
    hits = index.search(codes[:1], 50, where=where)[0]
    assert set(hits.column("modality").to_pylist()) == {"MR"}


def test_upsert_replaces_never_duplicates(tmp_path: Path) -> None:
    index = CodeIndex.create(str(tmp_path), ENC)
    codes = _fill(index, 1000)
    v = index.version
    new = np.full((10, 8), 255, np.uint8)
    index.upsert(index.rows([f"item{i:06d}" for i in range(10)], new, source_uri=["s3://x/new"] * 10))
    # the same id twice in one batch: the last one wins
    index.upsert(index.rows(["dup", "dup"], np.array([[1] * 8, [2] * 8], np.uint8), source_uri=["a", "b"]))
    assert index.count() == 1001
    assert index.version > v
    np.testing.assert_array_equal(index.codes_of(["item000003", "item000500"]), np.stack([new[3], codes[500]]))
    assert index.get(["dup"]).column("source_uri").to_pylist() == ["b"]
    ids, dist = index.search_ids(new[:1], 10)
    assert sorted(ids[0].tolist()) == [f"item{i:06d}" for i in range(10)] and dist[0].max() == 0


def test_delete_by_source_and_versions(tmp_path: Path) -> None:
    index = CodeIndex.create(str(tmp_path), ENC)
    codes = _fill(index, 400)
    before = index.version
    index.delete_sources(["s3://archive/obj0", "s3://archive/obj7", "s3://it's/quoted"])
    assert index.count() == 392
    ids, _ = index.search_ids(codes[:4], 1)
    assert "item000000" not in ids.ravel().tolist()
    old = CodeIndex.open(str(tmp_path), version=before)  # time travel: old versions stay readable
    assert old.count() == 400
    index.optimize()
    assert index.count() == 392
    ids2, _ = index.search_ids(codes[40:41], 1)
    assert ids2[0, 0] == "item000040"
    assert len(index.versions()) >= 3


def test_refresh_follows_writes_from_another_handle(tmp_path: Path) -> None:
    reader = CodeIndex.create(str(tmp_path), ENC)
    codes = _fill(reader, 100)
    assert reader.search_ids(codes[:1], 1)[0][0, 0] == "item000000"
    writer = CodeIndex.open(str(tmp_path))
    writer.upsert(writer.rows(["fresh"], np.full((1, 8), 7, np.uint8), source_uri=["s3://new"]))
    assert reader.count() == 100  # pinned until it refreshes
    assert reader.refresh() is True
    assert reader.search_ids(np.full((1, 8), 7, np.uint8), 1)[0][0, 0] == "fresh"
    assert reader.refresh() is False


def test_encoder_contract_in_table_metadata(tmp_path: Path) -> None:
    CodeIndex.create(str(tmp_path), ENC, checkpoint="s3://models/itq.npz")
    index = CodeIndex.open(str(tmp_path))
    assert index.encoder == ENC and index.checkpoint == "s3://models/itq.npz"
    other = EncoderConfig(name="pca-itq", bits=64, weights_sha256="different")
    with pytest.raises(EncoderMismatchError, match="refusing codes"):
        CodeIndex.create(str(tmp_path), other, exist_ok=True)
    rows = index.rows(["a"], np.zeros((1, 8), np.uint8), source_uri=["u"], encoder_id=[other.encoder_id])
    with pytest.raises(EncoderMismatchError):
        index.upsert(rows)
    assert index.count() == 0
    with pytest.raises(FileExistsError):
        CodeIndex.create(str(tmp_path), ENC)


def test_bad_rows_are_refused_with_reasons(tmp_path: Path) -> None:
    index = CodeIndex.create(str(tmp_path), ENC)
    with pytest.raises(SchemaError, match=r"uint8 of shape \(n, 8\)"):
        index.rows(["a"], np.zeros((1, 6), np.uint8))
    with pytest.raises(SchemaError, match="required column 'source_uri'"):
        index.upsert(index.rows(["a"], np.zeros((1, 8), np.uint8)))
    with pytest.raises(SchemaError, match="unknown columns"):
        index.upsert(index.rows(["a"], np.zeros((1, 8), np.uint8), source_uri=["u"], colour=["red"]))
    with pytest.raises(SchemaError, match="cannot filter"):
        where_clause({"code": "x"})
    with pytest.raises(TableNotFoundError, match="tables there: codes"):
        CodeIndex.open(str(tmp_path), table="nope")
    assert where_clause({"label": "it's"}) == "label = 'it''s'"


def test_ivf_path_recall(tmp_path: Path) -> None:
    index = CodeIndex.create(str(tmp_path), ENC)
    # clustered codes, as trained encoders produce: 64 centres, a few flipped bits each
    rng = np.random.default_rng(1)
    centres = rng.integers(0, 2, (64, 64), dtype=np.uint8)
    bits = centres[rng.integers(0, 64, 20_000)] ^ (rng.random((20_000, 64)) < 0.05)
    codes = np.packbits(bits.astype(np.uint8), axis=1)
    index.upsert(index.rows([f"i{i}" for i in range(len(codes))], codes, source_uri=["u"] * len(codes)))
    index.create_ivf(num_partitions=32)
    queries = codes[rng.choice(len(codes), 50, replace=False)]
    exact_ids, exact_d = index.search_ids(queries, 10)
    recall = []
    for q, ex, exd in zip(queries, exact_ids, exact_d, strict=True):
        got = index.search_ivf(q, 10, nprobes=8)[0]
        # ties at the 10th distance make ids ambiguous: compare distances as multisets
        recall.append(len(set(got.column("item_id").to_pylist()) & set(ex)) / 10)
        assert got.column("distance").to_pylist()[0] == 0
        assert (np.array(got.column("distance").to_pylist()) >= exd).all()
    assert np.mean(recall) >= 0.5


@pytest.mark.s3
def test_index_on_s3(s3_config: S3Config, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/index"
    index = CodeIndex.create(uri, ENC, table="cxr", s3=s3_config)
    codes = _fill(index, 2000)
    reopened = CodeIndex.open(uri, table="cxr", s3=s3_config)
    assert reopened.encoder == ENC and reopened.count() == 2000
    ids, _ = reopened.search_ids(codes[[10, 20]], 1)
    assert ids[:, 0].tolist() == ["item000010", "item000020"]
    assert list_tables(uri, s3_config) == ["cxr"]
    wrong = s3_config.model_copy(update={"secret_access_key": "bad"})
    with pytest.raises(Exception, match="(?i)signature|denied|403|forbidden"):
        CodeIndex.open(uri, table="cxr", s3=wrong)


def test_rows_conform_types(tmp_path: Path) -> None:
    index = CodeIndex.create(str(tmp_path), ENC)
    rows = index.rows(["a"], np.zeros((1, 8), np.uint8), source_uri=["u"], tile_x=np.array([5], np.int32), mpp=[0.5])
    assert index.upsert(rows) == 1
    got = index.get(["a"])
    assert got.column("tile_x").type == pa.int64() and got.column("mpp").to_pylist() == [0.5]


def test_hits_read_from_memory_equal_hits_read_from_the_table(tmp_path: Path) -> None:
    index = CodeIndex.create(str(tmp_path), ENC)
    codes = _fill(index, 3000)
    in_memory = index.search(codes[:5], 20)
    assert index._snap().meta is not None
    other = CodeIndex.open(str(tmp_path))
    other.metadata_in_memory_rows = 1000  # smaller than the table: hits are read from it
    from_table = other.search(codes[:5], 20)
    assert other._snap().meta is None
    for a, b in zip(in_memory, from_table, strict=True):
        assert a.drop_columns(["indexed_at"]).equals(b.drop_columns(["indexed_at"]))
        assert a.column("indexed_at").to_pylist() == b.column("indexed_at").to_pylist()
