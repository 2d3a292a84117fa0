"""Attention CNN + deep metric learning (after the histopathology retrieval method).

A CNN whose stages end in CBAM attention (channel then spatial), a tanh hash layer, and the
**multi-similarity loss** (Wang et al., CVPR 2019) on the codes, with its pair mining, plus a
quantisation term so the codes binarise with little loss.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from medret.methods.base import METHODS, Method, quantization_loss


def multi_similarity_loss(
    embedding: torch.Tensor,
    label: torch.Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    margin: float = 0.1,
) -> torch.Tensor:
    """Multi-similarity loss over cosine similarities, with its hard-pair mining.

    A positive pair is kept if it is less similar than the most similar negative + ``margin``;
    a negative if it is more similar than the least similar positive - ``margin``.

    >>> e = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    >>> good = multi_similarity_loss(e, torch.tensor([0, 0, 1, 1]))
    >>> bad = multi_similarity_loss(e, torch.tensor([0, 1, 0, 1]))
    >>> bool(good < bad)
    True
    """
    x = F.normalize(embedding, dim=1)
    sim = x @ x.T
    n = len(x)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    pos_mask = (label[:, None] == label[None, :]) & ~eye
    neg_mask = label[:, None] != label[None, :]
    losses = []
    for i in range(n):
        pos, neg = sim[i][pos_mask[i]], sim[i][neg_mask[i]]
        if len(pos) == 0 or len(neg) == 0:
            continue
        pos_kept = pos[pos - margin < neg.max()]
        neg_kept = neg[neg + margin > pos.min()]
        if len(pos_kept) == 0 or len(neg_kept) == 0:
            continue
        pos_term = torch.log1p(torch.exp(-alpha * (pos_kept - base)).sum()) / alpha
        neg_term = torch.log1p(torch.exp(beta * (neg_kept - base)).sum()) / beta
        losses.append(pos_term + neg_term)
    if not losses:
        return sim.sum() * 0
    return torch.stack(losses).sum() / n


@METHODS.register("dml")
class AttentionMetricHashing(Method):
    name = "dml"
    classifier_classes = "none"
    defaults: ClassVar[dict[str, Any]] = {
        "architecture": "cbam-cnn",
        "arch": {"widths": [32, 64, 128], "attention": "cbam"},
        "lr": 1e-3,
        "weight_decay": 5e-4,
        "batch_size": 128,
        "epochs": 6,
        "hyper": {"alpha": 2.0, "beta": 50.0, "base": 0.5, "margin": 0.1, "quant": 0.1},
    }

    def forward(
        self, x: torch.Tensor, organ: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.hyper
        _, code = self.encoder(x)
        code = code.float()
        ms = multi_similarity_loss(code, label, alpha=h["alpha"], beta=h["beta"], base=h["base"], margin=h["margin"])
        quant = quantization_loss(code)
        return ms + h["quant"] * quant, {"ms": ms, "quant": quant}
