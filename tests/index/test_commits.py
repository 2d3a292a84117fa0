"""Workers write fragments, the driver commits whole objects: the bookkeeping, without Ray in between.

The real stages (:func:`~medret.pipelines.stages.write`) write real Lance fragments of a real
table; the driver's :class:`~medret.pipelines.commits.Commits` decides what may be committed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from medret.index.manifest import Manifest
from medret.index.store import CodeIndex
from medret.models.encoder import EncoderConfig
from medret.pipelines.commits import Commits, Summary
from medret.pipelines.config import IndexJobConfig
from medret.pipelines.sources import SourceObject
from medret.pipelines.stages import _to_columns, write

ENC = EncoderConfig(name="pca-itq", bits=16, weights_sha256="abc")


def rows(uri: str, unit: int, n: int, *, units: int = 1, error: str = "") -> list[dict[str, Any]]:
    """Encoded item rows of one unit as the encoder actors hand them on (an error unit: one marker row)."""
    base = {"uri": uri, "etag": "e1", "kind": "raster", "unit_id": f"{uri}@{unit}", "object_units": units}
    if error:
        return [{**base, "unit_rows": 1, "ok": False, "error": error, "item_id": ""}]
    return [
        {**base, "unit_rows": n, "ok": True, "error": "", "item_id": f"{uri}#u={unit}&i={i}", "label": str(i)}
        for i in range(n)
    ]


def encoded(items: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    cols = _to_columns(items, np.zeros((len(items), 2, 2), np.float32))
    del cols["image"]
    cols["code"] = np.arange(len(items) * 2, dtype=np.uint8).reshape(-1, 2)
    cols["encode_s"] = np.full(len(items), 0.01)
    return cols


def test_objects_commit_whole_with_every_fragment_they_share(tmp_path: Path) -> None:
    uri = str(tmp_path / "index")
    index = CodeIndex.create(uri, ENC)
    # A was indexed before with an item its new version no longer has
    index.upsert(index.rows(["a#old"], np.zeros((1, 2), np.uint8), source_uri=["a"]))
    objects = [SourceObject(u, u, "e1", 1, "raster") for u in ("a", "b", "c")]
    cfg = IndexJobConfig(source=str(tmp_path), commit_rows=1, quarantine_check_min=1)  # record at once
    summary = Summary(source=cfg.source, index={}, encoder_id=ENC.encoder_id, incremental=False)
    commits = Commits(cfg, index, Manifest(uri), {}, summary, objects)
    target = index.fragment_target()
    before = index.version

    # one write task gets all of A and the first of B's two units: A is done, but its fragment holds B
    first = write(encoded(rows("a", 0, 2) + rows("b", 0, 2, units=2)), target)
    assert first.num_rows == 2 and first.column("fragments")[0].as_py() != ""
    commits.add(first)
    commits.commit()
    assert list(commits.ready) == ["a"] and commits.committable() == set()
    assert index.version == before and summary.commits == 0  # nothing half-done reaches the table

    # B's second unit fails (a slide region that cannot be read), C arrives whole
    commits.add(write(encoded(rows("b", 1, 0, units=2, error="b: region unreadable") + rows("c", 0, 1)), target))
    commits.commit()
    assert summary.commits == 1 and index.version == before + 2  # one commit, then B's written rows dropped
    ids = sorted(index.to_arrow(["item_id"]).column("item_id").to_pylist())
    assert ids == ["a#u=0&i=0", "a#u=0&i=1", "c#u=0&i=0"]
    m = Manifest(uri).entries()
    assert (m["a"].status, m["a"].items) == ("indexed", 2)
    assert (m["b"].status, m["b"].items, m["b"].error) == ("quarantined", 0, "b: region unreadable")
    assert (m["c"].status, m["c"].items) == ("indexed", 1)
    assert (summary.indexed, summary.quarantined, summary.items_written) == (2, 1, 3)
    assert summary.stage_seconds["write"] > 0 and summary.stage_seconds["encode"] > 0
    assert not commits.ready and not commits.batches


def fragments(out: pa.Table) -> list[str]:
    return [f for s in out.column("fragments").to_pylist() if s for f in json.loads(s)]


def test_written_but_uncommitted_fragments_change_nothing(tmp_path: Path) -> None:
    """A driver killed after the workers wrote leaves the table as it was; the rerun's commit is exact."""
    uri = str(tmp_path / "index")
    index = CodeIndex.create(uri, ENC)
    write(encoded(rows("a", 0, 3)), index.fragment_target())  # the driver died before committing this
    assert CodeIndex.open(uri).count() == 0
    for _ in range(2):  # the rerun, then a retry of the same object: replaced, never duplicated
        assert index.commit_fragments(fragments(write(encoded(rows("a", 0, 3)), index.fragment_target())), ["a"]) == 3
        assert CodeIndex.open(uri).count() == 3


def test_compaction_merges_the_write_tasks_fragments(tmp_path: Path) -> None:
    index = CodeIndex.create(str(tmp_path / "index"), ENC)
    for obj in ("a", "b", "c", "d"):
        index.commit_fragments(fragments(write(encoded(rows(obj, 0, 5)), index.fragment_target())), [obj])
    index.commit_fragments([], ["b"])  # b deleted: a deletion file on its fragment
    state = index.to_arrow(["item_id", "code"]).sort_by("item_id")
    assert index.fragments == 3
    assert index.compact() == 2 and index.fragments == 1
    assert index.to_arrow(["item_id", "code"]).sort_by("item_id").equals(state)


def test_an_unwritable_index_is_a_storage_fault_not_a_bad_object(tmp_path: Path) -> None:
    """Fragments that cannot be written (nothing listens at the index's endpoint) leave the batch's
    objects uncommitted and unrecorded, and name the index; a source fault does the same."""
    from medret.config import S3Config
    from medret.index.store import FragmentTarget
    from medret.storage.s3 import lance_storage_options
    from medret.storage.s3local import free_port

    uri = str(tmp_path / "index")
    index = CodeIndex.create(uri, ENC)
    dead = S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}", access_key_id="k", secret_access_key="s",
                    max_attempts=1, connect_timeout_s=1)  # fmt: skip
    good = index.fragment_target()
    target = FragmentTarget(
        "s3://gone/index/codes.lance", good.schema, lance_storage_options("s3://gone", dead), good.encoder_id
    )
    out = write(encoded(rows("a", 0, 2)), target).to_pylist()
    assert out[0]["fault"] == "index" and "writing codes to the index s3://gone/index/codes.lance" in out[0]["error"]
    assert out[0]["items"] == 0 and out[0]["fragments"] == "[]"

    objects = [SourceObject(u, u, "e1", 1, "raster") for u in ("a", "b")]
    cfg = IndexJobConfig(source=str(tmp_path), commit_rows=1, quarantine_check_min=1)
    summary = Summary(source=cfg.source, index={}, encoder_id=ENC.encoder_id, incremental=False)
    commits = Commits(cfg, index, Manifest(uri), {}, summary, objects)
    commits.add(pa.Table.from_pylist(out))
    unread = rows("b", 0, 0, error="reading s3://src/b: Could not connect to the endpoint URL")
    unread[0]["fault"] = "infra"
    commits.add(write(encoded(unread), good))
    commits.commit()
    assert commits.infra_fault == ("index", out[0]["error"])
    assert (summary.indexed, summary.quarantined, summary.retry_later) == (0, 0, 2)
    assert Manifest(uri).entries() == {} and index.count() == 0


def test_lookups_by_id_and_source_use_indices_that_stay_exact_as_objects_are_replaced(tmp_path: Path) -> None:
    """The job's BTREE indices on item_id and source_uri: used by the reads, and every read through them
    (a lean replica's by-id reads, the commits' deletes by source) equals the snapshot's answer through
    replaced objects, new unindexed fragments, deletions, an index update and compaction."""
    uri = str(tmp_path / "index")
    index = CodeIndex.create(uri, ENC)
    for obj in ("a", "b", "c"):
        index.commit_fragments(fragments(write(encoded(rows(obj, 0, 4)), index.fragment_target())), [obj])
    assert index.ensure_scalar_indices() == {"item_id": "created", "source_uri": "created"}
    ds = index._table.to_lance()
    for column in ("item_id", "source_uri"):
        assert "ScalarIndexQuery" in ds.scanner(columns=[column], filter=f"{column} IN ('x', 'y')").explain_plan()

    def check() -> None:
        snap = CodeIndex.open(uri)
        ids = sorted(snap.to_arrow(["item_id"]).column(0).to_pylist())
        lean = CodeIndex.open(uri)
        lean.lean = True
        assert np.array_equal(lean.codes_of(ids), snap.codes_of(ids))
        assert lean.get(ids).sort_by("item_id").equals(snap.get(ids).sort_by("item_id"))
        for gone in ("b#u=0&i=3", "d#u=0&i=9"):
            if gone not in ids:
                with pytest.raises(KeyError):
                    lean.codes_of([gone])

    check()
    # a replaced with fewer items (the old rows deleted through the source_uri index), d added (unindexed)
    index.commit_fragments(fragments(write(encoded(rows("a", 0, 2)), index.fragment_target())), ["a"])
    index.commit_fragments(fragments(write(encoded(rows("d", 0, 3)), index.fragment_target())), ["d"])
    index.commit_fragments([], ["b"])
    assert sorted({i.split("#")[0] for i in index.to_arrow(["item_id"]).column(0).to_pylist()}) == ["a", "c", "d"]
    check()
    assert index.ensure_scalar_indices() == {"item_id": "updated", "source_uri": "updated"}
    check()
    assert index.ensure_scalar_indices() == {"item_id": "current", "source_uri": "current"}
    index.compact()
    check()
    assert CodeIndex.open(uri).count() == 2 + 4 + 3
