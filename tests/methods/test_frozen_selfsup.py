"""``frozen-selfsup``: the pretrained Lite0 kept frozen, its hash layer trained without labels on cached
features of augmented views of real radiographs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medret.errors import ConfigError
from medret.methods.frozen_selfsup import fit_frozen_selfsup
from medret.models.encoder import EncoderConfig, load_encoder
from medret.models.frozen import fit_frozen_itq
from medret.models.hashnet import TorchHashEncoder, to_input
from medret.models.presets import preset_config
from medret.train.augment import field_jitter, get_augmentation, jpeg_jitter, rescan

SIZE = 64  # Lite0 takes any size; small keeps the test quick on a CPU
HYPER = {"views": 4, "steps": 150, "batch": 48}


@pytest.fixture(scope="module")
def chest(data_dir: Path) -> np.ndarray:
    """48 real chest radiographs (PneumoniaMNIST), grey, resized to SIZE px."""
    with np.load(data_dir / "medmnist" / "pneumoniamnist.npz") as z:
        images = z["train_images"][:48]
    return np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BILINEAR)) for im in images])


def config() -> EncoderConfig:
    return preset_config("xray", bits=16, input_size=(SIZE, SIZE))


@pytest.fixture(scope="module")
def trained(chest: np.ndarray) -> TorchHashEncoder:
    views = rescan(get_augmentation("anatomy"))
    return fit_frozen_selfsup(config(), [chest[:30], chest[30:]], views, hyper=HYPER)


def reidentified(encoder: TorchHashEncoder, chest: np.ndarray, seed: int) -> float:
    """Fraction of fresh random views (a seed the fit never drew) whose nearest code is their own image's."""
    x = to_input(chest, encoder.config)
    views = rescan(get_augmentation("anatomy"))(x, torch.Generator().manual_seed(seed), [None] * len(x))
    gallery = np.unpackbits(encoder.encode(chest), axis=1).astype(int)
    queries = np.unpackbits(encoder.encode(views[:, 0].numpy()), axis=1).astype(int)
    dist = (queries[:, None] != gallery[None]).sum(-1)
    own = dist[np.arange(len(chest)), np.arange(len(chest))]
    return float((own < np.where(np.eye(len(chest), dtype=bool), 99, dist).min(1)).mean())  # strictly nearest


def test_the_head_learns_what_a_rescan_does_not_change(trained: TorchHashEncoder, chest: np.ndarray) -> None:
    fit = trained.config.extra["fit"]
    assert (trained.config.method, fit["samples"], fit["views"], fit["steps"]) == ("frozen-selfsup", 48, 4, 150)
    assert fit["loss_last"] < 0.8 * fit["loss_first"], fit
    assert fit["feature_cache_bytes"] == 48 * 5 * trained.module.hash.in_features * 2  # float16, image + 4 views
    # it starts from PCA-ITQ of the same features: trained, the code of a new view finds its image more often
    itq = fit_frozen_itq(config(), [chest])
    assert fit["backbone_sha256"] == itq.config.extra["fit"]["backbone_sha256"], "the backbone stays frozen"
    ours, start = reidentified(trained, chest, 99), reidentified(itq, chest, 99)
    print(f"reidentified: {ours:.3f} trained against {start:.3f} at the ITQ start")
    assert ours > start + 0.1, (ours, start)


def test_saved_loaded_and_fitted_again_it_gives_the_same_codes(
    trained: TorchHashEncoder, chest: np.ndarray, tmp_path: Path
) -> None:
    trained.save(tmp_path / "encoder.npz")
    loaded = load_encoder(tmp_path / "encoder.npz")
    np.testing.assert_array_equal(loaded.encode(chest), trained.encode(chest))
    again = fit_frozen_selfsup(config(), [chest[:30], chest[30:]], rescan(get_augmentation("anatomy")), hyper=HYPER)
    np.testing.assert_array_equal(again.encode(chest), trained.encode(chest))


def test_bad_knobs_are_refused_by_name(chest: np.ndarray) -> None:
    views = rescan(get_augmentation("none"))
    with pytest.raises(ConfigError, match="unknown hyper.*'tempreature'"):
        fit_frozen_selfsup(config(), [chest], views, hyper={"tempreature": 0.1})
    with pytest.raises(ConfigError, match="views >= 1"):
        fit_frozen_selfsup(config(), [chest], views, hyper={"views": 0})
    with pytest.raises(ConfigError, match="runtime"):
        fit_frozen_selfsup(config(), [chest], views, hyper=HYPER, runtime="tensorrt")


def test_a_rescan_moves_and_compresses_but_keeps_shape_range_and_seed() -> None:
    x = torch.rand(6, 3, 32, 32)
    same = field_jitter(x, torch.Generator().manual_seed(0), scale=0.0, shift=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)  # no move, no scale: the image itself
    moved = field_jitter(x, torch.Generator().manual_seed(0))
    assert moved.shape == x.shape and float(moved.min()) >= 0 and float(moved.max()) <= 1
    assert float((moved - x).abs().mean()) > 0.05
    torch.testing.assert_close(field_jitter(x, torch.Generator().manual_seed(0)), moved)
    for channels in (1, 3):
        y = torch.rand(4, channels, 32, 32)
        out = jpeg_jitter(y, torch.Generator().manual_seed(1), quality=(90, 90))
        assert out.shape == y.shape and float((out - y).abs().mean()) < 0.2  # near, not equal: it is lossy
        torch.testing.assert_close(jpeg_jitter(y, torch.Generator().manual_seed(1), quality=(90, 90)), out)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        jpeg_jitter(torch.rand(2, 2, 8, 8), torch.Generator())


def test_each_image_s_place_reaches_its_views_and_the_count_must_match(chest: np.ndarray) -> None:
    """``(images, at)`` batches: each image's place is handed to the view maker with it, in order, up to
    ``max_samples`` (a batch cut short is cut with its places); a batch whose places do not match is refused."""
    seen: list[object] = []

    def views(x: torch.Tensor, generator: torch.Generator, at: list[object]) -> torch.Tensor:
        assert len(at) == len(x)
        seen.extend(at)
        return x.flip(3)

    quick = {"views": 1, "steps": 5, "batch": 8}
    batches = [(chest[:30], list(range(30))), (chest[30:], list(range(30, 48)))]
    fit_frozen_selfsup(config(), batches, views, max_samples=40, hyper=quick)
    assert seen == list(range(40))
    with pytest.raises(ValueError, match="a batch of 48 images came with 3 places"):
        fit_frozen_selfsup(config(), [(chest, [None] * 3)], views, hyper=quick)
