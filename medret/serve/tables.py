"""The code tables at one index URI, as the query service sees them: listed, opened by name, described,
and chosen for an upload by its kind.

Nothing a request names is opened as a path: a table is looked up by name among the
index's tables, and a name that is not a table name is no table. Opened tables follow
new versions at most every ``refresh_s`` seconds, so a running service picks up what an
indexing job commits without a restart.

A table *serves* a kind of object when the indexing job sent that kind to it: a routed job
(``encoders:`` in its config) records the kinds of each table in its metadata
(:attr:`~medret.index.store.CodeIndex.serves`); a table of a one-encoder job records none and
serves every kind. An upload named no table is answered from a table that records its kind,
else from one that records none (:meth:`Tables.for_kind`).
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

from medret import kinds
from medret.errors import NotFound, TableNotFoundError
from medret.index.shards import ShardedIndex
from medret.index.store import CodeIndex, is_code_table, list_tables
from medret.kinds import ReadContext
from medret.preprocess.wsi.tiling import TilingConfig
from medret.serve.config import TABLE_NAME, ServiceConfig


def recipes_of(idx: CodeIndex) -> dict[str, Any]:
    """Kind -> recipe, the slide tiling and the recipes' options (``channels``), as recorded by the indexing
    job; defaults for older tables, and the encoder's own channel count where none was recorded (grey
    tables, tables written before colour)."""
    rec = idx.recipes or {}
    chosen = {**kinds.default_recipes(idx.encoder.preprocess), **rec.get("kinds", {})}
    tiling = TilingConfig(**rec.get("tiling", {})).model_dump(mode="json")
    options = {"channels": idx.encoder.channels, **rec.get("options", {})}
    return {"kinds": chosen, "tiling": tiling, "options": options}


def kinds_of(idx: CodeIndex) -> list[str]:
    """The kinds of object a table serves: those a routed job recorded, else every kind that gets items."""
    return list(idx.serves) if idx.serves is not None else [k.name for k in kinds.indexed()]


def read_context(
    idx: CodeIndex, *, pixel_budget: int, store: Any = None, input_size: tuple[int, int] | None = None
) -> ReadContext:
    """How this table's items were read and prepared, for reading an upload or an item again."""
    rec = recipes_of(idx)
    return ReadContext(
        store=store,
        input_size=input_size or idx.encoder.input_size,
        recipes=rec["kinds"],
        tiling=TilingConfig(**rec["tiling"]),
        pixel_budget=pixel_budget,
        channels=int(rec["options"]["channels"]),
    )


class Tables:
    """The index's code tables, opened once each and refreshed at most every ``refresh_s``. Thread-safe."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self._lock = threading.RLock()
        self._open: dict[str, CodeIndex] = {}
        self._names: tuple[float, list[str]] | None = None
        self._sharded: dict[str, ShardedIndex] = {}

    def names(self) -> list[str]:
        """The code tables (manifests left out), listed again at most every ``refresh_s`` seconds."""
        now = time.monotonic()
        with self._lock:
            if self._names is None or now - self._names[0] >= self.cfg.refresh_s:
                names = [t for t in list_tables(self.cfg.index, self.cfg.s3) if is_code_table(t)]
                self._names = (now, names)
            return list(self._names[1])

    def default(self) -> str:
        """The configured table, else the first one the index lists."""
        if self.cfg.table:
            return self.cfg.table
        names = self.names()
        if not names:
            raise NotFound(f"no code tables at {self.cfg.index}; run `medret index` first")
        return names[0]

    def open(self, table: str | None = None) -> CodeIndex:
        """The table, following new versions at most every ``refresh_s`` seconds."""
        name = table or self.default()
        if not TABLE_NAME.match(name) or not is_code_table(name):
            raise NotFound(f"no code table {name[:80]!r}: table names are letters, digits, '_' and '-'")
        with self._lock:
            idx = self._open.get(name)
            if idx is None:
                try:
                    idx = self._open[name] = CodeIndex.open(self.cfg.index, table=name, s3=self.cfg.s3)
                    idx.live.min_rows = self.cfg.mih_min_rows
                    idx.lean = self.cfg.shards > 1  # the codes live in the shards, not here
                    idx.metadata_in_memory_rows = self.cfg.metadata_in_memory_rows
                except TableNotFoundError as err:
                    raise NotFound(str(err)) from err
            else:
                idx.refresh(min_interval_s=self.cfg.refresh_s)
        return idx

    def sharded(self, idx: CodeIndex) -> ShardedIndex | None:
        """The table's shards when the service shards its tables (``shards`` > 1), started on first use and
        shared by every replica (named Ray actors); None otherwise."""
        if self.cfg.shards <= 1:
            return None
        with self._lock:
            sh = self._sharded.get(idx.name)
            if sh is None:
                tag = hashlib.sha256(self.cfg.index.encode()).hexdigest()[:12]
                sh = self._sharded[idx.name] = ShardedIndex(
                    self.cfg.index,
                    idx.name,
                    shards=self.cfg.shards,
                    s3=self.cfg.s3,
                    num_cpus=self.cfg.shard_cpus,
                    timeout_s=self.cfg.shard_timeout_s,
                    refresh_s=self.cfg.refresh_s,
                    mih_min_rows=self.cfg.mih_min_rows,
                    shared_as=f"medret-{tag}-{idx.name}",
                    lease_s=self.cfg.shard_lease_s,
                )
            return sh

    def for_kind(self, kind: str) -> str:
        """The table an upload of ``kind`` is answered from: among the tables whose recorded kinds include it,
        else among those that record none (they take every kind), the configured default table if it is one
        of them, else the first by name."""
        names = self.names()
        if not names:
            return self.default()  # says there are no tables
        served = {name: self.open(name).serves for name in names}
        for group in ([n for n in names if kind in (served[n] or ())], [n for n in names if served[n] is None]):
            if group:
                return self.cfg.table if self.cfg.table in group else group[0]
        said = "; ".join(f"{n}: {', '.join(served[n] or ()) or 'none'}" for n in names) or "no tables"
        raise NotFound(f"no table at {self.cfg.index} serves {kind} objects (kinds by table: {said}); name a table")

    def describe(self) -> list[dict[str, Any]]:
        """Each table's name, size, version, encoder, recipes, the kinds and modality it serves, and how its
        exact search answers (scan or multi-index, with measured times; what ``GET /v1/tables`` answers)."""
        out = []
        for name in self.names():
            idx = self.open(name)
            out.append(
                {
                    "name": name,
                    "rows": idx.count(),
                    "version": idx.version,
                    "encoder_id": idx.encoder_id,
                    "encoder": idx.encoder.model_dump(mode="json"),
                    "recipes": recipes_of(idx),
                    "kinds": kinds_of(idx),
                    "modality": idx.encoder.modality,
                    "search": idx.live.stats()
                    if self.cfg.shards <= 1
                    else {"path": "shards", "shards": self.cfg.shards},
                }
            )
        return out
