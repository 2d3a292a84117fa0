"""Augmentations by name: shape and range kept, deterministic per generator, each does what it says."""

from __future__ import annotations

import pytest
import torch

from medret.errors import UnknownNameError
from medret.train.augment import AUGMENTATIONS, dihedral, get_augmentation, stain_jitter
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
