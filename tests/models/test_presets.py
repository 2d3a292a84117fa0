"""Every modality preset is a complete, valid config whose network runs."""

from __future__ import annotations

import pytest
import torch

from medret.errors import UnknownNameError
from medret.models.backbones import list_backbones
from medret.models.hashnet import build_hashnet
from medret.models.lite0 import IMAGENET_GREY_MEAN, IMAGENET_GREY_STD, IMAGENET_MEAN, IMAGENET_STD
from medret.models.presets import PRESETS, get_preset, list_presets, preset_config
from medret.preprocess.recipes import RECIPES
from medret.train.augment import AUGMENTATIONS


def test_the_presets() -> None:
    assert list_presets() == ["histology", "medmnist", "mri", "xray"]
    assert (get_preset("xray").channels, get_preset("histology").channels) == (1, 3)
    assert get_preset("mri").input_size == (128, 128) and get_preset("medmnist").input_size == (28, 28)
    assert get_preset("histology").recipe_args == {"mpp": 0.5}
    assert get_preset("medmnist").arch == {"widths": [24, 48, 96, 192], "blocks": 1}


@pytest.mark.parametrize("name", PRESETS.names())
def test_a_preset_is_a_valid_config_whose_network_runs(name: str) -> None:
    p = get_preset(name)
    assert p.recipe in RECIPES and p.augmentation in AUGMENTATIONS and p.architecture in list_backbones()
    assert len(p.mean) == len(p.std) == p.channels
    if p.arch.get("pretrained"):  # ImageNet weights want ImageNet normalisation
        assert (p.mean, p.std) == (
            (IMAGENET_MEAN, IMAGENET_STD) if p.channels == 3 else (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD)
        )
    c = preset_config(name)
    assert c.name == "hashnet" and c.bits == 48 and c.extra["preset"] == name and c.extra["arch"] == p.arch
    assert (c.input_size, c.channels, c.preprocess, c.method) == (p.input_size, p.channels, p.recipe, p.method)
    assert c.extra["augmentation"] == p.augmentation
    c.extra["arch"]["mutated"] = True  # a config's copy, never the preset's own
    assert "mutated" not in get_preset(name).arch
    small = preset_config(name, bits=16, input_size=(32, 32))
    net = build_hashnet(small).eval()
    with torch.no_grad():
        features, code = net(torch.rand(2, p.channels, 32, 32))
    assert code.shape == (2, 16) and features.shape == (2, net.hash.in_features)
    assert torch.equal(net.mean.flatten(), torch.tensor(p.mean))


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match="unknown encoder preset 'ct'; known: histology, medmnist, mri, xray"):
        preset_config("ct")


def test_a_runs_arch_options_go_on_top_of_its_presets() -> None:
    """``--set arch.dihedral=true`` with ``--preset histology`` keeps the preset's pretrained weights."""
    from medret.train.config import TrainConfig

    data = ["medmnist-4"]
    assert TrainConfig(preset="histology", data=data).arch == {"pretrained": True}
    assert TrainConfig(preset="histology", data=data, arch={"dihedral": True}).arch == {
        "pretrained": True,
        "dihedral": True,
    }
    assert TrainConfig(preset="histology", data=data, arch={"pretrained": False}).arch == {"pretrained": False}
    # another backbone takes the run's arch alone: the preset's options are for its own backbone
    own = TrainConfig(preset="histology", data=data, architecture="resnet", arch={"blocks": 1})
    assert (own.architecture, own.arch) == ("resnet", {"blocks": 1})
