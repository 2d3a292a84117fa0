"""Score several encoders on one split, each under a label of its own and with its training cost."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medret.eval.benchmarks import RetrievalSplit
from medret.eval.retrieval import evaluate_encoder
from medret.io.medmnist import to_grey
from medret.models.encoder import Encoder


def compare_encoders(specs: Sequence[str], split: RetrievalSplit, *, rerank: bool = False) -> list[dict[str, Any]]:
    """:func:`~medret.eval.retrieval.evaluate_encoder` of each spec ('default', an encoder.npz, a training
    folder, ``pca-itq:BITS`` fitted on the split's train part), with ``name``, a unique ``label`` and
    ``training`` (from the run's ``train.json``, or the fit time of a closed-form baseline)."""
    from medret.models.pretrained import resolve_encoder

    results: list[dict[str, Any]] = []
    seen: Counter[str] = Counter()
    for spec in specs:
        t0 = time.perf_counter()
        encoder = resolve_encoder(spec, to_grey(split["train"].images))  # PCA-ITQ: the grey baseline
        fit_s = time.perf_counter() - t0
        # classifier + hash layer retrieves in two stages by definition: report both rankings
        res = evaluate_encoder(encoder, split, rerank=rerank or encoder.config.method == "clshash")
        res["name"] = spec
        label = _label(spec, encoder)
        seen[label] += 1
        res["label"] = f"{label}-{seen[label]}" if seen[label] > 1 else label
        training = _training(spec, fit_s)
        if training is not None:
            res["training"] = training
        results.append(res)
    return results


def without_codes(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results as reported (JSON, Markdown): everything but the code arrays."""
    return [{k: v for k, v in r.items() if k != "codes"} for r in results]


def _label(spec: str, encoder: Encoder) -> str:
    """A training folder is named by its run (two runs of one method and bit length differ there)."""
    if Path(spec).is_dir():
        return Path(spec).name
    return f"{encoder.config.method or encoder.config.name}-{encoder.config.bits}b"


def _training(spec: str, fit_s: float) -> dict[str, Any] | None:
    if spec.startswith("pca-itq"):
        return {"train_seconds": round(fit_s, 1), "hardware": "driver CPU (closed form)"}
    from medret.models.pretrained import encoder_path

    train_json = encoder_path(spec).parent / "train.json"
    return json.loads(train_json.read_text()) if train_json.is_file() else None
