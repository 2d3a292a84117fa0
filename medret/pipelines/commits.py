"""The driver's side of the indexing job: counting each object's units home and committing whole objects.

Encoder actors write the code rows of each batch as uncommitted Lance fragments and send one
bookkeeping row per unit; :class:`Commits` waits until every unit of an object has arrived,
commits the objects whose fragments are complete (a fragment shared with an unfinished object
waits for it), then records them in the manifest. Quarantines are held until the run's share
of bad objects is known (a storm stops the job instead). :class:`Summary` is what a run reports.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from medret import kinds
from medret import observability as obs
from medret.errors import DataError, IndexStoreError, MedretError, QuarantineStormError
from medret.index.manifest import Entry, Manifest
from medret.index.store import CodeIndex
from medret.pipelines.config import IndexJobConfig
from medret.pipelines.sources import SourceObject
from medret.slides.store import sync_job_slides

log = logging.getLogger(__name__)


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
    moved: int = 0  # a routed run: objects whose kind now goes to another table, removed from this one
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
    tables: list[dict[str, Any]] = field(default_factory=list)  # a routed run: each table's own summary
    lesions: dict[str, Any] = field(default_factory=dict)  # the lesion table's reconcile (sketch search)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.tables:
            del d["tables"]
        if not self.lesions:
            del d["lesions"]
        d["stage_seconds"] = {k: round(v, 3) for k, v in self.stage_seconds.items()}
        d["seconds"] = round(self.seconds, 3)
        d["objects_per_s"] = round((self.indexed + self.quarantined) / self.seconds, 2) if self.seconds else 0.0
        d["items_per_s"] = round(self.items_written / self.seconds, 2) if self.seconds else 0.0
        return d


STAGE_COLUMNS = (("read", "read_s"), ("preprocess", "prep_s"), ("encode", "encode_s"), ("write", "write_s"))


@dataclass
class Batch:
    """One encoder call's bookkeeping (:func:`~medret.pipelines.stages.write`) as it reaches the driver."""

    units: int  # rows the call emitted (its block could in principle arrive split)
    seen: int = 0
    fragments: list[str] = field(default_factory=list)
    uris: set[str] = field(default_factory=set)  # objects with rows in its fragments

    @property
    def complete(self) -> bool:
        return self.seen == self.units


class Commits:
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
        self.batches: dict[str, Batch] = {}
        self.object_batches: dict[str, set[str]] = defaultdict(set)
        self.last = time.monotonic()

    def add(self, batch: pa.Table) -> None:
        for r in batch.to_pylist():
            b = self.batches.get(r["batch_id"])
            if b is None:
                b = self.batches[r["batch_id"]] = Batch(units=r["batch_units"])
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
        slides = [u for u in uris if kinds.get(self.objects[u].kind).tiles]
        if slides:  # their bags for slide search, from the tiles just committed
            try:
                sync_job_slides(self.index, slides, self.cfg.mosaic_config(), self.cfg.s3)
            except MedretError:
                raise
            except Exception as err:  # the tiles are committed; the job's final reconcile redoes the bags
                raise IndexStoreError(f"writing the slide bags at {self.index.uri}: {err}") from err
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
