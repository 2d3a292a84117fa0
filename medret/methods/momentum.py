"""Momentum hashing (after the MRI-retrieval method): an online encoder ``f_o``, a momentum
encoder ``f_t`` (an exponential moving average of ``f_o``, momentum 0.999), a queue of recent
momentum codes with their labels, online batch-hard triplet mining over mini-batch + queue, and
cross-entropy, all applied to the hash codes (the classifier reads the code, not the features).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from medret.methods.base import METHODS, SMALL_RESNET, Method, TaskInfo, quantization_loss


def code_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise ``(1 - cos) / 2`` in [0, 1]: the relaxed normalised Hamming distance of tanh codes.

    >>> code_distance(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0], [-1.0, -1.0]])).round(decimals=4)
    tensor([[0., 1.]])
    """
    return ((1 - F.normalize(a, dim=1) @ F.normalize(b, dim=1).T) / 2).clamp(0, 1)


def batch_hard_triplet_loss(
    anchor: torch.Tensor,
    anchor_label: torch.Tensor,
    bank: torch.Tensor,
    bank_label: torch.Tensor,
    *,
    margin: float,
    self_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """For each anchor: hardest positive and hardest negative in ``bank``; hinge with ``margin``.

    ``self_mask`` (n, m) marks bank entries that are the anchor itself (excluded as positives).
    Anchors with no positive or no negative in the bank do not count.

    >>> a = torch.tensor([[1.0, 0.0]]); bank = torch.tensor([[1.0, 0.1], [0.0, 1.0]])
    >>> float(batch_hard_triplet_loss(a, torch.tensor([0]), bank, torch.tensor([0, 1]), margin=0.1))
    0.0
    >>> float(batch_hard_triplet_loss(a, torch.tensor([1]), bank, torch.tensor([0, 1]), margin=0.1)) > 0.3
    True
    """
    d = code_distance(anchor, bank)
    pos = anchor_label[:, None] == bank_label[None, :]
    if self_mask is not None:
        pos = pos & ~self_mask
    neg = anchor_label[:, None] != bank_label[None, :]
    hardest_pos = torch.where(pos, d, torch.full_like(d, -1.0)).amax(dim=1)
    hardest_neg = torch.where(neg, d, torch.full_like(d, 2.0)).amin(dim=1)
    valid = pos.any(dim=1) & neg.any(dim=1)
    if not valid.any():
        return d.sum() * 0
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()


@METHODS.register("momentum")
class MomentumHashing(Method):
    name = "momentum"
    defaults: ClassVar[dict[str, Any]] = {
        **SMALL_RESNET,
        "hyper": {"momentum": 0.999, "queue": 4096, "margin": 0.25, "ce": 1.0, "triplet": 1.0, "quant": 0.1},
    }

    def __init__(self, task: TaskInfo, architecture: str, arch: dict[str, Any], hyper: dict[str, Any]) -> None:
        super().__init__(task, architecture, arch, hyper)
        self.momentum_encoder = copy.deepcopy(self.encoder)
        for p in self.momentum_encoder.parameters():
            p.requires_grad_(False)
        # plain tensors, not buffers: each worker keeps its own queue, outside checkpoints
        self.queue_codes = torch.zeros(0, task.semantic_bits)
        self.queue_labels = torch.zeros(0, dtype=torch.long)

    def forward(
        self, x: torch.Tensor, organ: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.hyper
        _, code = self.encoder(x)
        code = code.float()
        with torch.no_grad():
            self.momentum_encoder.train(self.training)
            _, target = self.momentum_encoder(x)
            target = target.float()
        queue_codes = self.queue_codes.to(code.device)
        bank = torch.cat([code, queue_codes])
        bank_label = torch.cat([label, self.queue_labels.to(label.device)])
        n = len(code)
        self_mask = torch.zeros(n, len(bank), dtype=torch.bool, device=code.device)
        self_mask[:, :n] = torch.eye(n, dtype=torch.bool, device=code.device)
        triplet = batch_hard_triplet_loss(code, label, bank, bank_label, margin=h["margin"], self_mask=self_mask)
        ce = F.cross_entropy(self.encoder.classify(code), label)
        quant = quantization_loss(code)
        loss = h["triplet"] * triplet + h["ce"] * ce + h["quant"] * quant
        if self.training:
            self._enqueue(target.detach().cpu(), label.detach().cpu())
        return loss, {"triplet": triplet, "ce": ce, "quant": quant}

    def _enqueue(self, codes: torch.Tensor, labels: torch.Tensor) -> None:
        size = int(self.hyper["queue"])
        self.queue_codes = torch.cat([codes, self.queue_codes])[:size]
        self.queue_labels = torch.cat([labels, self.queue_labels])[:size]

    @torch.no_grad()
    def after_step(self) -> None:
        m = float(self.hyper["momentum"])
        for p_t, p_o in zip(self.momentum_encoder.parameters(), self.encoder.parameters(), strict=True):
            p_t.mul_(m).add_(p_o.detach(), alpha=1 - m)
        for b_t, b_o in zip(self.momentum_encoder.buffers(), self.encoder.buffers(), strict=True):
            b_t.copy_(b_o)
