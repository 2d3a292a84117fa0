"""Classifier + hash layer (after the chest X-ray retrieval thesis).

Training: a classification backbone whose last hidden layer is a tanh hash layer; cross-entropy
of the classifier on the codes plus a quantisation term. Retrieval is two-stage: a Hamming
prefilter (every gallery item within ``radius`` bits, or the ``candidates`` nearest), then the
candidates are re-ranked by cosine similarity of the continuous backbone features.
:func:`rerank` is that second stage; evaluation reports the ranking with and without it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from medret.index.search import topk
from medret.methods.base import METHODS, SMALL_RESNET, Method, quantization_loss


@METHODS.register("clshash")
class ClassifierHashing(Method):
    name = "clshash"
    defaults: ClassVar[dict[str, Any]] = {**SMALL_RESNET, "hyper": {"ce": 1.0, "quant": 0.1}}

    def forward(
        self, x: torch.Tensor, organ: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, code = self.encoder(x)
        ce = F.cross_entropy(self.encoder.classify(code), label)
        quant = quantization_loss(code.float())
        return self.hyper["ce"] * ce + self.hyper["quant"] * quant, {"ce": ce, "quant": quant}


def rerank(
    query_codes: npt.NDArray[np.uint8],
    gallery_codes: npt.NDArray[np.uint8],
    query_features: npt.NDArray[np.float32],
    gallery_features: npt.NDArray[np.float32],
    *,
    k: int,
    candidates: int = 1000,
    radius: int | None = None,
) -> npt.NDArray[np.int64]:
    """Hamming prefilter then cosine re-ranking; (q, k) gallery indices, ``-1`` where fewer remain.

    With ``radius`` only candidates within that Hamming distance are kept (up to ``candidates``).

    >>> g = np.array([[0b11110000], [0b11110001], [0b00001111]], np.uint8)
    >>> gf = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    >>> rerank(g[:1], g, np.array([[0.1, 1.0]], np.float32), gf, k=2, candidates=2)
    array([[1, 0]])
    """
    m = min(max(candidates, k), len(gallery_codes))
    cand, dist = topk(gallery_codes, query_codes, m)
    q = query_features / np.maximum(np.linalg.norm(query_features, axis=1, keepdims=True), 1e-12)
    g = gallery_features / np.maximum(np.linalg.norm(gallery_features, axis=1, keepdims=True), 1e-12)
    out = np.full((len(query_codes), k), -1, np.int64)
    for i in range(len(query_codes)):
        c = cand[i][cand[i] >= 0]
        if radius is not None:
            c = c[dist[i][: len(c)] <= radius]
        sims = g[c] @ q[i]
        order = np.argsort(-sims, kind="stable")[:k]
        out[i, : len(order)] = c[order]
    return out
