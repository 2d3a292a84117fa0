"""The query service under load: HTTP latency and throughput with 1M codes indexed.

    python bench/serve.py [--rows 1000000] [--seconds 20] [--concurrency 1 32] [--compare-batch-wait]

Builds a table of ``--rows`` 48-bit codes for the shipped default encoder: the real
codes of the medmnist-4 gallery, topped up with copies that have 1-3 random bits
flipped (so the distance distribution is that of real codes, not of random ones).
Starts the Ray Serve deployment on loopback, then an asyncio load generator on the
same machine sends, for each concurrency, upload queries (real 28x28 PNGs from the
query split) and by-id queries (``/v1/items/{id}/similar``) for ``--seconds`` each.
Reports p50/p99 latency and requests/s, and splits the mean latency into decode
(+ preprocess), encode, search and overhead (client latency minus the server's total).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, Form, UploadFile  # module level: the peer's annotations must resolve here


def build_table(uri: str, rows: int) -> tuple[list[str], float]:
    import pyarrow as pa

    from medret.eval.benchmarks import data_root, medmnist4
    from medret.index.store import CodeIndex
    from medret.models.encoder import load_encoder
    from medret.models.pretrained import encoder_path
    from medret.preprocess.recipes import RECIPES

    t0 = time.perf_counter()
    enc = load_encoder(encoder_path("default"))
    split = medmnist4(data_root() / "medmnist")
    g = split["gallery"]
    from medret.io.base import Decoded

    recipe = RECIPES.get(enc.config.preprocess)
    images = np.stack(
        [
            recipe(Decoded(im, kind="raster", reader="bench"), input_size=enc.config.input_size)[0].image
            for im in g.images
        ]
    )
    real = enc.encode(images)
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(real), rows)
    codes = real[pick].copy()
    extra = np.arange(rows) >= len(real)
    codes[~extra] = real[: (~extra).sum()]
    pick[~extra] = np.arange((~extra).sum())
    bits = enc.config.bits
    for _ in range(3):  # flip up to 3 random bits of each copy
        flip = extra & (rng.random(rows) < 0.7)
        pos = rng.integers(0, bits, rows)
        codes[flip, pos[flip] // 8] ^= (1 << (pos[flip] % 8)).astype(np.uint8)
    organs = np.asarray(split.organs)[g.organ[pick]]
    ids = [f"bench/{o}/{i:07d}" for i, o in enumerate(organs)]
    index = CodeIndex.create(uri, enc.config, checkpoint="default")
    for s in range(0, rows, 250_000):
        e = min(rows, s + 250_000)
        index.append(
            index.rows(
                ids[s:e],
                codes[s:e],
                source_uri=[f"/bench/{i}.png" for i in ids[s:e]],
                dataset=pa.array(organs[s:e].tolist()),
                label=[str(x) for x in g.label[pick[s:e]]],
            )
        )
    return ids, time.perf_counter() - t0


def payloads(n: int) -> list[bytes]:
    from PIL import Image

    from medret.eval.benchmarks import data_root, medmnist4

    q = medmnist4(data_root() / "medmnist")["query"]
    out = []
    for i in np.random.default_rng(1).choice(len(q.images), n, replace=False):
        buf = io.BytesIO()
        Image.fromarray(q.images[i]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


async def load(url: str, mode: str, concurrency: int, seconds: float, pngs: list[bytes], ids: list[str]) -> dict:
    from urllib.parse import quote

    import aiohttp

    lat: list[float] = []
    server: list[dict[str, float]] = []
    errors = 0
    rng = np.random.default_rng(concurrency)
    deadline = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            if mode in PEERS or mode == "upload":  # the same request; the peers return a constant
                form = aiohttp.FormData()
                form.add_field("file", pngs[int(rng.integers(len(pngs)))], filename="q.png")
                form.add_field("k", "10")
                req = session.post(url + PEERS.get(mode, "v1/search"), data=form)
            else:
                item = quote(ids[int(rng.integers(len(ids)))], safe="")
                req = session.get(url + f"v1/items/{item}/similar?k=10")
            async with req as r:
                body = await r.json()
            dt = time.perf_counter() - t
            if r.status != 200:
                errors += 1
                continue
            lat.append(dt)
            server.append(body["timings_ms"])

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    if not lat:
        raise SystemExit(f"bench: every {mode} request failed ({errors} errors) at {url}")
    ms = np.asarray(lat) * 1e3

    def mean(key: str) -> float:
        return float(np.mean([s.get(key, 0.0) for s in server])) if server else 0.0

    total = mean("total")
    return {
        "mode": mode,
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": errors,
        "rps": len(lat) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "decode_ms": mean("prepare"),
        "encode_ms": mean("encode"),
        "search_ms": mean("search"),
        "overhead_ms": float(ms.mean()) - total,
    }


#: the peers measured in the same run, by the path they answer under: a Serve handler that reads the body,
#: and a FastAPI ingress that parses the same multipart form (file and k) as medret's search route
PEERS = {"trivial": "trivial", "form": "trivial-form/"}


def deploy_trivial() -> None:
    """The peer: a Serve application on the same proxy that reads the request body and returns a constant,
    so its latency is what Serve, HTTP and the load generator cost by themselves."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
    class Trivial:
        async def __call__(self, request: Request) -> JSONResponse:
            await request.body()
            return JSONResponse({"results": [], "timings_ms": {"total": 0.0}})

    serve.run(Trivial.bind(), name="trivial", route_prefix="/trivial")

    form_app = FastAPI()

    @form_app.post("/")
    async def parse(file: Annotated[UploadFile, File()], k: Annotated[int, Form(ge=1)] = 10) -> dict:
        await file.read()
        return {"results": [], "timings_ms": {"total": 0.0}}

    @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})  # the peers fit beside medret
    @serve.ingress(form_app)
    class TrivialForm:
        pass

    serve.run(TrivialForm.bind(), name="trivial-form", route_prefix="/trivial-form")  # type: ignore[attr-defined]


def batch_stats(url: str) -> tuple[float, float, float]:
    """(batches, queries, model seconds) so far, from the service's own histograms."""
    import urllib.request

    text = urllib.request.urlopen(url + "metrics", timeout=30).read().decode()

    def value(name: str) -> float:
        return float(text.split(name + " ")[1].split()[0]) if name + " " in text else 0.0

    return (
        value("medret_query_encode_batch_size_count"),
        value("medret_query_encode_batch_size_sum"),
        value("medret_query_model_seconds_sum"),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument(
        "--compare-batch-wait", action="store_true", help="also time c=1 uploads with Serve's 10 ms default"
    )
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import ray

    from medret.serve.config import ServiceConfig
    from medret.serve.deployment import start, stop
    from medret.storage.s3local import free_port

    tmp = tempfile.mkdtemp(prefix="medret-bench-serve-")
    ids, build_s = build_table(tmp, args.rows)
    print(f"built {args.rows:,} codes in {build_s:.1f} s at {tmp}", file=sys.stderr)
    pngs = payloads(256)
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    results = []
    waits = [0.0, 0.01] if args.compare_batch_wait else [0.0]
    for wait in waits:
        cfg = ServiceConfig(index=tmp, batch_wait_s=wait, max_ongoing_requests=256)
        url = start(cfg, port=free_port())
        deploy_trivial()
        t = time.perf_counter()
        asyncio.run(load(url, "upload", 1, 0.5, pngs, ids))  # first query loads the snapshot and the model
        asyncio.run(load(url, "byid", 1, 0.5, pngs, ids))
        warm_s = time.perf_counter() - t
        for c in args.concurrency if wait == 0.0 else [1]:
            for mode in ("trivial", "form", "upload", "byid") if wait == 0.0 else ("upload",):
                b0, q0, m0 = batch_stats(url)
                r = asyncio.run(load(url, mode, c, args.seconds, pngs, ids))
                b1, q1, m1 = batch_stats(url)
                r["batch_wait_s"] = wait
                r["mean_batch"] = (q1 - q0) / (b1 - b0) if b1 > b0 else 0.0
                r["model_ms_per_batch"] = 1e3 * (m1 - m0) / (b1 - b0) if b1 > b0 else 0.0
                results.append(r)
                print(json.dumps(r), file=sys.stderr)
        stop()
    ray.shutdown()
    cols = ["query", "batch wait", "concurrency", "requests", "req/s", "p50 ms", "p99 ms", "decode", "encode"]
    cols += ["search", "overhead", "mean batch", "model ms per batch"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * 13)
    for r in results:
        print(
            f"| {r['mode']} | {r['batch_wait_s'] * 1e3:.0f} ms | {r['concurrency']} | {r['requests']} | {r['rps']:.1f} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['decode_ms']:.1f} | {r['encode_ms']:.1f} "
            f"| {r['search_ms']:.1f} | {r['overhead_ms']:.1f} | {r['mean_batch']:.1f} | {r['model_ms_per_batch']:.1f} |"
        )
    meta = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "rows": args.rows,
        "build_s": build_s,
        "warmup_s": warm_s,
        "results": results,
    }
    print(f"\n{meta['command']} on {meta['machine']}, {meta['date']}; warm-up {warm_s:.1f} s")
    by = {(r["mode"], r["concurrency"], r["batch_wait_s"]): r for r in results}
    for c in args.concurrency:
        tr, fo, up = by.get(("trivial", c, 0.0)), by.get(("form", c, 0.0)), by.get(("upload", c, 0.0))
        if tr and up:
            print(
                f"c={c}: upload p50 {up['p50_ms']:.1f} ms = {up['p50_ms'] / tr['p50_ms']:.2f}x the trivial handler's "
                f"{tr['p50_ms']:.1f} ms; {up['rps']:.1f} req/s = {up['rps'] / tr['rps']:.2f}x its {tr['rps']:.1f}"
            )
        if tr and fo and up:
            print(
                f"c={c}: upload p50 = {up['p50_ms'] / fo['p50_ms']:.2f}x the form-parsing ingress's "
                f"{fo['p50_ms']:.1f} ms "
                f"(which is {fo['p50_ms'] / tr['p50_ms']:.2f}x the trivial handler's); "
                f"{up['rps'] / fo['rps']:.2f}x its req/s"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
