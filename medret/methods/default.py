"""medret's default: a small ResNet with a hash layer trained with three losses on the codes.

- **central similarity** (Yuan et al., CVPR 2020): each combined (organ, class) label gets a
  ±1 hash centre, rows of a Hadamard matrix when ``bits`` is a power of two (centres exactly
  ``bits/2`` apart), else the most spread of many random draws; codes are pulled to their
  centre with a bitwise binary cross-entropy;
- **cross-entropy** of a linear classifier on the codes (label smoothing 0.1);
- **quantisation**: ``mean((|h| - 1)^2)`` so signs are stable.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg import hadamard

from medret.methods.base import METHODS, Method, TaskInfo, quantization_loss


def hash_centres(n_classes: int, bits: int, *, seed: int = 0, draws: int = 200) -> torch.Tensor:
    """(n_classes, bits) ±1 centres, as far apart as we can make them.

    >>> c = hash_centres(20, 16)
    >>> c.shape, int((c[0] != c[1]).sum())
    (torch.Size([20, 16]), 8)
    """
    if bits & (bits - 1) == 0 and n_classes <= 2 * bits:
        h = hadamard(bits)
        return torch.from_numpy(np.concatenate([h, -h])[:n_classes].astype(np.float32))
    rng = np.random.default_rng(seed)
    best, best_min = None, -1
    for _ in range(draws):
        c = rng.choice([-1.0, 1.0], size=(n_classes, bits))
        d = (c[:, None, :] != c[None, :, :]).sum(-1)
        m = int(d[~np.eye(n_classes, dtype=bool)].min()) if n_classes > 1 else bits
        if m > best_min:
            best, best_min = c, m
    assert best is not None
    return torch.from_numpy(best.astype(np.float32))


def central_similarity_loss(code: torch.Tensor, centres: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Bitwise BCE between ``(h + 1) / 2`` and the label's centre mapped to {0, 1}.

    >>> c = torch.tensor([[1.0, -1.0]])
    >>> near = central_similarity_loss(torch.tensor([[0.99, -0.99]]), c, torch.tensor([0]))
    >>> far = central_similarity_loss(torch.tensor([[-0.99, 0.99]]), c, torch.tensor([0]))
    >>> bool(near < 0.02 < 4 < far)
    True
    """
    p = ((code + 1) / 2).clamp(1e-6, 1 - 1e-6)
    target = (centres[label] + 1) / 2
    return F.binary_cross_entropy(p, target)


@METHODS.register("default")
class CentralSimilarityHashing(Method):
    name = "default"
    defaults: ClassVar[dict[str, Any]] = {
        "architecture": "resnet",
        "arch": {"widths": [24, 48, 96, 192], "blocks": 1},
        "lr": 2e-3,
        "weight_decay": 5e-4,
        "batch_size": 256,
        "epochs": 15,
        "fine_fraction": 1 / 3,
        "hyper": {"centre": 1.0, "ce": 1.0, "quant": 0.1, "label_smoothing": 0.1},
    }

    centres: torch.Tensor

    def __init__(self, task: TaskInfo, architecture: str, arch: dict[str, Any], hyper: dict[str, Any]) -> None:
        super().__init__(task, architecture, arch, hyper)
        self.register_buffer("centres", hash_centres(task.n_classes, task.semantic_bits))

    def forward(
        self, x: torch.Tensor, organ: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, code = self.encoder(x)
        h = self.hyper
        centre = central_similarity_loss(code.float(), self.centres, label)
        ce = F.cross_entropy(self.encoder.classify(code), label, label_smoothing=h["label_smoothing"])
        quant = quantization_loss(code.float())
        loss = h["centre"] * centre + h["ce"] * ce + h["quant"] * quant
        return loss, {"centre": centre, "ce": ce, "quant": quant}
