from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medret.errors import ConfigError, DataError, UnknownNameError
from medret.eval.benchmarks import medmnist4
from medret.index.search import topk
from medret.models import ENCODERS, EncoderConfig, load_encoder
from medret.models.codes import hamming_matrix, pack_bits, unpack_bits
from medret.models.itq import PCAITQ


def test_pack_unpack_round_trip() -> None:
    bits = np.random.default_rng(0).integers(0, 2, (5, 48)).astype(np.uint8)
    packed = pack_bits(bits * 2.0 - 1.0)
    assert packed.shape == (5, 6)
    np.testing.assert_array_equal(unpack_bits(packed, 48), bits)
    np.testing.assert_array_equal(hamming_matrix(packed, packed), (bits[:, None] != bits[None]).sum(2))


def test_itq_beats_chance_and_round_trips(data_dir: Path, tmp_path: Path) -> None:
    split = medmnist4(data_dir / "medmnist")
    enc = PCAITQ.fit(split["train"].images[::4], bits=32)
    g, q = enc.encode(split["gallery"].images), enc.encode(split["query"].images[:500])
    idx, _ = topk(g, q, 10)
    qp, gp = split["query"], split["gallery"]
    strict = (gp.organ[idx] == qp.organ[:500, None]) & (gp.label[idx] == qp.label[:500, None])
    assert strict.mean() > 0.5  # chance (random codes) is about 0.25 on this query mix
    path = enc.save(tmp_path / "itq.npz") and tmp_path / "itq.npz"
    again = load_encoder(path)
    assert again.config == enc.config and again.config.encoder_id == enc.config.encoder_id
    np.testing.assert_array_equal(again.encode(split["query"].images[:50]), q[:50])


def test_encoder_errors(tmp_path: Path) -> None:
    imgs = np.zeros((100, 28, 28), np.uint8)
    with pytest.raises(ConfigError, match="bits must be a multiple of 8"):
        PCAITQ.fit(imgs, bits=12)
    enc = PCAITQ.fit(np.random.default_rng(0).integers(0, 255, (200, 28, 28), dtype=np.uint8), bits=16)
    with pytest.raises(DataError, match="28x28"):
        enc.encode(np.zeros((1, 32, 32), np.uint8))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.npz"):
        load_encoder(tmp_path / "junk.npz")
    with pytest.raises(UnknownNameError, match="known: .*pca-itq"):
        ENCODERS.get("resnet-9000")


def test_encoder_id_changes_with_any_field() -> None:
    a = EncoderConfig(name="pca-itq", bits=48)
    assert a.encoder_id == EncoderConfig(name="pca-itq", bits=48).encoder_id
    assert a.encoder_id != a.model_copy(update={"preprocess": "xray"}).encoder_id
    with pytest.raises(ValueError, match="multiple of 8"):
        EncoderConfig(name="x", bits=50)


def test_balance_bits_splits_every_bit_in_half() -> None:
    """A hash layer whose bits are nearly constant on the data: after balancing, each bit is on for half of it."""
    import torch

    from medret.models.backbones import create_backbone
    from medret.models.hashnet import HashNet

    torch.manual_seed(0)
    net = HashNet(create_backbone("lenet5", 1, {}), 16).eval()
    with torch.no_grad():
        net.hash.bias.fill_(5.0)  # every bit 1 on every image: one code for everything
    x = torch.rand(400, 1, 28, 28)
    with torch.inference_mode():
        before = (net(x)[1] > 0).float().mean(0)
        net.balance_bits(net.forward_features(x[:200]))
        after = (net(x)[1] > 0).float().mean(0)
    assert bool((before == 1).all())
    assert bool(((after > 0.35) & (after < 0.65)).all()), after  # half, on images it was not fitted on too


@pytest.mark.gpu
def test_the_encoder_stage_on_cuda_gives_the_cpu_codes(data_dir: Path) -> None:
    """The job's Encode stage moves a torch encoder to CUDA when it has a GPU; its codes are the CPU's."""
    import torch

    from medret.models.pretrained import encoder_path
    from medret.pipelines.stages import Encode

    images = medmnist4(data_dir / "medmnist")["query"].images[:256].astype(np.float32) / 255.0
    batch = {"ok": np.ones(len(images), bool), "image": images}
    on_gpu = Encode(encoder_path("default").read_bytes())
    assert getattr(on_gpu.encoder, "device", "") == "cuda"
    gpu_codes = on_gpu(batch)["code"]
    cpu = load_encoder(encoder_path("default"))
    cpu_codes = cpu.encode(images)
    assert torch.cuda.is_available()
    differing = np.unpackbits(gpu_codes ^ cpu_codes).mean()
    assert differing < 0.005, differing  # float rounding may flip a bit whose pre-activation is ~0
