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
import functools
import json
import logging
import posixpath
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from medret import observability as obs
from medret.config import save_resolved
from medret.errors import (
    ConfigError,
    DataError,
    IndexStoreError,
    InfrastructureError,
    JobStoppedError,
    MedretError,
    QuarantineStormError,
    StorageAuthError,
    StorageUnavailableError,
    StoreUnreachableError,
)
from medret.index.manifest import Entry, Manifest, reason_class
from medret.index.store import CodeIndex, FragmentTarget
from medret.models.encoder import EncoderConfig
from medret.models.pretrained import encoder_path
from medret.pipelines.config import DEFAULT_RECIPES, IndexJobConfig
from medret.pipelines.sources import SourceObject, list_source
from medret.pipelines.stages import Encode, StageContext, expand, load
from medret.runtime import ensure_ray
from medret.storage.objects import ObjectStore
from medret.storage.retry import RetryingStore, open_store
from medret.storage.uri import parse_uri

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Summary:
    source: str
    index: dict[str, Any]
    encoder_id: str
    incremental: bool
    objects_seen: int = 0
    unchanged: int = 0
    indexed: int = 0
    quarantined: int = 0
    skipped: int = 0
    deleted: int = 0
    retry_later: int = 0  # not indexed for a storage fault: left out of the manifest for the next run
    vanished: int = 0  # listed, then gone before it was read (the next incremental run removes it)
    items_written: int = 0
    tiles: int = 0
    bytes_read: int = 0
    commits: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    quarantine: list[dict[str, str]] = field(default_factory=list)
    stopped: str = ""  # why the run stopped before the end (nothing lost; the same command resumes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stage_seconds"] = {k: round(v, 3) for k, v in self.stage_seconds.items()}
        d["seconds"] = round(self.seconds, 3)
        d["objects_per_s"] = round((self.indexed + self.quarantined) / self.seconds, 2) if self.seconds else 0.0
        d["items_per_s"] = round(self.items_written / self.seconds, 2) if self.seconds else 0.0
        return d


def recipes_for(cfg: IndexJobConfig, encoder: EncoderConfig) -> dict[str, str]:
    from medret.preprocess.recipes import RECIPES

    out = {"raster": encoder.preprocess, "medmnist": encoder.preprocess, **DEFAULT_RECIPES, **cfg.recipes}
    for kind, name in out.items():
        if name not in RECIPES:
            raise ConfigError(f"recipes.{kind}: unknown preprocessing recipe {name!r}; known: {', '.join(RECIPES)}")
    return out


def _say(cfg: IndexJobConfig, msg: str) -> None:
    if cfg.progress:
        print(f"[medret] {msg}", flush=True)


def _done(entry: Entry | None, obj: SourceObject, encoder_id: str) -> bool:
    """Indexed or quarantined at this etag with this encoder; a quarantine for a storage fault
    (recorded by medret before it told those apart) is not done: it is retried."""
    return (
        entry is not None
        and entry.etag == obj.etag
        and entry.encoder_id == encoder_id
        and (entry.status == "indexed" or (entry.status == "quarantined" and reason_class(entry.error) == "object"))
    )


STAGE_COLUMNS = (("read", "read_s"), ("preprocess", "prep_s"), ("encode", "encode_s"), ("write", "write_s"))


@dataclass
class _Batch:
    """One encoder call's bookkeeping (:func:`~medret.pipelines.stages.write`) as it reaches the driver."""

    units: int  # rows the call emitted (its block could in principle arrive split)
    seen: int = 0
    fragments: list[str] = field(default_factory=list)
    uris: set[str] = field(default_factory=set)  # objects with rows in its fragments

    @property
    def complete(self) -> bool:
        return self.seen == self.units


class _Commits:
    """Tracks written units until whole objects are done, then commits their fragments in one place.

    Workers write fragments; the driver commits an object once every row of it is written,
    together with every fragment it has rows in. A fragment holding rows of an unfinished
    object waits for it, and so does every object with rows in that fragment.
    """

    def __init__(
        self,
        cfg: IndexJobConfig,
        index: CodeIndex,
        manifest: Manifest,
        known: dict[str, Entry],
        summary: Summary,
        objects: list[SourceObject],
    ):
        self.cfg, self.index, self.manifest, self.known, self.summary = cfg, index, manifest, known, summary
        self.objects = {o.uri: o for o in objects}
        self.unit_rows: dict[str, int] = defaultdict(int)
        self.object_units: dict[str, int] = defaultdict(int)
        self.ready: dict[str, None] = {}
        self.ready_items = 0  # items of the ready objects
        self.items: dict[str, int] = defaultdict(int)
        self.errors: dict[str, str] = {}  # the object's own fault: quarantined
        self.unreadable: dict[str, tuple[str, str]] = {}  # uri -> (fault, reason): storage faults, vanished
        self.held: list[Entry] = []  # quarantines not recorded until the run's share is known
        self.batches: dict[str, _Batch] = {}
        self.object_batches: dict[str, set[str]] = defaultdict(set)
        self.last = time.monotonic()

    def add(self, batch: pa.Table) -> None:
        for r in batch.to_pylist():
            b = self.batches.get(r["batch_id"])
            if b is None:
                b = self.batches[r["batch_id"]] = _Batch(units=r["batch_units"])
            b.seen += 1
            if r["fragments"]:
                b.fragments += json.loads(r["fragments"])
            uri, unit = r["uri"], r["unit_id"]
            if r["items"]:
                b.uris.add(uri)
                self.object_batches[uri].add(r["batch_id"])
                self.items[uri] += r["items"]
            if r["error"]:
                fault = r.get("fault") or "object"
                if fault == "object":
                    self.errors.setdefault(uri, r["error"])
                elif uri not in self.unreadable:
                    self.unreadable[uri] = (fault, r["error"])
            for stage, c in STAGE_COLUMNS:
                self.summary.stage_seconds[stage] = self.summary.stage_seconds.get(stage, 0.0) + r[c]
            self.summary.tiles += r["n_tiles"]
            self.summary.bytes_read += r["bytes_read"]
            obs.INGEST_TILES.inc(r["n_tiles"])
            obs.INGEST_BYTES.inc(r["bytes_read"])
            self.unit_rows[unit] += r["rows"]
            if self.unit_rows[unit] == r["unit_rows"]:
                del self.unit_rows[unit]
                self.object_units[uri] += 1
                if self.object_units[uri] == r["object_units"]:
                    del self.object_units[uri]
                    if uri in self.unreadable:  # never committed nor recorded: the next run reads it again
                        self._left_out(uri)
                    else:
                        self.ready[uri] = None
                        self.ready_items += self.items.get(uri, 0)
        if self.ready and (
            self.ready_items >= self.cfg.commit_rows or time.monotonic() - self.last >= self.cfg.commit_seconds
        ):
            self.commit()

    @property
    def infra_fault(self) -> tuple[str, str] | None:
        """``(where, reason)`` of the run's first storage fault: "infra" or "auth" (the source), or "index"."""
        return next(((f, r) for f, r in self.unreadable.values() if f in ("infra", "auth", "index")), None)

    def _left_out(self, uri: str) -> None:
        fault, _ = self.unreadable[uri]
        if fault == "gone":
            self.summary.vanished += 1
            log.warning("%s vanished from the source before it was read; not recorded", uri)
        else:
            self.summary.retry_later += 1

    def committable(self) -> set[str]:
        """The ready objects whose fragments hold no rows of unready objects (and so on, to a fixed point)."""
        ok = set(self.ready)
        while True:
            touched = {b for u in ok for b in self.object_batches.get(u, ())}
            bad = [b for b in touched if not self.batches[b].complete or not self.batches[b].uris <= ok]
            if not bad:
                return ok
            for b in bad:
                ok -= self.batches[b].uris

    def commit(self) -> None:
        self.last = time.monotonic()
        can = self.committable()
        uris = [u for u in self.ready if u in can]
        if not uris:
            return
        t0 = time.perf_counter()
        batch_ids = sorted({b for u in uris for b in self.object_batches.get(u, ())})
        fragments = [f for b in batch_ids for f in self.batches[b].fragments]
        errors = {u: self.errors[u] for u in uris if u in self.errors}
        try:
            # old items of every committed object go, the new fragments come: one commit
            self.index.commit_fragments(fragments, uris)
            half = [u for u in errors if self.items.get(u)]  # a slide with some good units: drop those too
            if half:
                self.index.delete_sources(half)
        except MedretError:
            raise
        except Exception as err:  # the fragments are written; only the index storage can fail here
            raise IndexStoreError(f"committing to the index {self.index.uri}: {err}") from err
        good = [u for u in uris if u not in errors]
        if errors and self.cfg.on_error == "fail":
            self._record(good, {})
            first = next(iter(errors.items()))
            raise DataError(f"{first[0]}: {first[1]} (on_error=fail stops the job; {len(errors)} bad object(s))")
        try:
            self._record(uris, errors)
        except MedretError:
            raise
        except Exception as err:  # committed but not recorded: the next run replaces them, same ids
            raise IndexStoreError(f"recording the manifest at {self.index.uri}: {err}") from err
        for u in uris:
            del self.ready[u]
            self.ready_items -= self.items.pop(u, 0)
            self.errors.pop(u, None)
            self.object_batches.pop(u, None)
        for b in batch_ids:
            del self.batches[b]
        if self.cfg.compact and self.summary.commits % self.cfg.compact_every == 0:
            try:
                self.index.compact()
            except Exception as err:
                raise IndexStoreError(f"compacting the index {self.index.uri}: {err}") from err
        dt = time.perf_counter() - t0
        self.summary.stage_seconds["commit"] = self.summary.stage_seconds.get("commit", 0.0) + dt
        obs.INGEST_COMMIT_SECONDS.observe(dt)

    def _record(self, uris: list[str], errors: dict[str, str]) -> None:
        """The manifest rows of committed objects, and the job's counts.

        Quarantines wait in ``held`` until ``quarantine_check_min`` objects of the run are
        decided, then go in only while their share stays within ``max_quarantine_share``.
        """
        entries = []
        n_items = 0
        for uri in uris:
            entry = self._entry(uri, errors.get(uri, ""))
            if entry.status == "quarantined":
                if self.cfg.on_error == "skip":
                    log.warning("skipped %s: %s", uri, entry.error)
                    self.summary.skipped += 1
                else:
                    self.held.append(entry)
                continue
            self.summary.indexed += 1
            n_items += entry.items
            obs.INGEST_OBJECTS.labels(status="indexed").inc()
            entries.append(entry)
        self.manifest.record(entries)
        self.summary.items_written += n_items
        self.summary.commits += 1
        obs.INGEST_ITEMS.inc(n_items)
        self.release_quarantines(final=False)

    def release_quarantines(self, *, final: bool) -> None:
        """Record the held quarantines, or stop the job when they are too large a share of the run."""
        if not self.held:
            return
        bad = self.summary.quarantined + len(self.held)
        decided = self.summary.indexed + bad
        if decided < self.cfg.quarantine_check_min and not final:
            return
        if decided >= self.cfg.quarantine_check_min and bad > self.cfg.max_quarantine_share * decided:
            reasons = "; ".join(sorted({e.error for e in self.held[:200]})[:3])
            self.summary.retry_later += len(self.held)
            self.held = []
            raise QuarantineStormError(
                f"stopped: {bad} of the {decided} objects decided so far ({bad / decided:.0%}) could not be "
                f"read, more than max_quarantine_share={self.cfg.max_quarantine_share:g}. That looks like a "
                "systematic fault (a wrong route or recipe, a store answering with errors, an encrypted "
                "archive), not bad files, so none of them was quarantined. Reasons, e.g.: "
                f"{reasons}. Fix the cause and run the same command again, or raise max_quarantine_share "
                "if they really are bad files.",
                self.summary,
            )
        for entry in self.held:
            log.warning("quarantined %s: %s", entry.uri, entry.error)
            self.summary.quarantined += 1
            self.summary.quarantine.append({"uri": entry.uri, "error": entry.error})
            obs.INGEST_OBJECTS.labels(status="quarantined").inc()
        self.manifest.record(self.held)
        self.held = []

    def _entry(self, uri: str, error: str) -> Entry:
        obj = self.objects[uri]
        prev = self.known.get(uri)
        return Entry(
            uri=uri,
            source=self.cfg.source,
            etag=obj.etag,
            size=obj.size,
            kind=obj.kind,
            status="quarantined" if error else "indexed",
            items=0 if error else self.items.get(uri, 0),
            encoder_id=self.index.encoder_id,
            error=error,
            attempts=(prev.attempts if prev and prev.etag == obj.etag else 0) + 1,
        )


def _objects_dataset(
    todo: list[SourceObject], cfg: IndexJobConfig, ctx: StageContext, ckpt: bytes, target: FragmentTarget
) -> Any:
    import ray.data

    r = cfg.resources
    items = [
        {
            "uri": o.uri,
            "key": o.key,
            "etag": o.etag,
            "size": o.size,
            "kind": o.kind,
            "meta": json.dumps(o.meta) if o.meta else "",
            "members": json.dumps(o.members) if o.members else "",
        }
        for o in todo
    ]
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

    Raises :class:`~medret.errors.JobStoppedError` when the run stops early with nothing lost
    (a store unreachable for longer than ``storage_retry_s``, too many unreadable objects):
    the same call resumes it.
    """
    t_start = time.perf_counter()
    if cfg.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(cfg.metrics_port)
    out = Path(cfg.out)
    save_resolved(cfg, out)
    ckpt_path = encoder_path(cfg.encoder)
    ckpt = ckpt_path.read_bytes()
    with np.load(ckpt_path, allow_pickle=False) as z:
        encoder = EncoderConfig.from_json(bytes(z["config"]))
    recipes = recipes_for(cfg, encoder)
    store = RetryingStore(open_store(cfg.source, cfg.s3, dicomweb=cfg.dicomweb), budget_s=cfg.storage_retry_s)
    summary = Summary(
        source=cfg.source,
        index={"uri": cfg.index.uri, "table": cfg.index.table},
        encoder_id=encoder.encoder_id,
        incremental=cfg.incremental,
    )
    try:
        index, manifest = _open_index(cfg, encoder, str(ckpt_path), recipes)
        todo, known = _plan(cfg, store, index, manifest, summary, encoder)
        if todo:
            _run_pipeline(cfg, todo, index, manifest, known, summary, recipes, encoder, store, ckpt)
        _finish(cfg, index, summary)
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
    cfg: IndexJobConfig, encoder: EncoderConfig, ckpt_path: str, recipes: dict[str, str]
) -> tuple[CodeIndex, Manifest]:
    def both() -> tuple[CodeIndex, Manifest]:
        index = CodeIndex.create(
            cfg.index.uri,
            encoder,
            table=cfg.index.table,
            checkpoint=cfg.encoder if cfg.encoder == "default" else ckpt_path,
            recipes={"kinds": recipes, "tiling": cfg.tiling.model_dump(mode="json")},
            s3=cfg.s3,
            exist_ok=True,
        )
        return index, Manifest(cfg.index.uri, cfg.index.table, cfg.s3)

    return _index_call(f"opening the index {cfg.index.uri}", both)


def _plan(
    cfg: IndexJobConfig, store: ObjectStore, index: CodeIndex, manifest: Manifest, summary: Summary, encoder: Any
) -> tuple[list[SourceObject], dict[str, Entry]]:
    """List the source, compare with the manifest: what to index; an incremental run drops what is gone."""
    t = time.perf_counter()
    objects, sidecars = list_source(store, cfg.all_routes())
    summary.stage_seconds["list"] = time.perf_counter() - t
    summary.objects_seen = len(objects)
    obs.INGEST_OBJECTS.labels(status="seen").inc(len(objects))
    known = _index_call(f"reading the manifest at {cfg.index.uri}", manifest.entries)
    listed = {o.uri for o in objects}
    if cfg.only:
        only = set(cfg.only)
        missing = sorted(only - listed)
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
        f"{cfg.source}: {len(objects)} objects ({len(sidecars)} sidecars), {len(todo)} to index, "
        f"{summary.unchanged} unchanged -> {cfg.index.uri} table {cfg.index.table!r} ({encoder.encoder_id})",
    )
    if cfg.incremental and not cfg.only:
        root = store.uri_of("").rstrip("/") + "/"
        # a DICOMweb source narrowed by a path or filters lists part of its server: only what this
        # same source indexed can have been deleted from it
        narrowed = parse_uri(cfg.source)
        scoped = narrowed.is_dicomweb and bool(narrowed.path or narrowed.query)

        def ours(u: str, e: Entry) -> bool:
            return e.status != "deleted" and u.startswith(root) and (not scoped or e.source == cfg.source)

        gone = sorted(u for u, e in known.items() if ours(u, e) and u not in listed)
        held = sum(1 for u, e in known.items() if ours(u, e))
        if gone and not objects:
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
    cfg: IndexJobConfig, index: CodeIndex, manifest: Manifest, known: dict[str, Entry], gone: list[str]
) -> None:
    index.delete_sources(gone)
    manifest.record(
        Entry(
            uri=u,
            source=cfg.source,
            etag=known[u].etag,
            size=known[u].size,
            kind=known[u].kind,
            status="deleted",
            items=0,
            encoder_id=index.encoder_id,
            attempts=known[u].attempts,
        )
        for u in gone
    )


def _finish(cfg: IndexJobConfig, index: CodeIndex, summary: Summary) -> None:
    """Compact what the run wrote and note the table's state."""
    if cfg.compact and summary.commits:
        t = time.perf_counter()
        merged = _index_call(f"compacting the index {cfg.index.uri}", index.compact)
        summary.stage_seconds["compact"] = time.perf_counter() - t
        _say(cfg, f"compacted the table: {merged} fewer fragments, {index.fragments} now")

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
        store=store, input_size=encoder.input_size, recipes=recipes, tiling=cfg.tiling, pixel_budget=cfg.pixel_budget
    )
    commits = _Commits(cfg, index, manifest, known, summary, todo)
    ds = _objects_dataset(todo, cfg, ctx, ckpt, index.fragment_target())
    t_report = time.monotonic()
    # breaking out of the loop shuts Ray Data's streaming executor down (GeneratorExit into its iterator)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2):
        commits.add(batch)
        if commits.infra_fault:
            break  # a store is down past the retry budget: stop reading, keep what is whole
        if cfg.progress and time.monotonic() - t_report > 5:
            t_report = time.monotonic()
            done = summary.indexed + summary.quarantined + summary.skipped
            _say(cfg, f"{done}/{len(todo)} objects committed, {summary.items_written:,} items")
    commits.commit()
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
