"""The main job: make everything under a source searchable, and keep it so.

One streaming Ray Data pipeline per run::

    list (driver, paginated, etags) -> plan against the manifest
      -> expand  (tasks: sniff unknown kinds; slides -> units of tissue tiles)
      -> load    (tasks: read + decode + preprocess, small objects batched)
      -> Encode  (actor pool: model loaded once per actor, batched, GPU when asked;
                  writes each batch's codes as an uncommitted Lance fragment of the table)
      -> driver: commits the fragments of finished objects in batches

Workers write, one place commits: a commit deletes the committed objects' old items
and adds their new fragments in one Lance transaction, then records the objects in
the manifest. A crash before a commit leaves the table as it was (the written files
stay unreferenced); a crash after it but before the manifest row makes the rerun
replace those items again. Item ids are derived from the object URI, so nothing is
lost and nothing is duplicated. ``incremental`` also removes the items of objects
that disappeared from the source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import posixpath
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from medret import observability as obs
from medret.config import save_resolved
from medret.errors import (
    IndexStoreError,
    InfrastructureError,
    JobStoppedError,
    MedretError,
    StorageAuthError,
    StorageUnavailableError,
    StoreUnreachableError,
)
from medret.index.manifest import Entry, Manifest, reason_class
from medret.index.store import CodeIndex, FragmentTarget
from medret.models.encoder import EncoderConfig, checkpoint_config
from medret.models.pretrained import encoder_path
from medret.pipelines.commits import Commits, Summary
from medret.pipelines.config import IndexJobConfig
from medret.pipelines.sources import Listed, SourceObject
from medret.pipelines.stages import Encode, StageContext, expand, load
from medret.runtime import ensure_ray
from medret.storage.objects import ObjectStore
from medret.storage.retry import RetryingStore, open_store
from medret.storage.uri import parse_uri

log = logging.getLogger(__name__)
T = TypeVar("T")


def recipes_for(cfg: IndexJobConfig, encoder: EncoderConfig) -> dict[str, str]:
    """Kind -> recipe this job runs (and records in the table)."""
    from medret import kinds

    return kinds.recipes_for(encoder.preprocess, cfg.recipes)


def recorded_recipes(cfg: IndexJobConfig, encoder: EncoderConfig, recipes: dict[str, str]) -> dict[str, Any]:
    """What the table records of this job's preprocessing: kind -> recipe, the slide tiling, and the options
    the recipes were given beyond the encoder's input size (``channels``, only when not grey, so a grey
    table records what it always did and takes more backfills)."""
    out: dict[str, Any] = {"kinds": recipes, "tiling": cfg.tiling.model_dump(mode="json")}
    if encoder.channels != 1:
        out["options"] = {"channels": encoder.channels}
    return out


def _say(cfg: IndexJobConfig, msg: str) -> None:
    """A progress line, on stderr (stdout carries only the summary)."""
    if cfg.progress:
        print(f"[medret] {msg}", file=sys.stderr, flush=True)


def _progress(cfg: IndexJobConfig, total: int) -> Any:
    """One live bar of committed objects (count, rate, ETA) on stderr; a line every 30 s when not a terminal."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc="[medret] committed",
        unit="obj",
        file=sys.stderr,
        disable=not cfg.progress,
        mininterval=0.5 if tty else 30.0,
        dynamic_ncols=tty,
    )


def _done(entry: Entry | None, obj: SourceObject, encoder_id: str) -> bool:
    """Indexed or quarantined at this etag with this encoder; a quarantine for a storage fault
    (recorded by medret before it told those apart) is not done: it is retried."""
    return (
        entry is not None
        and entry.etag == obj.etag
        and entry.encoder_id == encoder_id
        and (entry.status == "indexed" or (entry.status == "quarantined" and reason_class(entry.error) == "object"))
    )


def _objects_dataset(
    todo: list[SourceObject], cfg: IndexJobConfig, ctx: StageContext, ckpt: bytes, target: FragmentTarget
) -> Any:
    import ray.data

    r = cfg.resources
    items = [o.row() for o in todo]
    blocks = max(1, min(len(items), (len(items) + r.read_batch - 1) // r.read_batch, 1000))
    ds: Any = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.flat_map(functools.partial(expand, ctx=ctx), num_cpus=r.read_cpus)
    # Reading must not be fused into the encoder actors: it scales with CPU tasks, encoding with
    # the (few, maybe GPU) actors. Ray Data fuses a task map into an actor map only when their
    # resource requests are equal; the read tasks' memory reservation makes them differ.
    ds = ds.map_batches(
        functools.partial(load, ctx=ctx),
        batch_size=r.read_batch,
        num_cpus=r.read_cpus,
        memory=r.read_memory_mb * 2**20,
    )
    from ray.data import ActorPoolStrategy

    # the encoder actors also write the codes as fragments of the table; the driver only commits them
    return ds.map_batches(
        Encode,
        fn_constructor_kwargs={"checkpoint": ckpt, "threads": r.encode_threads, "target": target},
        batch_size=r.encode_batch,
        compute=ActorPoolStrategy(min_size=r.encode_actors[0], max_size=r.encode_actors[1]),
        num_cpus=r.encode_cpus,
        num_gpus=r.encode_gpus or None,
    )


def run_index(cfg: IndexJobConfig) -> Summary:
    """Index (or bring up to date) ``cfg.index`` from ``cfg.source``; returns what happened.

    With ``cfg.encoders`` (or ``cfg.tables``) each kind goes to its own encoder and table
    (:mod:`medret.pipelines.routed`); otherwise one encoder writes ``cfg.index.table``.

    Raises :class:`~medret.errors.JobStoppedError` when the run stops early with nothing lost
    (a store unreachable for longer than ``storage_retry_s``, too many unreadable objects):
    the same call resumes it.
    """
    if cfg.routed:
        from medret.pipelines.routed import run_routed

        return run_routed(cfg)
    if cfg.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(cfg.metrics_port)
    return index_table(cfg)


def index_table(cfg: IndexJobConfig, listed: Listed | None = None, serves: tuple[str, ...] | None = None) -> Summary:
    """One table's run: ``cfg.encoder`` into ``cfg.index.table``, from ``listed`` (else the source is listed
    here). ``serves``: the kinds a routed run sends to this table, recorded in its metadata."""
    t_start = time.perf_counter()
    out = Path(cfg.out)
    save_resolved(cfg, out)
    ckpt_path = encoder_path(cfg.encoder)
    ckpt = ckpt_path.read_bytes()
    encoder = checkpoint_config(ckpt_path)
    recipes = recipes_for(cfg, encoder)
    store = RetryingStore(open_store(cfg.source, cfg.s3, dicomweb=cfg.dicomweb), budget_s=cfg.storage_retry_s)
    summary = Summary(
        source=cfg.source,
        index={"uri": cfg.index.uri, "table": cfg.index.table},
        encoder_id=encoder.encoder_id,
        incremental=cfg.incremental,
    )
    try:
        index, manifest = _open_index(cfg, encoder, str(ckpt_path), recipes, serves)
        _check_lesions(cfg)
        listed = listed or _list(cfg, store)
        todo, known = _plan(cfg, store, index, manifest, summary, encoder, listed)
        if todo:
            _run_pipeline(cfg, todo, index, manifest, known, summary, recipes, encoder, store, ckpt)
        _finish(cfg, index, summary, listed, store)
    except InfrastructureError as err:
        stop = StoreUnreachableError(_unreachable(cfg, store, err, summary), summary)
        _stopped(out, summary, stop, t_start)
        raise stop from err
    except JobStoppedError as err:
        _stopped(out, summary, err, t_start)
        raise
    summary.seconds = time.perf_counter() - t_start
    obs.INGEST_ITEMS_PER_SECOND.set(summary.items_written / summary.seconds if summary.seconds else 0.0)
    _write_outputs(out, summary)
    return summary


def _index_call(what: str, fn: Callable[[], T]) -> T:
    """``fn()`` against the index storage: anything but medret's own errors is that storage failing."""
    try:
        return fn()
    except MedretError:
        raise
    except Exception as err:
        raise IndexStoreError(f"{what}: {err}") from err


def _open_index(
    cfg: IndexJobConfig,
    encoder: EncoderConfig,
    ckpt_path: str,
    recipes: dict[str, str],
    serves: tuple[str, ...] | None = None,
) -> tuple[CodeIndex, Manifest]:
    def both() -> tuple[CodeIndex, Manifest]:
        index = CodeIndex.create(
            cfg.index.uri,
            encoder,
            table=cfg.index.table,
            checkpoint=cfg.encoder if cfg.encoder == "default" else ckpt_path,
            recipes=recorded_recipes(cfg, encoder, recipes),
            s3=cfg.s3,
            exist_ok=True,
        )
        if serves is not None and index.serves != tuple(sorted(serves)):
            index.set_serves(serves)
        return index, Manifest(cfg.index.uri, cfg.index.table, cfg.s3)

    return _index_call(f"opening the index {cfg.index.uri}", both)


def _check_lesions(cfg: IndexJobConfig) -> None:
    """A lesion config other than the table's lesion table's is refused before anything is written."""
    from medret.sketch.ingest import check_lesion_config

    config = cfg.lesion_config()
    _index_call(
        f"reading the lesion table at {cfg.index.uri}",
        lambda: check_lesion_config(cfg.index.uri, cfg.index.table, config, cfg.s3),
    )


def _list(cfg: IndexJobConfig, store: ObjectStore) -> Listed:
    return Listed.of(store, cfg.all_routes())


def _plan(
    cfg: IndexJobConfig,
    store: ObjectStore,
    index: CodeIndex,
    manifest: Manifest,
    summary: Summary,
    encoder: Any,
    listed: Listed,
) -> tuple[list[SourceObject], dict[str, Entry]]:
    """Compare the listing (this run's or a routed run's) with the manifest: what to index; an incremental
    run drops what is gone, and a routed run what now goes to another table."""
    objects = listed.objects
    summary.stage_seconds["list"] = listed.seconds
    summary.objects_seen = len(objects)
    obs.INGEST_OBJECTS.labels(status="seen").inc(len(objects))
    known = _index_call(f"reading the manifest at {cfg.index.uri}", manifest.entries)
    if cfg.only:
        only = set(cfg.only)
        missing = sorted(only - listed.uris)
        if missing:
            log.warning("%d requested object(s) are no longer in the source: %s", len(missing), missing[:5])
        todo = [o for o in objects if o.uri in only]
    else:
        todo = [o for o in objects if cfg.force or not _done(known.get(o.uri), o, encoder.encoder_id)]
    if cfg.max_objects is not None:
        todo = todo[: cfg.max_objects]
    summary.unchanged = len(objects) - len(todo) if not cfg.only else 0
    obs.INGEST_OBJECTS.labels(status="unchanged").inc(summary.unchanged)
    _say(
        cfg,
        f"{cfg.source}: {len(objects)} objects ({listed.sidecars} sidecars), {len(todo)} to index, "
        f"{summary.unchanged} unchanged -> {cfg.index.uri} table {cfg.index.table!r} ({encoder.encoder_id})",
    )
    if listed.table_of is not None and not cfg.only:
        _move_out(cfg, index, manifest, known, listed.table_of, summary)
    if cfg.incremental and not cfg.only:
        root = store.uri_of("").rstrip("/") + "/"
        # a DICOMweb source narrowed by a path or filters lists part of its server: only what this
        # same source indexed can have been deleted from it
        narrowed = parse_uri(cfg.source)
        scoped = narrowed.is_dicomweb and bool(narrowed.path or narrowed.query)

        def ours(u: str, e: Entry) -> bool:
            gone_already = e.status in ("deleted", "moved")
            return not gone_already and u.startswith(root) and (not scoped or e.source == cfg.source)

        gone = sorted(u for u, e in known.items() if ours(u, e) and u not in listed.uris)
        held = sum(1 for u, e in known.items() if ours(u, e))
        if gone and not listed.uris:
            raise JobStoppedError(
                f"stopped: the source {cfg.source} lists no objects, yet the index holds {len(gone)} from it; "
                "refusing to remove them all as deleted (a share not mounted, a wrong prefix, or credentials "
                "that see an empty bucket?). Nothing was changed. If the source really is empty now, remove the "
                "table instead.",
                summary,
            )
        if len(gone) > 1 and len(gone) > cfg.max_delete_share * held:
            folders = sorted({posixpath.dirname(u[len(root) :]) or "." for u in gone})
            raise JobStoppedError(
                f"stopped: the source {cfg.source} no longer lists {len(gone)} of the {held} objects indexed from "
                f"it ({len(gone) / held:.0%}), more than max_delete_share={cfg.max_delete_share:g}; refusing to "
                f"remove them (a folder not mounted, a wrong prefix or filter?). Missing under: "
                f"{', '.join(folders[:5])}{' ...' if len(folders) > 5 else ''}. Nothing was changed. If they really "
                "were deleted, run again with max_delete_share=1.",
                summary,
            )
        if gone:
            what = f"removing deleted objects from {cfg.index.uri}"
            _index_call(what, lambda: _forget(cfg, index, manifest, known, gone))
            summary.deleted = len(gone)
            obs.INGEST_OBJECTS.labels(status="deleted").inc(len(gone))
            _say(cfg, f"removed {len(gone)} deleted object(s) from the index")
    return todo, known


def _forget(
    cfg: IndexJobConfig,
    index: CodeIndex,
    manifest: Manifest,
    known: dict[str, Entry],
    gone: list[str],
    status: str = "deleted",
    why: dict[str, str] | None = None,
) -> None:
    index.delete_sources(gone)
    manifest.record(
        Entry(
            uri=u,
            source=cfg.source,
            etag=known[u].etag,
            size=known[u].size,
            kind=known[u].kind,
            status=status,
            items=0,
            encoder_id=index.encoder_id,
            error=(why or {}).get(u, ""),
            attempts=known[u].attempts,
        )
        for u in gone
    )


def _move_out(
    cfg: IndexJobConfig,
    index: CodeIndex,
    manifest: Manifest,
    known: dict[str, Entry],
    table_of: dict[str, str],
    summary: Summary,
) -> None:
    """Remove the objects this table holds whose kind a routed run now sends to another table (which indexes
    them); objects of kinds it never held are not touched, nor are objects the source no longer lists."""
    here = cfg.index.table
    held = ("indexed", "quarantined")
    moved = sorted(u for u, e in known.items() if e.status in held and table_of.get(u, here) != here)
    if not moved:
        return
    why = {u: f"its kind is now indexed into table {table_of[u]!r}" for u in moved}
    what = f"removing re-routed objects from {cfg.index.uri} table {here!r}"
    _index_call(what, lambda: _forget(cfg, index, manifest, known, moved, "moved", why))
    for u in moved:
        known[u] = dataclasses.replace(known[u], status="moved", items=0)
    summary.moved = len(moved)
    obs.INGEST_OBJECTS.labels(status="moved").inc(len(moved))
    _say(cfg, f"removed {len(moved)} object(s) whose kind now goes to another table from table {here!r}")


def _finish(cfg: IndexJobConfig, index: CodeIndex, summary: Summary, listed: Listed, store: ObjectStore) -> None:
    """Compact what the run wrote, bring the slide bags and the lesion table level with it, note the table's
    state."""
    if cfg.compact and summary.commits:
        t = time.perf_counter()
        merged = _index_call(f"compacting the index {cfg.index.uri}", index.compact)
        summary.stage_seconds["compact"] = time.perf_counter() - t
        _say(cfg, f"compacted the table: {merged} fewer fragments, {index.fragments} now")

    if summary.commits or summary.deleted or summary.moved:  # ids and sources looked up by index, not by scan
        t = time.perf_counter()
        done = _index_call(f"indexing item ids at {cfg.index.uri}", index.ensure_scalar_indices)
        summary.stage_seconds["scalar_index"] = time.perf_counter() - t
        if "created" in done.values():
            _say(cfg, f"indexed the table's {', '.join(c for c, s in done.items() if s == 'created')} columns")

    def slides() -> None:  # every slide with tiles has exactly one current bag, no bag outlives its slide
        from medret.slides.store import sync_job_slides

        done = sync_job_slides(index, None, cfg.mosaic_config(), cfg.s3)
        if done and (done["written"] or done["deleted"]):
            _say(cfg, f"slide bags: {done['written']} made, {done['deleted']} removed, {done['slides']} slides")

    _index_call(f"writing the slide bags at {cfg.index.uri}", slides)

    def lesions() -> None:  # every volume with a lesion mask has the rows of its current image and mask
        from medret.sketch.ingest import sync_lesions

        done = sync_lesions(
            index,
            listed.objects,
            store,
            cfg.lesion_config(),
            s3=cfg.s3,
            on_error=cfg.on_error,
            say=lambda m: _say(cfg, m),
        )
        if done is not None:
            summary.lesions = done.as_dict()
            if done.written or done.removed or done.failed:
                _say(
                    cfg,
                    f"lesion table: {done.written} volume(s) made, {done.removed} removed, {len(done.failed)} bad "
                    f"mask(s), {done.volumes} volume(s) with a mask",
                )

    _index_call(f"writing the lesion table at {cfg.index.uri}", lesions)

    def state() -> None:
        index.refresh()
        summary.index.update(rows=index.count(), version=index.version, fragments=index.fragments)

    _index_call(f"reading the index {cfg.index.uri}", state)


def _unreachable(cfg: IndexJobConfig, store: ObjectStore, err: BaseException, summary: Summary) -> str:
    which = f"the index storage {cfg.index.uri}" if isinstance(err, IndexStoreError) else f"the source {store.name}"
    if isinstance(err, StorageAuthError):
        return (
            f"stopped: {which} refused medret's credentials: {err}. Nothing was lost and nothing was quarantined "
            f"for it: {summary.indexed} object(s) were indexed and committed before the stop. Fix the credentials "
            "and run the same command again."
        )
    return (
        f"stopped: {which} is unreachable, retried for storage_retry_s={cfg.storage_retry_s:g} s: {err}. "
        f"Nothing was lost and nothing was quarantined for it: {summary.indexed} object(s) were indexed and "
        f"committed before the stop, and every object not committed is left for the next run. "
        "Run the same command again to resume once the store answers."
    )


def _stopped(out: Path, summary: Summary, err: JobStoppedError, t_start: float) -> None:
    summary.stopped = str(err)
    summary.seconds = time.perf_counter() - t_start
    log.info("%s", err)  # the caller shows it (the command line, the job entrypoints)
    with contextlib.suppress(Exception):  # the summary is a courtesy; the stop is what matters
        _write_outputs(out, summary)


def _run_pipeline(
    cfg: IndexJobConfig,
    todo: list[SourceObject],
    index: CodeIndex,
    manifest: Manifest,
    known: dict[str, Entry],
    summary: Summary,
    recipes: dict[str, str],
    encoder: EncoderConfig,
    store: Any,
    ckpt: bytes,
) -> None:
    import ray.data

    ensure_ray(log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = cfg.progress
    ctx = StageContext(
        store=store,
        input_size=encoder.input_size,
        recipes=recipes,
        tiling=cfg.tiling,
        pixel_budget=cfg.pixel_budget,
        channels=encoder.channels,
    )
    commits = Commits(cfg, index, manifest, known, summary, todo)
    ds = _objects_dataset(todo, cfg, ctx, ckpt, index.fragment_target())
    bar = _progress(cfg, len(todo))
    try:
        # breaking out of the loop shuts Ray Data's streaming executor down (GeneratorExit into its iterator)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2):
            commits.add(batch)
            if commits.infra_fault:
                break  # a store is down past the retry budget: stop reading, keep what is whole
            bar.update(summary.indexed + summary.quarantined + summary.skipped - bar.n)
            bar.set_postfix(items=summary.items_written, refresh=False)
        commits.commit()
        bar.set_postfix(items=summary.items_written, refresh=False)
        bar.update(summary.indexed + summary.quarantined + summary.skipped - bar.n)
    finally:
        bar.close()
    fault = commits.infra_fault
    if fault:  # a run cut short decides no share: its held quarantines wait for the next run
        summary.retry_later += len(commits.held)
        commits.held = []
        kind = {"index": IndexStoreError, "auth": StorageAuthError}.get(fault[0], StorageUnavailableError)
        raise kind(fault[1])
    commits.release_quarantines(final=True)
    leftover = len(commits.object_units) + len(commits.unit_rows)
    if commits.ready and commits.unreadable:  # objects sharing fragments with one that vanished mid-read
        raise JobStoppedError(
            f"stopped: {len(commits.ready)} object(s) share written fragments with objects that vanished while "
            "being read; they were not committed. Run the same command again to index them.",
            summary,
        )
    if leftover or commits.ready:  # cannot happen unless a stage lost rows; never commit half an object
        raise RuntimeError(f"{leftover + len(commits.ready)} units never completed; nothing of them was committed")
    done = summary.indexed + summary.quarantined + summary.skipped
    _say(
        cfg,
        f"committed {done} objects: {summary.indexed} indexed, {summary.quarantined} quarantined, "
        f"{summary.items_written:,} items in {summary.commits} commits",
    )


def _write_outputs(out: Path, summary: Summary) -> None:
    from prometheus_client import REGISTRY, write_to_textfile

    out.mkdir(parents=True, exist_ok=True)
    for stage, s in summary.stage_seconds.items():
        obs.INGEST_STAGE_SECONDS.labels(stage=stage).inc(s)
    (out / "index-summary.json").write_text(json.dumps(summary.to_dict(), indent=1))
    write_to_textfile(str(out / "metrics.prom"), REGISTRY)


def job_main(doc: str, *, incremental: bool, argv: list[str] | None = None) -> None:
    """The command line of ``jobs/backfill.py`` and ``jobs/incremental.py``: a config plus dotted overrides."""
    from medret.config import job_args, load_config

    config, overrides = job_args(doc, argv)
    try:
        summary = run_index(load_config(IndexJobConfig, config, overrides={"incremental": incremental, **overrides}))
    except JobStoppedError as err:  # nothing lost: resubmitting the same job resumes it
        if err.summary is not None:
            print(json.dumps(err.summary.to_dict(), indent=1))  # type: ignore[attr-defined]
        print(f"{'incremental' if incremental else 'backfill'} job: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except MedretError as err:  # a bad config value or source: the message says which; no traceback
        raise SystemExit(f"{'incremental' if incremental else 'backfill'} job: {err}") from None
    print(json.dumps(summary.to_dict(), indent=1))
