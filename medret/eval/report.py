"""Evaluation results as text: the fixed-width tables ``medret evaluate`` prints, and a Markdown summary."""

from __future__ import annotations

from typing import Any

#: the columns of a text table, strict first, organ relevance last
COLUMNS = (
    "mAP@10",
    "mAP@100",
    "mAP@1000",
    "P@10",
    "P@100",
    "nDCG@10",
    "nDCG@100",
    "mAP@10 (organ)",
    "mAP@100 (organ)",
    "mAP@1000 (organ)",
)
#: the strict figures of the Markdown summary
SUMMARY = ("mAP@10", "mAP@100", "mAP@1000", "P@10", "nDCG@100")


def _row(name: str, m: dict[str, Any]) -> str:
    return f"{name:24}" + "".join(f"{m.get(c, float('nan')):>11.4f}" for c in COLUMNS)


def table(name: str, result: dict[str, Any]) -> str:
    """One ranking's metrics: micro, each organ, and the organ mean, one row each."""
    head = f"{'':24}" + "".join(f"{c.replace(' (organ)', 'o'):>11}" for c in COLUMNS)
    lines = [f"== {name}", head, _row("micro (all queries)", result["micro"])]
    lines += [_row(f"  {o}", m) for o, m in result["per_organ"].items()]
    lines.append(_row("macro (organ mean)", result["macro"]))
    return "\n".join(lines)


def text(results: list[dict[str, Any]]) -> str:
    """Every encoder's tables (Hamming, and re-ranked when done) and its training cost, a blank line after each."""
    blocks = []
    for r in results:
        parts = [table(f"{r['label']} ({r['name']}), Hamming ranking", r["hamming"])]
        if "reranked" in r:
            parts.append(table(f"{r['label']} ({r['name']}), Hamming top-1000 re-ranked by features", r["reranked"]))
        if "order_spread" in r:
            parts.append(spread_line(r["order_spread"]))
        if "training" in r:
            parts.append(f"training: {r['training']}")
        blocks.append("\n".join(parts) + "\n\n")
    return "".join(blocks)


def spread_line(s: dict[str, Any]) -> str:
    """The Hamming figures' range over the other gallery orders, e.g. ``mAP@100 micro 0.9601-0.9612``."""
    cells = [f"{k} {v['min']:.4f}-{v['max']:.4f}" for k, v in s.items() if isinstance(v, dict)]
    return f"tie-order spread over {s['orders']} other gallery orders (Hamming): " + ", ".join(cells)


def markdown(results: list[dict[str, Any]]) -> str:
    """Summary (strict micro and macro, organ-relevance figures), per-organ mAP@100, training cost."""
    organs = list(results[0]["hamming"]["per_organ"]) if results else []
    head = ["encoder", "ranking"] + [f"{c} micro" for c in SUMMARY] + ["mAP@100 macro"]
    head += ["mAP@10/100/1000 (organ)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    per = ["| encoder | ranking | " + " | ".join(organs) + " | macro |", "|" + "---|" * (len(organs) + 3)]
    cost = [
        "| encoder | training time (s) | hardware | samples/s (last epoch, per worker) | best epoch |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for ranking in ("hamming", "reranked"):
            if ranking in r:
                lines.append(_summary_row(r["label"], ranking, r[ranking]))
                per.append(_organ_row(r["label"], ranking, r[ranking], organs))
        cost.append(_cost_row(r["label"], r.get("training", {})))
    sections = [
        ("Summary (strict unless marked organ)", lines),
        ("Strict mAP@100 per organ", per),
        ("Training cost", cost),
    ]
    spread = [r for r in results if "order_spread" in r]
    if spread:
        organs_s = [k.removesuffix(" mAP@100") for k in spread[0]["order_spread"] if k.endswith(" mAP@100")]
        organs_s = [o for o in organs_s if not o.startswith(("micro", "macro"))]
        cols = ["micro mAP@100", "macro mAP@100"] + [f"{o} mAP@100" for o in organs_s]
        rows = ["| encoder | orders | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
        for r in spread:
            s = r["order_spread"]
            cells = [f"{s[c]['min']:.4f}-{s[c]['max']:.4f}" for c in cols]
            rows.append(f"| {r['label']} | {s['orders']} | " + " | ".join(cells) + " |")
        sections.append(("Tie-order spread (Hamming ranking, min-max over other fixed gallery orders)", rows))
    return "\n".join(line for title, rows in sections for line in (f"### {title}", "", *rows, ""))


def _summary_row(label: str, ranking: str, m: dict[str, Any]) -> str:
    organ = "/".join(f"{m['micro'][f'mAP@{k} (organ)']:.3f}" for k in (10, 100, 1000))
    cells = [label, ranking] + [f"{m['micro'][c]:.4f}" for c in SUMMARY]
    cells += [f"{m['macro']['mAP@100']:.4f}", organ]
    return "| " + " | ".join(cells) + " |"


def _organ_row(label: str, ranking: str, m: dict[str, Any], organs: list[str]) -> str:
    po = [f"{m['per_organ'][o]['mAP@100']:.4f}" for o in organs]
    return f"| {label} | {ranking} | " + " | ".join(po) + f" | {m['macro']['mAP@100']:.4f} |"


def _cost_row(label: str, t: dict[str, Any]) -> str:
    sps = t.get("samples_per_s")
    return (
        f"| {label} | {t.get('train_seconds', '')} | {t.get('hardware', '')} | "
        f"{'' if sps is None else round(sps)} | {t.get('best_epoch', '')} |"
    )
