"""The ``<table>__lesions`` table on real LanceDB, and sketch queries over it."""

from __future__ import annotations

from typing import Any as Case

import numpy as np
import pytest

from medret.errors import ConfigError, DataError, TableNotFoundError
from medret.index.store import is_code_table
from medret.sketch.encoder import RasterEncoder
from medret.sketch.grid import LesionGridConfig
from medret.sketch.ingest import find_mask, is_lesion_mask, lesion_slices, sync_job_lesions
from medret.sketch.query import SketchOptions, encode_sketches, search_snapshot
from medret.sketch.score import dice_reference
from medret.sketch.store import LesionTable

pytestmark = pytest.mark.slow


def lesion_plane(carried: np.ndarray, encoder: RasterEncoder, level: int, value: int = 1) -> np.ndarray:
    """The lesion over the box at a level (a voxel counts when it is lesion on half the slab's planes): an
    exact sketch."""
    tg = encoder.grid
    return (tg.box((carried[tg.slab(level)] == value).mean(axis=0)) >= 0.5).astype(float)


def best_level(carried: np.ndarray, encoder: RasterEncoder) -> int:
    tg = encoder.grid
    return int(np.argmax([(carried[tg.slab(i)] == 1).sum() for i in range(tg.n_levels)]))


def test_the_table_holds_one_row_per_level_and_class(lesion_index: str, encoder: RasterEncoder) -> None:
    lt = LesionTable.open(lesion_index, "mri")
    assert not is_code_table(lt.name)
    assert lt.config == encoder.grid.config
    rows = lt._table.to_arrow().to_pylist()
    ids = [r["lesion_id"] for r in rows]
    assert len(ids) == len(set(ids)) and lt.patients() == 32
    assert all(r["bits"] == int(np.unpackbits(np.asarray(r["code"], np.uint8)).sum()) > 0 for r in rows)
    tcga = [r for r in rows if r["patient"] == "TCGA-FG-6692"]
    assert {r["class"] for r in tcga} == {"edema"} and all(r["hemisphere"] in ("right", "both") for r in tcga)
    with pytest.raises(TableNotFoundError, match="has no lesion table"):
        LesionTable.open(lesion_index, "other")
    with pytest.raises(ConfigError, match="refusing"):
        LesionTable.for_index(lesion_index, "mri", LesionGridConfig())


def test_replace_swaps_a_volumes_rows_in_one_commit(tmp_path: object, encoder: RasterEncoder, tcga_case: Case) -> None:
    uri = str(tmp_path)
    slices = encoder.encode_volume(tcga_case.carried)
    sync_job_lesions(uri, "t", encoder, {"a": slices, "b": slices})
    lt = LesionTable.open(uri, "t")
    v = lt.version
    old = lt.snapshot()
    last = old.n - 1
    old_row = lt.take([last])[0]
    sync_job_lesions(uri, "t", encoder, {"a": slices[:2], "b": []})  # a shrank, b lost its mask
    lt.refresh()
    assert lt.take([last], old) == [old_row], "positions refer to the snapshot they were found in"
    assert lt.version == v + 1
    t = lt._table.to_arrow()
    assert sorted(t.column("source_uri").to_pylist()) == ["a", "a"]
    sync_job_lesions(uri, "t", encoder, {"a": slices[:2]})  # a replay changes nothing but the version
    assert lt.count() == 2


def test_the_real_case_ranks_first_for_a_sketch_over_its_lesion(
    lesion_index: str, encoder: RasterEncoder, tcga_case: Case
) -> None:
    lt = LesionTable.open(lesion_index, "mri")
    level = best_level(tcga_case.carried, encoder)
    sketch = lesion_plane(tcga_case.carried, encoder, level)
    query = encode_sketches(encoder, {"edema": sketch}, level)
    hits, n = search_snapshot(lt.snapshot(), query, level, SketchOptions(k=10))
    assert hits[0].patient == "TCGA-FG-6692" and hits[0].dice > 0.8 and n > 0
    # the Dice the table ranks by is the numpy Dice of the codes
    row = lt.take([hits[0].row])[0]
    assert hits[0].dice == dice_reference(np.asarray([row["code"]], np.uint8), query["edema"].code)[0]
    assert abs(row["level"] - level) <= 1
    mirrored = encode_sketches(encoder, {"edema": sketch[:, ::-1]}, level)
    hits_m, _ = search_snapshot(lt.snapshot(), mirrored, level, SketchOptions(k=10))
    assert "TCGA-FG-6692" not in [h.patient for h in hits_m]
    assert all(h.dice > 0 for h in hits_m)


def test_two_class_sketches_score_the_mean_dice(lesion_index: str, encoder: RasterEncoder, moved_case: Case) -> None:
    lt = LesionTable.open(lesion_index, "mri")
    assert moved_case.drawn is not None
    level = 14
    masks = {
        "edema": lesion_plane(moved_case.drawn, encoder, level, 1),
        "enhancing": lesion_plane(moved_case.drawn, encoder, level, 2),
    }
    hits, _ = search_snapshot(lt.snapshot(), encode_sketches(encoder, masks, level), level, SketchOptions(k=5))
    assert hits[0].patient == "moved-template"
    assert hits[0].score == pytest.approx(np.mean(list(hits[0].per_class.values())))
    assert set(hits[0].per_class) == {"edema", "enhancing"} and min(hits[0].per_class.values()) > 0.5
    with pytest.raises(DataError, match=r"sketch classes \['necrotic'\] are not in this table's classes"):
        encode_sketches(encoder, {"necrotic": masks["edema"]}, level)


def test_region_weight_changes_scores_not_the_exact_match(
    lesion_index: str, encoder: RasterEncoder, tcga_case: Case
) -> None:
    lt = LesionTable.open(lesion_index, "mri")
    level = best_level(tcga_case.carried, encoder)
    q = encode_sketches(encoder, {"edema": lesion_plane(tcga_case.carried, encoder, level)}, level)
    hits, _ = search_snapshot(lt.snapshot(), q, level, SketchOptions(k=3, region_weight=0.5))
    assert hits[0].patient == "TCGA-FG-6692" and hits[0].score > hits[0].dice


def test_mask_routing_names() -> None:
    assert is_lesion_mask("case_seg.nii.gz") and is_lesion_mask("a/b/x_mask.nii") and not is_lesion_mask("case.nii.gz")
    assert find_mask("case.nii.gz", ["case.nii.gz", "case_mask.nii.gz"]) == "case_mask.nii.gz"
    assert find_mask("case.nii.gz", ["case_seg.nii.gz", "case_mask.nii.gz"]) == "case_seg.nii.gz"
    assert find_mask("case.nii.gz", [], {"mask_path": "s3://b/m.nii.gz"}) == "s3://b/m.nii.gz"
    assert find_mask("case.nii.gz", ["other_seg.nii.gz"]) is None


def test_lesion_slices_is_the_jobs_one_call(encoder: RasterEncoder, tcga_case: Case) -> None:
    got = lesion_slices(tcga_case.mask, tcga_case.result, encoder, name="case_seg.nii.gz")
    want = encoder.encode_volume(tcga_case.carried)
    assert [(s.level, s.cls, s.code.tobytes()) for s in got] == [(s.level, s.cls, s.code.tobytes()) for s in want]
