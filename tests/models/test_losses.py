"""The methods' losses as pure functions, against hand-computed values and brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medret.methods.base import quantization_loss
from medret.methods.clshash import rerank
from medret.methods.default import central_similarity_loss, hash_centres
from medret.methods.dml import multi_similarity_loss
from medret.methods.dnhn import (
    PairDiscriminator,
    cauchy_pair_loss,
    cauchy_probability,
    discriminator_losses,
    order_pairs,
)
from medret.methods.momentum import batch_hard_triplet_loss, code_distance
from medret.models.codes import hamming_matrix, pack_bits


def test_cauchy_probability_matches_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 48, generator=g)
    p = cauchy_probability(h, h, gamma=1.0)
    i, j = 1, 4
    cos = float(torch.nn.functional.cosine_similarity(h[i], h[j], dim=0))
    d = 48 / 2 * (1 - cos)
    assert float(p[i, j]) == pytest.approx(1 / (d + 1), rel=1e-5)
    # on binary codes d is exactly the Hamming distance
    b = torch.sign(h)
    d_ham = (b[i] != b[j]).sum().item()
    assert float(cauchy_probability(b, b, 2.0)[i, j]) == pytest.approx(2 / (d_ham + 2), rel=1e-5)


def test_cauchy_pair_loss_prefers_codes_that_respect_organ_then_class() -> None:
    organ = torch.tensor([0, 0, 0, 1, 1, 1])
    label = torch.tensor([0, 0, 1, 2, 2, 3])
    c = hash_centres(4, 16)
    good = c[label]
    organ_only = c[organ * 2]  # classes within an organ collapse: class level should be worse
    bad = c[torch.tensor([0, 2, 1, 3, 0, 1])]
    kw = {"alpha1": 0.5, "alpha2": 0.5, "gamma": 1.0}
    g_o, g_c = cauchy_pair_loss(good, organ, label, **kw)
    _, o_c = cauchy_pair_loss(organ_only, organ, label, **kw)
    b_o, b_c = cauchy_pair_loss(bad, organ, label, **kw)
    assert g_c < o_c
    assert g_o + g_c < b_o + b_c


def test_discriminator_losses_route_gradients_correctly() -> None:
    torch.manual_seed(0)
    disc = PairDiscriminator(8)
    code = torch.randn(10, 8, requires_grad=True)
    pairs, swapped = order_pairs(code, torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 3]))
    assert pairs.shape[1] == 16 and len(pairs) == len(swapped) > 0
    d_loss, confusion = discriminator_losses(disc, pairs, swapped)
    d_loss.backward(retain_graph=True)
    assert code.grad is None  # the discriminator's loss does not move the codes
    assert all(p.grad is not None for p in disc.parameters())
    disc.zero_grad()
    confusion.backward()
    assert code.grad is not None and code.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in disc.parameters())
    # bounded below: at best the discriminator says 1/2 and the loss is log 2
    assert confusion.item() >= np.log(2) - 1e-6


@pytest.mark.parametrize("bits", [16, 32, 48, 64])
def test_hash_centres_are_far_apart(bits: int) -> None:
    c = hash_centres(20, bits)
    assert set(c.unique().tolist()) == {-1.0, 1.0}
    d = (c[:, None] != c[None]).sum(-1)[~torch.eye(20, dtype=torch.bool)]
    if bits in (16, 32, 64):
        # Hadamard rows and their negations: bits/2 apart, or bits apart for a row and its negation
        assert set(d.unique().tolist()) <= {bits // 2, bits}
    else:
        assert int(d.min()) >= bits // 4
    assert torch.equal(c, hash_centres(20, bits))  # deterministic


def test_central_similarity_and_quantisation() -> None:
    c = hash_centres(3, 16)
    label = torch.tensor([0, 1, 2])
    assert central_similarity_loss(c[label] * 0.95, c, label) < central_similarity_loss(c[label] * 0.1, c, label)
    assert central_similarity_loss(-c[label] * 0.95, c, label) > 1.0
    assert float(quantization_loss(torch.ones(3, 4))) == 0.0
    assert float(quantization_loss(torch.zeros(3, 4))) == 1.0


def test_batch_hard_triplet_uses_the_queue() -> None:
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    bank = torch.tensor([[1.0, 1.0, 1.0, 0.9], [-1.0, -1.0, -1.0, -1.0]])
    easy = batch_hard_triplet_loss(a, torch.tensor([0]), bank, torch.tensor([0, 1]), margin=0.2)
    assert float(easy) == 0.0
    hard_bank = torch.cat([bank, torch.tensor([[1.0, 1.0, 1.0, 1.0]])])  # a queued negative identical to a
    hard = batch_hard_triplet_loss(a, torch.tensor([0]), hard_bank, torch.tensor([0, 1, 1]), margin=0.2)
    d_ap = float(code_distance(a, bank[:1])[0, 0])
    assert float(hard) == pytest.approx(d_ap - 0.0 + 0.2, abs=1e-6)


def test_multi_similarity_rewards_clustered_embeddings() -> None:
    g = torch.Generator().manual_seed(1)
    label = torch.arange(4).repeat_interleave(8)
    centres = torch.randn(4, 32, generator=g)
    tight = centres[label] + 0.05 * torch.randn(32, 32, generator=g)
    loose = torch.randn(32, 32, generator=g)
    assert multi_similarity_loss(tight, label) < 0.1 < multi_similarity_loss(loose, label)


def test_rerank_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    gf = rng.standard_normal((300, 16)).astype(np.float32)
    qf = rng.standard_normal((20, 16)).astype(np.float32)
    g = pack_bits(rng.standard_normal((300, 32)))
    q = pack_bits(rng.standard_normal((20, 32)))
    out = rerank(q, g, qf, gf, k=10, candidates=50)
    d = hamming_matrix(q, g)
    gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    for i in range(20):
        cand = np.argsort(d[i], kind="stable")[:50]
        sims = gn[cand] @ (qf[i] / np.linalg.norm(qf[i]))
        assert out[i].tolist() == cand[np.argsort(-sims, kind="stable")[:10]].tolist()
    within = rerank(q, g, qf, gf, k=10, candidates=50, radius=10)
    for i in range(20):
        kept = within[i][within[i] >= 0]
        assert (d[i][kept] <= 10).all()
