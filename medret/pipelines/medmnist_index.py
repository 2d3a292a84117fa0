"""The main job at this stage: encode the medmnist-4 gallery into a code table and query it.

Fits the encoder on the train split, writes the gallery into a LanceDB code table
(local or ``s3://``), runs every query image through the same encoder and the
table's exact Hamming search, and scores the rankings with :mod:`medret.eval.metrics`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from medret.config import Frozen, IndexConfig, S3Config, save_resolved
from medret.errors import ConfigError
from medret.eval.benchmarks import Part, RetrievalSplit, medmnist4, split_from_files
from medret.eval.retrieval import score
from medret.index.store import CodeIndex, connect
from medret.models.encoder import Encoder, load_encoder
from medret.models.itq import PCAITQ
from medret.models.pretrained import encoder_path

log = logging.getLogger(__name__)

MODALITY = {"breast": "US", "retina": "fundus", "chest": "CR", "abdomen": "CT"}


class MedmnistTable(IndexConfig):
    table: str = Field(default="medmnist4", pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


class MedmnistIndexConfig(Frozen):
    data: str | None = Field(
        default=None, description="folder with medmnist/*.npz (default: $MEDRET_DATA or ../shared/data)"
    )
    files: list[str] = Field(default_factory=list, description="MedMNIST-layout .npz files instead of medmnist-4")
    index: MedmnistTable = MedmnistTable()
    s3: S3Config = S3Config()
    encoder: str = Field(
        default="default",
        description="'default' (the shipped deep hashing encoder), an encoder.npz or training folder, "
        "or 'pca-itq' (the training-free baseline, fitted here at `bits`)",
    )
    bits: int | None = Field(default=None, ge=8, le=256, multiple_of=8, description="code length for pca-itq")
    k: int = Field(default=10, ge=1, le=1000)
    eval_k: list[int] = Field(default=[10, 100, 1000])
    sample_queries: int = Field(default=4, ge=0, le=100)
    out: str = "medret-out"
    batch_rows: int = Field(default=4096, ge=1)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[medret] {msg}", flush=True)


def item_ids(split: RetrievalSplit, part: Part) -> list[str]:
    return [f"{split.organs[o]}/{s}" for o, s in zip(part.organ, part.source, strict=True)]


def _encoder(cfg: MedmnistIndexConfig, split: RetrievalSplit, out: Path) -> tuple[Encoder, Path]:
    if cfg.encoder == "pca-itq":
        fitted = PCAITQ.fit(split["train"].images, bits=cfg.bits or 48)
        ckpt = out / "encoders" / f"{fitted.config.encoder_id}.npz"
        fitted.save(ckpt)
        return fitted, ckpt
    ckpt = encoder_path(cfg.encoder)
    encoder = load_encoder(ckpt)
    if cfg.bits is not None and cfg.bits != encoder.config.bits:
        raise ConfigError(
            f"bits={cfg.bits} but encoder {cfg.encoder!r} makes {encoder.config.bits}-bit codes; "
            "use encoder 'pca-itq' to fit one at another length, or a checkpoint trained at it"
        )
    return encoder, ckpt


def run(cfg: MedmnistIndexConfig, *, progress: bool = True) -> dict[str, Any]:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(cfg.out)
    save_resolved(cfg, out)

    t = time.perf_counter()
    split = split_from_files(cfg.files) if cfg.files else medmnist4(Path(cfg.data) / "medmnist" if cfg.data else None)
    timings["load_s"] = time.perf_counter() - t
    counts = {p: len(split[p]) for p in split.parts}
    _say(progress, f"loaded {', '.join(split.organs)}: " + ", ".join(f"{p} {n}" for p, n in counts.items()))

    t = time.perf_counter()
    encoder, ckpt = _encoder(cfg, split, out)
    timings["fit_s"] = time.perf_counter() - t
    _say(progress, f"encoder {encoder.config.encoder_id} ({encoder.config.method}) -> {ckpt}")

    t = time.perf_counter()
    db = connect(cfg.index.uri, cfg.s3)
    if cfg.index.table in db.list_tables().tables:
        db.drop_table(cfg.index.table)  # a rerun rebuilds the table from scratch
    index = CodeIndex.create(
        cfg.index.uri, encoder.config, table=cfg.index.table, checkpoint=str(ckpt.resolve()), s3=cfg.s3
    )
    gallery = split["gallery"]
    ids = item_ids(split, gallery)
    for start in range(0, len(gallery), cfg.batch_rows):
        sl = slice(start, start + cfg.batch_rows)
        organs = [split.organs[o] for o in gallery.organ[sl]]
        index.upsert(
            index.rows(
                ids[sl],
                encoder.encode(gallery.images[sl]),
                source_uri=[f"medmnist://{o}/{s}" for o, s in zip(organs, gallery.source[sl], strict=True)],
                modality=[MODALITY.get(o, "other") for o in organs],
                dataset=[f"medmnist/{o}" for o in organs],
                label=[str(c) for c in gallery.label[sl]],
            )
        )
        _say(progress, f"indexed {min(start + cfg.batch_rows, len(gallery))}/{len(gallery)} gallery images")
    timings["index_s"] = time.perf_counter() - t

    t = time.perf_counter()
    query = split["query"]
    qcodes = encoder.encode(query.images)
    kmax = max([cfg.k, *cfg.eval_k])
    ranked_ids, _ = index.search_ids(qcodes, kmax)
    timings["search_s"] = time.perf_counter() - t
    pos_of = {item: i for i, item in enumerate(ids)}
    ranked = np.vectorize(lambda x: -1 if x is None else pos_of[x], otypes=[np.int64])(ranked_ids)
    metrics = score(ranked, split, tuple(cfg.eval_k))
    _say(progress, f"searched {len(query)} queries (top {kmax}) in {timings['search_s']:.2f}s")

    samples = []
    rng = np.random.default_rng(0)
    qids = item_ids(split, query)
    # one query per organ in turn, so the hard organs show up beside the abundant one
    per_organ = [rng.permutation(np.where(query.organ == o)[0]) for o in range(len(split.organs))]
    picks = [int(p[i]) for i in range(cfg.sample_queries) for p in per_organ if i < len(p)][: cfg.sample_queries]
    for qi in picks:
        hits = index.search(qcodes[qi], cfg.k)[0]
        samples.append(
            {
                "query": qids[qi],
                "query_label": f"{split.organs[query.organ[qi]]}/{query.label[qi]}",
                "hits": [
                    {
                        "item_id": h["item_id"],
                        "distance": h["distance"],
                        "label": f"{h['dataset'].split('/')[-1]}/{h['label']}",
                    }
                    for h in hits.select(["item_id", "distance", "dataset", "label"]).to_pylist()
                ],
            }
        )
    timings["total_s"] = time.perf_counter() - t_start
    summary = {
        "encoder": encoder.config.model_dump(mode="json"),
        "encoder_id": encoder.config.encoder_id,
        "index": {"uri": cfg.index.uri, "table": cfg.index.table, "rows": index.count(), "version": index.version},
        "counts": counts,
        "metrics": metrics,
        "samples": samples,
        "timings": timings,
    }
    import json

    (out / "medmnist_index.json").write_text(json.dumps(summary, indent=2))
    return summary
