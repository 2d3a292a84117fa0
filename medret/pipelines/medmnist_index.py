"""The benchmark job: encode the medmnist-4 gallery into a code table and query it, in-process, in seconds.

Fits the encoder on the train split, writes the gallery into a LanceDB code table
(local or ``s3://``), runs every query image through the same encoder and the
table's exact Hamming search, and scores the rankings with :mod:`medret.eval.metrics`.

The table is written the way the indexing job (:mod:`medret.pipelines.backfill`) writes
one: the encoder's config, checkpoint and preprocessing recipes in its metadata, codes
written as fragments and committed once. The job's stages themselves (``expand``/``load``
on Ray Data) are not used: the ``medmnist`` kind indexes every image of a ``.npz`` file, not
the benchmark's gallery part; its recipe feeds the encoder floats where the benchmark is
scored on uint8 images (RGB retina images turned grey without rounding, so some codes
differ); and a Ray start-up would cost more than this whole run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from pydantic import Field

from medret.config import Frozen, IndexConfig, S3Config, save_resolved
from medret.errors import ConfigError
from medret.eval.benchmarks import Part, RetrievalSplit, medmnist4, split_from_files
from medret.eval.retrieval import score
from medret.index.store import CodeIndex, connect
from medret.models import rerank
from medret.models.encoder import Encoder, EncoderConfig, load_encoder
from medret.models.itq import PCAITQ
from medret.models.pretrained import encoder_path
from medret.pipelines.config import TilingConfig

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


def table_recipes(encoder: EncoderConfig) -> dict[str, Any]:
    """The preprocessing the table records, exactly as the indexing job records it for this encoder
    (:func:`medret.pipelines.backfill.recipes_for` with no recipes chosen, and the default tiling),
    so the query service prepares an upload the way these items were prepared."""
    from medret import kinds

    return {"kinds": kinds.recipes_for(encoder.preprocess), "tiling": TilingConfig().model_dump(mode="json")}


def load_benchmark(cfg: MedmnistIndexConfig) -> RetrievalSplit:
    return split_from_files(cfg.files) if cfg.files else medmnist4(Path(cfg.data) / "medmnist" if cfg.data else None)


def new_table(cfg: MedmnistIndexConfig, encoder: Encoder, ckpt: Path) -> CodeIndex:
    """An empty code table for this encoder, recording its checkpoint and recipes (a rerun starts afresh)."""
    db = connect(cfg.index.uri, cfg.s3)
    if cfg.index.table in db.list_tables().tables:
        db.drop_table(cfg.index.table)
    return CodeIndex.create(
        cfg.index.uri,
        encoder.config,
        table=cfg.index.table,
        checkpoint=str(ckpt.resolve()),
        recipes=table_recipes(encoder.config),
        s3=cfg.s3,
    )


def write_gallery(
    index: CodeIndex, encoder: Encoder, split: RetrievalSplit, *, batch_rows: int, progress: bool
) -> list[str]:
    """Encode the gallery into ``index`` as the job's encoders do: each batch written as fragments of the
    table, then one commit of them all. Returns the item ids in row order."""
    gallery = split["gallery"]
    ids = item_ids(split, gallery)
    target = index.fragment_target()
    fragments: list[str] = []
    for start in range(0, len(gallery), batch_rows):
        sl = slice(start, start + batch_rows)
        organs = [split.organs[o] for o in gallery.organ[sl]]
        codes, feats = rerank.codes_and_features(encoder, gallery.images[sl])  # features: the service re-ranks
        fragments += target.write(
            ids[sl],
            codes,
            feature=pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel(), pa.int8()), rerank.DIMS),
            source_uri=[f"medmnist://{o}/{s}" for o, s in zip(organs, gallery.source[sl], strict=True)],
            modality=[MODALITY.get(o, "other") for o in organs],
            dataset=[f"medmnist/{o}" for o in organs],
            label=[str(c) for c in gallery.label[sl]],
        )
        _say(progress, f"encoded {min(start + batch_rows, len(gallery))}/{len(gallery)} gallery images")
    index.commit_fragments(fragments, [])
    return ids


def rank_queries(
    index: CodeIndex, query_codes: npt.NDArray[np.uint8], gallery_ids: list[str], k: int
) -> npt.NDArray[np.int64]:
    """(queries, k) gallery positions by the table's exact Hamming search; -1 pads."""
    ranked_ids, _ = index.search_ids(query_codes, k)
    pos_of = {item: i for i, item in enumerate(gallery_ids)}
    return np.vectorize(lambda x: -1 if x is None else pos_of[x], otypes=[np.int64])(ranked_ids)


def sample_queries(
    index: CodeIndex, split: RetrievalSplit, query_codes: npt.NDArray[np.uint8], n: int, k: int
) -> list[dict[str, Any]]:
    """The top ``k`` of ``n`` queries, one per organ in turn, so the hard organs show up beside the abundant one."""
    query = split["query"]
    rng = np.random.default_rng(0)
    qids = item_ids(split, query)
    per_organ = [rng.permutation(np.where(query.organ == o)[0]) for o in range(len(split.organs))]
    picks = [int(p[i]) for i in range(n) for p in per_organ if i < len(p)][:n]
    samples = []
    for qi in picks:
        hits = index.search(query_codes[qi], k)[0].select(["item_id", "distance", "dataset", "label"]).to_pylist()
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
                    for h in hits
                ],
            }
        )
    return samples


def run(cfg: MedmnistIndexConfig, *, progress: bool = True) -> dict[str, Any]:
    """Fit or load the encoder, index the gallery, search every query, score; writes ``medmnist_index.json``."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(cfg.out)
    save_resolved(cfg, out)

    t = time.perf_counter()
    split = load_benchmark(cfg)
    timings["load_s"] = time.perf_counter() - t
    counts = {p: len(split[p]) for p in split.parts}
    _say(progress, f"loaded {', '.join(split.organs)}: " + ", ".join(f"{p} {n}" for p, n in counts.items()))

    t = time.perf_counter()
    encoder, ckpt = _encoder(cfg, split, out)
    timings["fit_s"] = time.perf_counter() - t
    _say(progress, f"encoder {encoder.config.encoder_id} ({encoder.config.method}) -> {ckpt}")

    t = time.perf_counter()
    index = new_table(cfg, encoder, ckpt)
    ids = write_gallery(index, encoder, split, batch_rows=cfg.batch_rows, progress=progress)
    timings["index_s"] = time.perf_counter() - t

    t = time.perf_counter()
    qcodes = encoder.encode(split["query"].images)
    kmax = max([cfg.k, *cfg.eval_k])
    ranked = rank_queries(index, qcodes, ids, kmax)
    timings["search_s"] = time.perf_counter() - t
    metrics = score(ranked, split, tuple(cfg.eval_k))
    _say(progress, f"searched {len(qcodes)} queries (top {kmax}) in {timings['search_s']:.2f}s")

    samples = sample_queries(index, split, qcodes, cfg.sample_queries, cfg.k)
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
    (out / "medmnist_index.json").write_text(json.dumps(summary, indent=2))
    return summary
