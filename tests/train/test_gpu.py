"""On a GPU machine (``pytest -m gpu``): the GPU paths give what the CPU paths give. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def test_an_encoder_on_cuda_gives_the_cpu_codes(data_dir: Path) -> None:
    """The indexing job moves its encoder to the GPU when its actor has one; the codes must not change."""
    from medret.eval.benchmarks import medmnist4
    from medret.models.encoder import load_encoder
    from medret.models.pretrained import encoder_path

    images = medmnist4(data_dir / "medmnist")["gallery"].images[:2048]
    cpu = load_encoder(encoder_path("default"))
    gpu = load_encoder(encoder_path("default"))
    gpu.module, gpu.device = gpu.module.to("cuda"), "cuda"  # as stages.Encode does on a GPU actor
    a, b = cpu.encode(images), gpu.encode(images)
    differing = np.unpackbits(a ^ b).mean()
    # float32 on two devices: a bit whose pre-activation sits at 0 may flip; anything more is a bug
    assert differing < 1e-3, differing


def test_training_runs_on_one_gpu_worker(ray_local: None, data_dir: Path, tmp_path: Path) -> None:
    from medret.models.encoder import load_encoder
    from medret.train.config import TrainConfig
    from medret.train.trainer import fit

    cfg = TrainConfig(
        method="default",
        bits=16,
        data=[str(data_dir / "medmnist" / "breastmnist.npz")],
        epochs=2,
        batch_size=64,
        samples_per_epoch=512,
        num_workers=1,
        use_gpu=True,
        val_queries=100,
        name="gpu-test",
        storage_path=str(tmp_path / "runs"),
    )
    result = fit(cfg)
    assert [h["epoch"] for h in result.history] == [0, 1]
    codes = load_encoder(result.encoder_path).encode(np.zeros((3, 28, 28), np.uint8))
    assert codes.shape == (3, 2)
