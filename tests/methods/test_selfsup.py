"""The self-supervised hashing method: its contract with the trainer, its views, its losses, on real images."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medret.io.medmnist import read_medmnist
from medret.methods import METHODS
from medret.methods.base import TaskInfo
from medret.methods.selfsup import ContrastiveHashing, bit_balance_loss, nt_xent
from medret.train.data import to_tensor

TINY = {"widths": [8, 16, 32, 64], "blocks": 1, "stem_stride": 2}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on a shared 2-core machine, spinning thread pools make these steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(data_dir: Path) -> torch.Tensor:
    """128 breast ultrasound and 128 abdominal CT images (28 px), in [0, 1]."""
    parts = [read_medmnist(data_dir / "medmnist" / f).images[:128] for f in ("breastmnist.npz", "organamnist.npz")]
    return to_tensor(np.concatenate(parts))


def method(bits: int = 16, arch: dict[str, Any] | None = None, **hyper: Any) -> ContrastiveHashing:
    torch.manual_seed(0)
    m = METHODS.get("selfsup")(TaskInfo(bits=bits, n_classes=1, n_organs=1), "resnet", arch or TINY, hyper)
    assert isinstance(m, ContrastiveHashing)
    return m


def test_registered_with_the_trainer_contract() -> None:
    cls = METHODS.get("selfsup")
    assert cls is ContrastiveHashing
    assert ContrastiveHashing.uses_labels is False
    assert ContrastiveHashing.self_augments is True
    assert ContrastiveHashing.classifier_classes == "none"
    assert method().encoder.classifier is None
    d = ContrastiveHashing.defaults
    built = cls(TaskInfo(bits=48, n_classes=1, n_organs=1), d["architecture"], d["arch"], {})
    assert built.encoder.hash.out_features == 48


def test_labels_and_organs_are_never_read(images: torch.Tensor) -> None:
    m = method()
    x = images[::4]
    n = len(x)
    g = torch.Generator().manual_seed(1)
    random_label = torch.randint(0, 20, (n,), generator=g)
    random_organ = torch.randint(0, 4, (n,), generator=g)
    dummy = torch.full((n,), -1, dtype=torch.long)
    losses = []
    for organ, label in ((random_organ, random_label), (dummy, dummy)):
        copy_ = copy.deepcopy(m)
        loss, _ = copy_(x, organ, label)
        loss.backward()
        grad = copy_.encoder.hash.weight.grad
        assert grad is not None
        losses.append((loss.detach(), grad))
    assert torch.equal(losses[0][0], losses[1][0])
    assert torch.equal(losses[0][1], losses[1][1])


def test_views_differ_but_are_deterministic_given_the_seed(images: torch.Tensor) -> None:
    m = method()
    x = images[:32]
    a1, b1 = m.make_views(x, torch.Generator().manual_seed(7))
    a2, b2 = m.make_views(x, torch.Generator().manual_seed(7))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert a1.shape == x.shape and float(a1.min()) >= 0 and float(a1.max()) <= 1
    assert float((a1 - b1).abs().mean()) > 0.02  # the two views differ from each other and from the image
    assert float((a1 - x).abs().mean()) > 0.02
    a3, _ = m.make_views(x, torch.Generator().manual_seed(8))
    assert not torch.equal(a1, a3)


def test_training_steps_draw_fresh_views_reproducibly_and_resume(images: torch.Tensor) -> None:
    x = images[::8]
    seen: list[torch.Tensor] = []

    def recording(v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seen.append(torch.rand(3, generator=generator))
        return v

    runs = []
    for _ in range(2):
        m = method(seed=3)
        m.view_augment = recording  # the trainer may hand its own augmentation
        runs.append([float(m(x, x.new_zeros(0), x.new_zeros(0))[0].detach()) for _ in range(3)])
    assert runs[0] == runs[1]  # the same seed, the same run
    assert len(seen) == 12 and not torch.equal(seen[0], seen[2])  # each step draws new views
    assert all(torch.equal(a, b) for a, b in zip(seen[:6], seen[6:], strict=True))
    # a resumed method continues the step count, so it draws what the uninterrupted run would
    resumed = method(seed=3)
    resumed.load_state_dict(m.state_dict())
    assert int(resumed.steps) == 3
    assert resumed.reseed().initial_seed() == m.reseed().initial_seed()
    # eval mode (the trainer's validation loss) draws the same views every call
    m.eval()
    with torch.no_grad():
        assert float(m(x, x, x)[0]) == float(m(x, x, x)[0])
    assert int(m.steps) == 3


def test_loss_is_finite_and_falls_on_real_images(images: torch.Tensor) -> None:
    m = method()
    x = images[::4]  # 32 breast, 32 abdomen
    opt = torch.optim.AdamW(m.param_groups(3e-3))
    dummy = torch.full((len(x),), -1, dtype=torch.long)

    def fixed_loss() -> float:
        m.eval()
        with torch.no_grad():
            loss = float(m(x, dummy, dummy)[0])
        m.train()
        return loss

    before = fixed_loss()
    for _ in range(30):
        loss, logs = m(x, dummy, dummy)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
        assert set(logs) == {"contrastive", "quant", "balance"}
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < before - 0.3, (before, after)


def test_nt_xent_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    t = 0.3
    z = F.normalize(torch.cat([a, b]), dim=1)
    expected = 0.0
    for i in range(10):
        j = (i + 5) % 10
        others = [k for k in range(10) if k != i]
        logits = torch.stack([z[i] @ z[k] / t for k in others])
        expected += float(-(z[i] @ z[j] / t) + torch.logsumexp(logits, 0)) / 10
    assert float(nt_xent(a, b, t)) == pytest.approx(expected, rel=1e-5)
    # identical views of well-separated codes: near zero at a low temperature
    h = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    assert float(nt_xent(h, h, 0.05)) < 1e-3


def test_bit_balance_loss_penalises_constant_and_duplicated_bits() -> None:
    g = torch.Generator().manual_seed(0)
    balanced = torch.randint(0, 2, (4096, 8), generator=g).float() * 2 - 1
    assert float(bit_balance_loss(balanced)) < 1e-3
    duplicated = torch.cat([balanced[:, :4], balanced[:, :4]], dim=1)
    assert float(bit_balance_loss(duplicated)) > 0.1
    skewed = torch.where(torch.rand(4096, 8, generator=g) < 0.9, 1.0, -1.0)
    assert float(bit_balance_loss(skewed)) > 0.5
