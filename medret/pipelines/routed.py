"""A routed indexing job: each kind of object to the encoder made for it, each encoder into a table of its own.

``encoders: {wsi: histology.npz, dicom: xray.npz, default: default}`` in the job config (``--encoder
KIND=ENCODER`` on the command line) sends each kind to its encoder; ``default`` (or ``*``; else the job's
``encoder``) takes every kind no key names. Tables (:func:`plan_tables`): the default encoder writes
``index.table``, any other ``<index.table>-<preset or encoder name>-<bits>b``, unless ``tables: {wsi:
slides}`` names one. Each table records the kinds it takes (``medret.serves`` in its metadata), which is
how the query service picks the table for an upload.

The source is listed once. Objects that only their content can place (no known extension, ``.tif``) get
their kind here, on the driver: the one a table's manifest recorded at the same etag, else from their first
bytes (a TIFF is copied to the local cache to tell a slide from a flat image); an object that cannot be
told goes to the default table, where it is quarantined with the reason. Each table then runs the one-table
job (:func:`~medret.pipelines.backfill.index_table`) on its own objects against its own manifest, one after
the other: a table whose objects are unchanged reads nothing, so adding an encoder for one kind re-indexes
that kind only. The objects a table holds whose kind now goes to another table are removed from it
(manifest status ``moved``); ``incremental`` removes objects deleted from the source from the table that
held them, and ``max_delete_share`` is judged per table (a modality's folder not mounted is caught even in
an archive of many other objects).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medret import kinds
from medret.config import save_resolved
from medret.errors import (
    ConfigError,
    EncoderMismatchError,
    InfrastructureError,
    JobStoppedError,
    StoreUnreachableError,
    TableNotFoundError,
    fault_of,
)
from medret.index.manifest import Entry, Manifest
from medret.models.encoder import EncoderConfig, checkpoint_config
from medret.models.pretrained import encoder_path
from medret.pipelines.backfill import _index_call, _say, _unreachable, index_table
from medret.pipelines.commits import Summary
from medret.pipelines.config import DEFAULT_ROUTE, IndexJobConfig
from medret.pipelines.sources import Listed, SourceObject, list_source
from medret.storage.objects import ObjectStore
from medret.storage.retry import RetryingStore, open_store

log = logging.getLogger(__name__)

SNIFF_THREADS = 16
#: the counts of a table's summary that add up into the job's
COUNTS = (
    "objects_seen", "unchanged", "indexed", "quarantined", "skipped", "deleted", "moved", "retry_later", "vanished",
    "items_written", "tiles", "bytes_read", "commits",
)  # fmt: skip


@dataclass(frozen=True)
class TableRoute:
    """One table of a routed job: the encoder that writes it and the kinds of object it takes."""

    table: str
    encoder: str  # as the job config names it: 'default', a file, a training folder
    config: EncoderConfig
    kinds: tuple[str, ...]
    default: bool  # also takes the objects whose kind cannot be told


def table_name(prefix: str, encoder: EncoderConfig) -> str:
    """The table an encoder writes in a routed job unless one is named: ``<prefix>-<preset or name>-<bits>b``.

    >>> table_name("codes", EncoderConfig(name="hashnet", bits=48, extra={"preset": "histology"}))
    'codes-histology-48b'
    >>> table_name("codes", EncoderConfig(name="pca-itq", bits=16))
    'codes-pca-itq-16b'
    """
    tag = re.sub(r"[^A-Za-z0-9_-]+", "-", str(encoder.extra.get("preset") or encoder.name)).strip("-") or "encoder"
    name = f"{prefix}-{tag}-{encoder.bits}b"
    if len(name) > 64:
        raise ConfigError(f"table name {name!r} is over 64 characters; name the table with tables.KIND=NAME")
    return name


def plan_tables(cfg: IndexJobConfig) -> list[TableRoute]:
    """The tables of a routed job, the default one first; refuses a table that two encoders would write."""
    default_spec = next((cfg.encoders[k] for k in DEFAULT_ROUTE if k in cfg.encoders), cfg.encoder)
    default_table = next((cfg.tables[k] for k in DEFAULT_ROUTE if k in cfg.tables), cfg.index.table)
    configs: dict[str, EncoderConfig] = {}

    def config(spec: str) -> EncoderConfig:
        if spec not in configs:
            configs[spec] = checkpoint_config(encoder_path(spec))
        return configs[spec]

    default_id = config(default_spec).encoder_id
    members: dict[str, list[tuple[str, str]]] = {default_table: []}  # table -> (kind, encoder spec)
    for kind in (k.name for k in kinds.indexed()):
        spec = cfg.encoders.get(kind, default_spec)
        enc = config(spec)
        if kind in cfg.tables:
            table = cfg.tables[kind]
        elif enc.encoder_id == default_id:
            table = default_table
        else:
            table = table_name(cfg.index.table, enc)
        members.setdefault(table, []).append((kind, spec))
    out = []
    for table, routed in members.items():
        ids = {config(spec).encoder_id for _, spec in routed}
        if len(ids) > 1:
            said = ", ".join(f"{k}: {spec} ({config(spec).encoder_id})" for k, spec in routed)
            raise ConfigError(
                f"table {table!r} would hold the codes of {len(ids)} encoders ({said}); a table holds one "
                "encoder's codes: name a table for each with tables.KIND=NAME"
            )
        spec = routed[0][1] if routed else default_spec
        out.append(TableRoute(table, spec, config(spec), tuple(k for k, _ in routed), table == default_table))
    return out


def _sniff(store: ObjectStore, obj: SourceObject) -> str | None:
    """The kind an undecided object's content says, or None when it cannot be told (its run quarantines it)."""
    from medret.storage.cache import local_copy

    try:
        kind = kinds.detect(obj.uri, store.read_range(obj.key, 0, kinds.HEAD_BYTES))
        if kind.needs_file():
            kind = kind.resolve(local_copy(store, obj.key, obj.etag))
    except Exception as err:
        if fault_of(err) in ("infra", "auth"):
            raise
        return None
    return kind.name


def settle_kinds(store: ObjectStore, objects: list[SourceObject], recorded: dict[str, Entry], known: set[str]) -> int:
    """Give the objects only their content can place a kind of ``known``: the one recorded at their etag,
    else sniffed. Returns how many were read to tell."""
    undecided = [o for o in objects if kinds.get(o.kind).listing is kinds.Listing.DETECT]
    to_read = []
    for o in undecided:
        e = recorded.get(o.uri)
        if e is not None and e.etag == o.etag and e.kind in known:
            o.kind = e.kind
        else:
            to_read.append(o)
    if to_read:
        with ThreadPoolExecutor(min(SNIFF_THREADS, len(to_read))) as pool:
            for o, kind in zip(to_read, pool.map(lambda o: _sniff(store, o), to_read), strict=True):
                if kind in known:
                    o.kind = kind
    return len(to_read)


def _recorded(cfg: IndexJobConfig, routes: list[TableRoute]) -> dict[str, Entry]:
    """What the routed tables' manifests hold, by object URI."""

    def entries(table: str) -> dict[str, Entry]:
        try:
            return Manifest(cfg.index.uri, table, cfg.s3, create=False).entries()
        except TableNotFoundError:
            return {}

    out: dict[str, Entry] = {}
    for r in routes:
        what = f"reading the manifest of {r.table!r} at {cfg.index.uri}"
        out.update(_index_call(what, functools.partial(entries, r.table)))
    return out


def _add(total: Summary, part: Summary, route: TableRoute) -> None:
    for name in COUNTS:
        setattr(total, name, getattr(total, name) + getattr(part, name))
    for stage, s in part.stage_seconds.items():
        total.stage_seconds[stage] = total.stage_seconds.get(stage, 0.0) + s
    total.quarantine += part.quarantine
    total.tables.append({**part.to_dict(), "kinds": list(route.kinds), "encoder": route.encoder})
    total.index.setdefault("tables", []).append(route.table)
    total.index["rows"] = total.index.get("rows", 0) + part.index.get("rows", 0)


def run_routed(cfg: IndexJobConfig) -> Summary:
    """Index ``cfg.source`` with each kind's own encoder into each encoder's table; the job's summary holds
    each table's in ``tables``."""
    t_start = time.perf_counter()
    if cfg.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(cfg.metrics_port)
    out = Path(cfg.out)
    save_resolved(cfg, out)
    routes = plan_tables(cfg)
    table_of_kind = {k: r.table for r in routes for k in r.kinds}
    default = next(r for r in routes if r.default)
    summary = Summary(source=cfg.source, index={"uri": cfg.index.uri}, encoder_id="", incremental=cfg.incremental)
    store = RetryingStore(open_store(cfg.source, cfg.s3, dicomweb=cfg.dicomweb), budget_s=cfg.storage_retry_s)
    try:
        t = time.perf_counter()
        objects, sidecars = list_source(store, cfg.all_routes())
        if any(kinds.get(o.kind).listing is kinds.Listing.DETECT for o in objects):
            read = settle_kinds(store, objects, _recorded(cfg, routes), set(table_of_kind))
            _say(cfg, f"{cfg.source}: read the first bytes of {read} object(s) to tell their kind")
        summary.stage_seconds["list"] = time.perf_counter() - t
    except InfrastructureError as err:
        stop = StoreUnreachableError(_unreachable(cfg, store, err, summary), summary)
        _stopped(out, summary, stop, t_start)
        raise stop from err
    _warn_overlaps(cfg, routes)
    table_of = {o.uri: table_of_kind.get(o.kind, default.table) for o in objects}
    for r in routes:
        mine = [o for o in objects if table_of[o.uri] == r.table]
        if not mine and not r.kinds:
            continue  # the default table, when every kind has a table of its own and nothing is undecided
        _say(cfg, f"table {r.table!r} ({r.config.encoder_id}) takes {', '.join(r.kinds) or 'undecided objects'}")
        try:
            listed = Listed(mine, len(sidecars), set(table_of), 0.0, table_of)
            part = index_table(_table_config(cfg, r), listed, r.kinds)
        except JobStoppedError as err:
            if isinstance(err.summary, Summary):
                _add(summary, err.summary, r)
            err.summary = summary
            _stopped(out, summary, err, t_start)
            raise
        except EncoderMismatchError as err:
            raise EncoderMismatchError(
                f"{err} In a routed job, give the kinds {', '.join(r.kinds)} a new table with tables.KIND=NAME."
            ) from err
        _add(summary, part, r)
    summary.seconds = time.perf_counter() - t_start
    _write(out, summary)
    return summary


def _warn_overlaps(cfg: IndexJobConfig, routes: list[TableRoute]) -> None:
    """Say so when another table of the index records kinds this job sends elsewhere (a table renamed, an
    encoder replaced): the query service could answer such uploads from either; remove the old table."""
    from medret.index.store import CodeIndex, is_code_table, list_tables

    def others() -> dict[str, tuple[str, ...]]:
        names = [t for t in list_tables(cfg.index.uri, cfg.s3) if t not in ours and is_code_table(t)]
        return {t: CodeIndex.open(cfg.index.uri, table=t, s3=cfg.s3).serves or () for t in names}

    ours = {r.table for r in routes}
    for name, serves in _index_call(f"reading the tables at {cfg.index.uri}", others).items():
        taken = ", ".join(f"{k} (now in {r.table!r})" for r in routes for k in r.kinds if k in serves)
        if taken:
            log.warning("table %r at %s also records the kinds %s", name, cfg.index.uri, taken)
            _say(cfg, f"note: table {name!r} also records the kinds {taken}: remove it if this job replaces it")


def _table_config(cfg: IndexJobConfig, route: TableRoute) -> IndexJobConfig:
    """The one-table job of ``route``: its encoder, its table, its own output folder."""
    update: dict[str, Any] = {
        "encoder": route.encoder,
        "encoders": {},
        "tables": {},
        "index": cfg.index.model_copy(update={"table": route.table}),
        "out": str(Path(cfg.out) / "tables" / route.table),
        "metrics_port": None,
    }
    return cfg.model_copy(update=update)


def _stopped(out: Path, summary: Summary, err: JobStoppedError, t_start: float) -> None:
    summary.stopped = str(err)
    summary.seconds = time.perf_counter() - t_start
    log.info("%s", err)  # the caller shows it (the command line, the job entrypoints)
    with contextlib.suppress(Exception):  # the summary is a courtesy; the stop is what matters
        _write(out, summary)


def _write(out: Path, summary: Summary) -> None:
    from prometheus_client import REGISTRY, write_to_textfile

    out.mkdir(parents=True, exist_ok=True)
    (out / "index-summary.json").write_text(json.dumps(summary.to_dict(), indent=1))
    write_to_textfile(str(out / "metrics.prom"), REGISTRY)
