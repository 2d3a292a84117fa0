"""``medret evaluate``: strict and organ mAP@k, P@k, nDCG@k (micro and per-organ macro) for encoders."""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medret.eval.benchmarks import RetrievalSplit

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "encoders",
        nargs="*",
        default=["default"],
        metavar="ENCODER",
        help="'default' (shipped), an encoder.npz, a training output folder, or pca-itq:BITS (default: default)",
    )
    parser.add_argument(
        "--data", nargs="+", default=["medmnist-4"], metavar="NAME_OR_NPZ", help="'medmnist-4' or MedMNIST .npz files"
    )
    parser.add_argument(
        "--rerank",
        action="store_true",
        help="also rank by Hamming prefilter + feature re-ranking (always done for clshash encoders)",
    )
    parser.add_argument("--plots", metavar="DIR", help="write PR curves, mAP@k curves and query montages here")
    parser.add_argument("--markdown", metavar="FILE", help="also write the summary tables as Markdown")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def _row(name: str, m: dict[str, Any]) -> str:
    return f"{name:24}" + "".join(f"{m.get(c, float('nan')):>11.4f}" for c in COLUMNS)


def table(name: str, result: dict[str, Any]) -> str:
    head = f"{'':24}" + "".join(f"{c.replace(' (organ)', 'o'):>11}" for c in COLUMNS)
    lines = [f"== {name}", head, _row("micro (all queries)", result["micro"])]
    lines += [_row(f"  {o}", m) for o, m in result["per_organ"].items()]
    lines.append(_row("macro (organ mean)", result["macro"]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from medret.eval.retrieval import evaluate_encoder
    from medret.models.pretrained import encoder_path, resolve_encoder
    from medret.train.data import load_split

    split = load_split(args.data)
    results: list[dict[str, Any]] = []
    seen: Counter[str] = Counter()
    for spec in args.encoders:
        t0 = time.perf_counter()
        encoder = resolve_encoder(spec, split["train"].images)
        fit_s = time.perf_counter() - t0
        # classifier + hash layer retrieves in two stages by definition: report both rankings
        res = evaluate_encoder(encoder, split, rerank=args.rerank or encoder.config.method == "clshash")
        res["name"] = spec
        # a training folder is named by its run (two runs of one method and bit length differ there)
        label = (
            Path(spec).name
            if Path(spec).is_dir()
            else f"{encoder.config.method or encoder.config.name}-{encoder.config.bits}b"
        )
        seen[label] += 1
        res["label"] = f"{label}-{seen[label]}" if seen[label] > 1 else label
        train_json = None if spec.startswith("pca-itq") else encoder_path(spec).parent / "train.json"
        if train_json is not None and train_json.is_file():
            res["training"] = json.loads(train_json.read_text())
        elif spec.startswith("pca-itq"):
            res["training"] = {"train_seconds": round(fit_s, 1), "hardware": "driver CPU (closed form)"}
        results.append(res)
    if args.plots:
        write_plots(Path(args.plots), split, results)
    public = [{k: v for k, v in r.items() if k != "codes"} for r in results]
    if args.markdown:
        Path(args.markdown).write_text(markdown(public))
    if args.json:
        print(json.dumps({"data": args.data, "queries": len(split["query"]), "results": public}, indent=1))
        return 0
    for r in public:
        print(table(f"{r['label']} ({r['name']}), Hamming ranking", r["hamming"]))
        if "reranked" in r:
            print(table(f"{r['label']} ({r['name']}), Hamming top-1000 re-ranked by features", r["reranked"]))
        if "training" in r:
            print(f"training: {r['training']}")
        print()
    return 0


def write_plots(out: Path, split: RetrievalSplit, results: list[dict[str, Any]]) -> None:
    from medret.eval.plots import map_curve, montage_queries, plot_map_at_k, plot_montage, plot_pr, pr_by_radius

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


SUMMARY = ("mAP@10", "mAP@100", "mAP@1000", "P@10", "nDCG@100")


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
            if ranking not in r:
                continue
            m = r[ranking]
            organ = "/".join(f"{m['micro'][f'mAP@{k} (organ)']:.3f}" for k in (10, 100, 1000))
            cells = [r["label"], ranking] + [f"{m['micro'][c]:.4f}" for c in SUMMARY]
            cells += [f"{m['macro']['mAP@100']:.4f}", organ]
            lines.append("| " + " | ".join(cells) + " |")
            po = [f"{m['per_organ'][o]['mAP@100']:.4f}" for o in organs]
            per.append(f"| {r['label']} | {ranking} | " + " | ".join(po) + f" | {m['macro']['mAP@100']:.4f} |")
        t = r.get("training", {})
        sps = t.get("samples_per_s")
        cost.append(
            f"| {r['label']} | {t.get('train_seconds', '')} | {t.get('hardware', '')} | "
            f"{'' if sps is None else round(sps)} | {t.get('best_epoch', '')} |"
        )
    return "\n".join(
        [
            "### Summary (strict unless marked organ)",
            "",
            *lines,
            "",
            "### Strict mAP@100 per organ",
            "",
            *per,
            "",
            "### Training cost",
            "",
            *cost,
            "",
        ]
    )
