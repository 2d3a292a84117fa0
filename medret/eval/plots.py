"""Pictures of retrieval quality: precision-recall over Hamming radius, mAP@k against k, query montages."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.eval.benchmarks import RetrievalSplit
from medret.eval.metrics import average_precision_at_k

KS = (1, 5, 10, 20, 50, 100, 200, 500, 1000)


def pr_by_radius(
    query_codes: npt.NDArray[np.uint8],
    gallery_codes: npt.NDArray[np.uint8],
    relevant: Any,
    bits: int,
    *,
    chunk: int = 512,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Mean precision and recall of "everything within Hamming radius r", r = 0..bits (strict relevance).

    ``relevant(rows)`` returns the (len(rows), n_gallery) relevance matrix for those query rows.
    Queries with nothing within r count as precision 0 at that radius (no free points).
    """
    n_q = len(query_codes)
    prec = np.zeros(bits + 1)
    rec = np.zeros(bits + 1)
    for s in range(0, n_q, chunk):
        rows = np.arange(s, min(n_q, s + chunk))
        d = np.bitwise_count(query_codes[rows, None, :] ^ gallery_codes[None, :, :]).sum(2, dtype=np.int64)
        rel = relevant(rows)
        flat = (np.arange(len(rows))[:, None] * (bits + 1) + d).ravel()
        hits = np.bincount(flat, weights=rel.ravel(), minlength=len(rows) * (bits + 1)).reshape(len(rows), -1)
        found = np.bincount(flat, minlength=len(rows) * (bits + 1)).reshape(len(rows), -1)
        hits, found = hits.cumsum(1), found.cumsum(1)
        total = np.maximum(rel.sum(1, keepdims=True), 1)
        prec += np.divide(hits, found, out=np.zeros_like(hits), where=found > 0).sum(0)
        rec += (hits / total).sum(0)
    return prec / n_q, rec / n_q


def map_curve(ranked: npt.NDArray[np.int64], split: RetrievalSplit, ks: Sequence[int] = KS) -> dict[str, list[float]]:
    """Strict mAP@k against k, micro and per-organ macro."""
    g, q = split["gallery"], split["query"]
    safe = np.where(ranked >= 0, ranked, 0)
    rel = (g.organ[safe] == q.organ[:, None]) & (g.label[safe] == q.label[:, None]) & (ranked >= 0)
    micro, macro = [], []
    for k in ks:
        ap = average_precision_at_k(rel, k)
        micro.append(float(ap.mean()))
        macro.append(float(np.mean([ap[q.organ == o].mean() for o in np.unique(q.organ)])))
    return {"k": list(ks), "micro": micro, "macro": macro}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr(curves: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, (p, r) in curves.items():
        ax.plot(r, p, marker=".", ms=3, label=name)
    ax.set(
        xlabel="recall",
        ylabel="precision",
        title="Precision-recall over Hamming radius (strict)",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_map_at_k(curves: dict[str, dict[str, list[float]]], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, which in zip(axes, ("micro", "macro"), strict=True):
        for name, c in curves.items():
            ax.plot(c["k"], c[which], marker="o", ms=3, label=name)
        ax.set(xscale="log", xlabel="k", title=f"strict mAP@k ({which})", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mAP@k")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def montage_queries(split: RetrievalSplit, per_organ: int = 2, seed: int = 0) -> npt.NDArray[np.int64]:
    rng = np.random.default_rng(seed)
    q = split["query"]
    picks = [rng.choice(np.where(q.organ == o)[0], per_organ, replace=False) for o in range(len(split.organs))]
    return np.concatenate(picks)


def plot_montage(
    split: RetrievalSplit, ranked: npt.NDArray[np.int64], queries: npt.NDArray[np.int64], path: Path, title: str
) -> Path:
    """Each row: a query, then its top 9, framed green when relevant (same organ and class), red when not."""
    plt = _plt()
    g, q = split["gallery"], split["query"]
    fig, axes = plt.subplots(len(queries), 10, figsize=(12, 1.35 * len(queries)))
    axes = np.atleast_2d(axes)
    for row, qi in enumerate(queries):
        cells = [("query", q.images[qi], f"Q {split.organs[q.organ[qi]]}/{q.label[qi]}", "black")]
        for rank, gi in enumerate(ranked[qi, :9]):
            ok = g.organ[gi] == q.organ[qi] and g.label[gi] == q.label[qi]
            cells.append(
                (
                    "hit",
                    g.images[gi],
                    f"{rank + 1}: {split.organs[g.organ[gi]]}/{g.label[gi]}",
                    "green" if ok else "red",
                )
            )
        for ax, (_, img, label, colour) in zip(axes[row], cells, strict=True):
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            ax.set_title(label, fontsize=6.5, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.5 if colour != "black" else 1)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(out: Path, split: RetrievalSplit, results: list[dict[str, Any]]) -> None:
    """``pr.png``, ``map_at_k.png``, a montage per result and ``curves.json`` in ``out``.

    Each result is one of :func:`medret.eval.compare.compare_encoders`, with its ``codes`` and ``label``.
    """
    out.mkdir(parents=True, exist_ok=True)
    g, q = split["gallery"], split["query"]

    def relevant(rows: Any) -> Any:
        return (g.organ[None, :] == q.organ[rows, None]) & (g.label[None, :] == q.label[rows, None])

    pr, curves = {}, {}
    queries = montage_queries(split)
    for r in results:
        c = r["codes"]
        pr[r["label"]] = pr_by_radius(c["query"], c["gallery"], relevant, r["bits"])
        curves[r["label"]] = map_curve(c["ranked"], split)
        plot_montage(split, c["ranked"], queries, out / f"montage-{r['label']}.png", f"{r['label']}: query, then top 9")
    plot_pr(pr, out / "pr.png")
    plot_map_at_k(curves, out / "map_at_k.png")
    (out / "curves.json").write_text(
        json.dumps(
            {k: {"map_at_k": curves[k], "precision": pr[k][0].tolist(), "recall": pr[k][1].tolist()} for k in pr}
        )
    )
