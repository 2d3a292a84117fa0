"""A code table searched by Ray actors holding shards: one scan's answer, through writes and shard deaths."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from medret.errors import SearchUnavailableError
from medret.index import CodeIndex
from medret.index.search import topk_reference
from medret.index.shards import ShardedIndex, _Shard, shard_range
from medret.models.encoder import EncoderConfig

ENC = EncoderConfig(name="pca-itq", bits=48, weights_sha256="abc")
BASES = np.random.default_rng(99).integers(0, 256, (50, ENC.code_bytes), dtype=np.uint8)


def _codes(n: int, seed: int) -> np.ndarray:
    """Codes where most rows repeat one of 50 values: ties at almost every distance."""
    rng = np.random.default_rng(seed)
    codes = BASES[rng.integers(0, len(BASES), n)]
    fresh = rng.random(n) < 0.3
    codes[fresh] = rng.integers(0, 256, (int(fresh.sum()), ENC.code_bytes), dtype=np.uint8)
    return codes


def _upsert(index: CodeIndex, ids: list[str], codes: np.ndarray) -> None:
    index.upsert(index.rows(ids, codes, source_uri=[f"s3://a/{i}" for i in ids]))


def _queries(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([BASES[:6], rng.integers(0, 256, (6, ENC.code_bytes), dtype=np.uint8)])


def _assert_one_scan(sharded: ShardedIndex, uri: str, queries: np.ndarray) -> None:
    """The shards' merged answer equals CodeIndex's scan and brute force at the same version, ties included."""
    one = CodeIndex.open(uri)
    snap = one._snap()
    n = len(snap.item_ids)
    codes = snap.cols.T.copy().view(np.uint8)[:, : ENC.code_bytes]
    for k in (1, 10, 100, n + 7):
        hits = sharded.search(queries, k)
        assert hits.version == one.version
        pos, dist = one.search_positions(queries, k)
        ids = one.search_ids(queries, k)[0] if n else np.full((len(queries), k), None, object)
        ref_pos, ref_dist = topk_reference(codes, queries, k)
        np.testing.assert_array_equal(hits.positions, pos, err_msg=f"k={k} n={n}")
        np.testing.assert_array_equal(hits.distances, dist, err_msg=f"k={k} n={n}")
        np.testing.assert_array_equal(hits.positions, ref_pos)
        np.testing.assert_array_equal(hits.distances, ref_dist)
        assert hits.item_ids.tolist() == ids.tolist()
        assert hits.positions.dtype == np.int64 and hits.distances.dtype == np.int32
    held = sharded.stats()
    assert [s["version"] for s in held] == [one.version] * sharded.shards
    assert sum(s["rows"] for s in held) == n


def test_four_shards_equal_one_scan_through_writes(tmp_path: Path, ray_local: None) -> None:
    uri = str(tmp_path)
    index = CodeIndex.create(uri, ENC)
    q = _queries(1)
    with ShardedIndex(uri, shards=4, num_cpus=0, timeout_s=60, refresh_s=0) as sharded:
        sharded.load()
        _assert_one_scan(sharded, uri, q)  # an empty table: all padding
        for part in range(3):  # three fragments
            _upsert(index, [f"a{part}-{i:04d}" for i in range(900)], _codes(900, part))
        _assert_one_scan(sharded, uri, q)
        _upsert(index, [f"b{i:04d}" for i in range(250)], _codes(250, 10))  # new items
        _assert_one_scan(sharded, uri, q)
        moved = [f"a1-{i:04d}" for i in range(0, 900, 3)]
        _upsert(index, moved, _codes(len(moved), 11))  # changed codes: these rows move to the end
        _assert_one_scan(sharded, uri, q)
        index.delete("item_id LIKE 'a0-01%' OR item_id LIKE 'b00%'")
        _assert_one_scan(sharded, uri, q)

        sharded.refresh_s = 3600  # pinned: a write is not seen until the next look-up
        before = sharded.version
        _upsert(index, ["late"], BASES[:1])
        assert sharded.search(BASES[:1], 1).version == before
        assert sharded.refresh() is True and sharded.version == index.version
        sharded.refresh_s = 0

        assert index.compact() > 0
        _assert_one_scan(sharded, uri, q)
        index.delete("item_id NOT IN ('b0100', 'late')")  # fewer rows than shards
        _assert_one_scan(sharded, uri, q)
        index.delete("item_id IS NOT NULL")  # empty again
        _assert_one_scan(sharded, uri, q)


def test_shard_ranges_concatenate_to_the_snapshot_order(tmp_path: Path) -> None:
    uri = str(tmp_path)
    index = CodeIndex.create(uri, ENC)
    for part in range(4):
        _upsert(index, [f"a{part}-{i:04d}" for i in range(700)], _codes(700, part))
    _upsert(index, [f"a2-{i:04d}" for i in range(0, 700, 4)], _codes(175, 9))
    index.delete("item_id LIKE 'a1-02%'")
    target = index.fragment_target()
    for step in ("fragments with deletions", "compacted"):
        snap = CodeIndex.open(uri)._snap()
        n = len(snap.item_ids)
        for shards in (1, 3, 4, 7, 16):
            held = [
                _Shard(target.dataset_uri, target.storage_options, ENC.code_bytes, s, shards)._at(snap.version)
                for s in range(shards)
            ]
            assert [(r.lo, r.lo + r.rows) for r in held] == [shard_range(n, s, shards) for s in range(shards)]
            ids = np.concatenate([r.item_ids.to_numpy(zero_copy_only=False) for r in held])
            assert ids.tolist() == snap.item_ids.tolist(), f"{step}, {shards} shards"
            np.testing.assert_array_equal(np.concatenate([r.cols for r in held], axis=1), snap.cols)
        if step == "fragments with deletions":
            assert index.fragments > 1
            index.compact()


def _exact_or_unavailable(sharded: ShardedIndex, q: np.ndarray, want: tuple, shard: int) -> str:
    """``"exact"`` or ``"503"``; anything else (a partial or wrong answer) fails the test."""
    try:
        hits = sharded.search(q, 20)
    except SearchUnavailableError as err:
        assert err.shards == (shard,) and err.table == "codes"
        assert f"shard(s) {shard} of 4" in str(err) and "retry later" in str(err) and "'codes'" in str(err)
        return "503"
    np.testing.assert_array_equal(hits.positions, want[0])
    np.testing.assert_array_equal(hits.distances, want[1])
    return "exact"


def test_a_dead_shard_gives_503_never_a_partial_answer(tmp_path: Path, ray_local: None) -> None:
    import ray

    uri = str(tmp_path)
    index = CodeIndex.create(uri, ENC)
    _upsert(index, [f"i{i:05d}" for i in range(4000)], _codes(4000, 3))
    q = _queries(2)
    want = index.search_positions(q, 20)
    with ShardedIndex(uri, shards=4, num_cpus=0, timeout_s=60) as sharded:
        sharded.load()
        assert _exact_or_unavailable(sharded, q, want, 1) == "exact"
        pid = sharded.stats()[1]["pid"]
        sharded.timeout_s = 0.5  # a restart (a new process, imports, reload) takes longer than this
        ray.kill(sharded._actors[1], no_restart=False)
        seen: list[str] = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and seen[-3:] != ["exact"] * 3:
            seen.append(_exact_or_unavailable(sharded, q, want, 1))
            time.sleep(0.05)
        assert "503" in seen and seen[-3:] == ["exact"] * 3, seen
        restarted = sharded.stats()[1]
        assert restarted["state"] == "loaded" and restarted["pid"] != pid

        sharded.timeout_s = 30
        ray.kill(sharded._actors[2], no_restart=True)  # gone for good
        with pytest.raises(SearchUnavailableError, match=r"shard\(s\) 2 of 4 .*shard 2: died") as err:
            sharded.search(q, 20)
        assert err.value.shards == (2,)
        assert [s["state"] for s in sharded.stats()] == ["loaded", "loaded", "unavailable", "loaded"]


def test_shared_shards_live_while_renewed_and_end_after_their_lease(tmp_path: Path, ray_local: None) -> None:
    """Detached shards shared by replicas: kept alive by a replica's renewals however idle, ended by their
    lease once no replica renews them (a deleted service), and started again by a replica that needs them."""
    import ray

    from medret.index.shards import SHARD_NAMESPACE

    uri = str(tmp_path / "index")
    index = CodeIndex.create(uri, ENC)
    _upsert(index, [f"i{j}" for j in range(300)], _codes(300, 3))
    names = ["lease-test-0-of-2", "lease-test-1-of-2"]

    def alive() -> list[bool]:  # looked up by name only: a call would renew the lease
        out = []
        for name in names:
            try:
                ray.get_actor(name, namespace=SHARD_NAMESPACE)
                out.append(True)
            except ValueError:
                out.append(False)
        return out

    replica = ShardedIndex(uri, shards=2, shared_as="lease-test", lease_s=2.0, num_cpus=0)
    try:
        _assert_one_scan(replica, uri, _queries(1))
        time.sleep(4.0)  # twice the lease with no query: the replica's renewals keep them
        assert alive() == [True, True]
        replica.release()  # the replica goes away without ending what others may share
        deadline = time.monotonic() + 20
        while any(alive()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert alive() == [False, False], "shards outlived their lease with no replica renewing it"
        # a replica started now starts them again by name, and a renewing replica whose shard ended (killed for
        # good here) answers 503 once, then starts it again by name
        again = ShardedIndex(uri, shards=2, shared_as="lease-test", lease_s=2.0, num_cpus=0)
        try:
            _assert_one_scan(again, uri, _queries(2))
            ray.kill(again._actors[1], no_restart=True)
            with pytest.raises(SearchUnavailableError):
                again.search(_queries(1), 5)
            _assert_one_scan(again, uri, _queries(3))
        finally:
            again.close()
    finally:
        replica.close()
