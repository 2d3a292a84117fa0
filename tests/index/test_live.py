"""Multi-index hashing as a table changes: the base, the delta and the masked rows give exactly the scan's
answer at every version (appends, recoded items, deletes, compaction, reordering), and the code table
answers through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from medret.index import CodeIndex
from medret.index.live import LiveSearch
from medret.index.search import to_columns, topk_columns, topk_reference
from medret.models.codes import to_words
from medret.models.encoder import EncoderConfig

KS = (1, 10, 100)


def _codes(rng: np.random.Generator, n: int, nbytes: int, centres: np.ndarray) -> np.ndarray:
    """Half near a few centres (0-2 bits off: many exact ties), half uniform."""
    near = centres[rng.integers(0, len(centres), n)].copy()
    for _ in range(2):
        hit = rng.random(n) < 0.5
        byte, bit = rng.integers(0, nbytes, n), rng.integers(0, 8, n)
        near[hit, byte[hit]] ^= (1 << bit[hit]).astype(np.uint8)
    uniform = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    return np.where((rng.random(n) < 0.5)[:, None], near, uniform)


class Table:
    """A table's versions as the reader sees them: ids and codes in scan order."""

    def __init__(self, rng: np.random.Generator, n: int, nbytes: int) -> None:
        self.rng, self.nbytes = rng, nbytes
        self.centres = rng.integers(0, 256, (12, nbytes), dtype=np.uint8)
        self.ids = [f"i{j:06d}" for j in range(n)]
        self.codes = _codes(rng, n, nbytes, self.centres)
        self.next = n
        self.version = 1

    def append(self, n: int) -> None:
        self.ids += [f"i{j:06d}" for j in range(self.next, self.next + n)]
        self.next += n
        self.codes = np.concatenate([self.codes, _codes(self.rng, n, self.nbytes, self.centres)])

    def recode(self, n: int) -> None:  # an upsert: the old row goes, the new one lands at the end
        at = np.sort(self.rng.choice(len(self.ids), n, replace=False))
        moved = [self.ids[a] for a in at]
        keep = np.setdiff1d(np.arange(len(self.ids)), at)
        self.ids = [self.ids[a] for a in keep] + moved
        self.codes = np.concatenate([self.codes[keep], _codes(self.rng, n, self.nbytes, self.centres)])

    def delete(self, n: int) -> None:
        keep = np.sort(self.rng.choice(len(self.ids), len(self.ids) - n, replace=False))
        self.ids = [self.ids[a] for a in keep]
        self.codes = self.codes[keep]

    def insert(self, n: int) -> None:  # new rows between old ones (old rows keep their order)
        at = np.sort(self.rng.integers(0, len(self.ids) + 1, n))
        new_ids = [f"i{j:06d}" for j in range(self.next, self.next + n)]
        self.next += n
        self.ids = list(np.insert(np.asarray(self.ids, dtype=object), at, new_ids))
        self.codes = np.insert(self.codes, at, _codes(self.rng, n, self.nbytes, self.centres), axis=0)

    def shuffle(self) -> None:  # an order the base cannot be merged in
        order = self.rng.permutation(len(self.ids))
        self.ids = [self.ids[a] for a in order]
        self.codes = self.codes[order]

    def publish(self, live: LiveSearch) -> np.ndarray:
        self.version += 1
        cols = to_columns(self.codes)
        live.update(self.version, pa.array(self.ids), cols, self.nbytes)
        return cols


def _check(live: LiveSearch, table: Table, cols: np.ndarray, queries: np.ndarray) -> None:
    for k in (*KS, len(table.ids) + 3):
        got = live.search(table.version, cols, queries, k)
        want = topk_reference(table.codes, queries, k)
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"positions, k={k}, v{table.version}")
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"distances, k={k}, v{table.version}")


@pytest.mark.parametrize("nbytes", [6, 8, 16])
def test_every_version_answers_exactly_through_base_delta_and_masks(nbytes: int) -> None:
    rng = np.random.default_rng(nbytes)
    table = Table(rng, 3000, nbytes)
    live = LiveSearch(table="t", min_rows=1, rebuild_fraction=0.3, background=False, path="mih")
    cols = table.publish(live)
    assert live.stats()["path"] == "mih" and live.builds == 1

    def queries() -> np.ndarray:
        return np.concatenate([table.codes[rng.integers(0, len(table.ids), 6)], _codes(rng, 6, nbytes, table.centres)])

    _check(live, table, cols, queries())
    steps = [("append", 200), ("recode", 150), ("insert", 100), ("delete", 180), ("recode", 300), ("delete", 400)]
    for op, n in steps:
        getattr(table, op)(n)
        cols = table.publish(live)
        stats = live.stats()
        assert stats["view_version"] == table.version and stats["path"] == "mih"
        _check(live, table, cols, queries())
    assert live.builds >= 2, "the delta and masked rows passed 30% of the base: it was rebuilt"


def test_an_order_the_base_cannot_merge_in_is_scanned_then_rebuilt() -> None:
    rng = np.random.default_rng(1)
    table = Table(rng, 2000, 8)
    live = LiveSearch(table="t", min_rows=1, background=False, path="mih")
    table.publish(live)
    table.shuffle()
    cols = table.publish(live)  # no view fits; the rebuild (synchronous here) makes one
    assert live.stats()["view_version"] == table.version and live.builds == 2
    _check(live, table, cols, table.codes[:5])


def test_a_table_below_min_rows_is_scanned_and_a_build_in_the_background_swaps_in() -> None:
    rng = np.random.default_rng(2)
    table = Table(rng, 5000, 8)
    small = LiveSearch(table="t", min_rows=10_000)
    cols = table.publish(small)
    assert small.stats()["path"] == "scan" and small.builds == 0
    _check(small, table, cols, table.codes[:3])

    live = LiveSearch(table="t", min_rows=1, path="mih")  # background build
    cols = table.publish(live)
    _check(live, table, cols, table.codes[:3])  # exact while the build runs (the scan answers)
    live.wait()
    assert live.stats()["path"] == "mih" and live.stats()["base_version"] == table.version
    _check(live, table, cols, table.codes[:3])


def test_the_measured_path_is_kept_and_reported() -> None:
    rng = np.random.default_rng(3)
    table = Table(rng, 4000, 8)
    live = LiveSearch(table="t", min_rows=1, background=False)
    cols = table.publish(live)
    stats = live.stats()
    assert stats["path"] in ("mih", "scan")
    assert stats["mih_s"] > 0 and stats["scan_s"] > 0 and stats["build_s"] > 0 and stats["base_bytes"] > 0
    assert stats["path"] == ("mih" if stats["mih_s"] < stats["scan_s"] else "scan")
    got = live.search(table.version, cols, table.codes[:4], 10)
    want = topk_columns(cols, to_words(table.codes[:4]), 10)
    np.testing.assert_array_equal(got[0], want[0])


def test_the_code_table_answers_through_the_multi_index_at_every_version(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    enc = EncoderConfig(name="pca-itq", bits=48, weights_sha256="abc")
    index = CodeIndex.create(str(tmp_path), enc)
    index.live = LiveSearch(table="codes", min_rows=1, rebuild_fraction=0.25, background=False, path="mih")
    centres = rng.integers(0, 256, (10, 6), dtype=np.uint8)
    made = 0

    def add(n: int) -> None:
        nonlocal made
        ids = [f"item{j:05d}" for j in range(made, made + n)]
        made += n
        index.upsert(index.rows(ids, _codes(rng, n, 6, centres), source_uri=[f"s3://a/{j}" for j in ids]))

    def check() -> None:
        stored = index.to_arrow(["item_id", "code"])  # the table as Lance reads it, in scan order
        order = np.asarray(stored.column("item_id").to_pylist(), dtype=object)
        codes = np.asarray(stored.column("code").to_pylist(), np.uint8)
        queries = np.concatenate([codes[rng.integers(0, len(codes), 4)], _codes(rng, 4, 6, centres)])
        for k in (1, 10, 100):
            ids, dist = index.search_ids(queries, k)
            ref_i, ref_d = topk_reference(codes, queries, k)
            np.testing.assert_array_equal(dist, ref_d)
            assert (ids == order[ref_i]).all(), f"v{index.version} k={k}"
        assert index.live.stats()["view_version"] == index.version

    add(1500)
    check()
    add(200)
    check()
    recoded = [f"item{j:05d}" for j in rng.choice(1700, 120, replace=False)]
    index.upsert(index.rows(recoded, _codes(rng, 120, 6, centres), source_uri=[f"s3://a/{j}" for j in recoded]))
    check()
    index.delete_sources([f"s3://a/item{j:05d}" for j in range(0, 1700, 7)])
    check()
    index.compact()
    check()
    add(100)
    check()
    assert index.live.builds >= 2


def test_the_service_searches_a_large_table_through_the_multi_index_and_says_so(tmp_path: Path) -> None:
    from medret.serve.config import ServiceConfig
    from medret.serve.search import Searcher
    from medret.serve.tables import Tables

    rng = np.random.default_rng(5)
    enc = EncoderConfig(name="pca-itq", bits=64, weights_sha256="abc")
    index = CodeIndex.create(str(tmp_path), enc)
    centres = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    ids = [f"item{j:05d}" for j in range(4000)]
    index.upsert(index.rows(ids, _codes(rng, 4000, 8, centres), source_uri=[f"s3://a/{j}" for j in ids]))

    answers = {}
    for min_rows in (1, None):  # a multi-index for every table; none at all
        cfg = ServiceConfig(index=str(tmp_path), mih_min_rows=min_rows)
        tables = Tables(cfg)
        idx = tables.open("codes")
        idx.live.force = "mih"
        idx.live.background = False
        searcher = Searcher(cfg, tables)
        hits = [searcher.similar("codes", i, k=50) for i in ids[:5]]
        idx.live.wait()
        hits = [searcher.similar("codes", i, k=50) for i in ids[:5]]
        (described,) = tables.describe()
        assert described["search"]["path"] == ("mih" if min_rows else "scan")
        assert described["search"]["base_rows"] == (4000 if min_rows else 0)
        answers[min_rows] = [[(h["item_id"], h["distance"]) for h in page] for page in hits]
    assert answers[1] == answers[None]


def test_a_row_moved_to_the_end_with_its_code_is_masked_and_scanned_not_a_rebuild() -> None:
    rng = np.random.default_rng(6)
    table = Table(rng, 3000, 8)
    live = LiveSearch(table="t", min_rows=1, background=False, path="mih")
    table.publish(live)
    at = np.sort(rng.choice(len(table.ids), 40, replace=False))  # re-upserted unchanged: Lance moves them last
    keep = np.setdiff1d(np.arange(len(table.ids)), at)
    table.ids = [table.ids[a] for a in keep] + [table.ids[a] for a in at]
    table.codes = np.concatenate([table.codes[keep], table.codes[at]])
    cols = table.publish(live)
    stats = live.stats()
    assert live.builds == 1 and stats["view_version"] == table.version and stats["delta_rows"] == 40
    _check(live, table, cols, np.concatenate([table.codes[-5:], table.codes[:5]]))


def test_a_version_with_a_repeated_item_id_is_scanned_and_never_rebuilt_in_a_loop() -> None:
    rng = np.random.default_rng(7)
    table = Table(rng, 2000, 8)
    live = LiveSearch(table="t", min_rows=1, background=False, path="mih")
    table.publish(live)
    table.ids[6] = table.ids[5]  # an append of a row known to be new, twice
    cols = table.publish(live)
    assert live.builds == 1 and live.stats()["path"] == "scan"
    _check(live, table, cols, table.codes[4:8])
    table.ids[6] = "fixed"
    cols = table.publish(live)
    assert live.stats()["view_version"] == table.version
    _check(live, table, cols, table.codes[4:8])
