"""Training data from an archive: the same kinds and recipes as indexing, streamed by Ray Data.

``prepare`` lists the source, reads and preprocesses every object through the kind
registry and the encoder's recipe (the indexing job's own ``expand`` and ``load``
stages, as Ray Data tasks), and writes the model inputs as uint8 rows to a Parquet
cache on the training storage (local or ``s3://``). Nothing is held whole in memory: an
archive larger than RAM prepares and trains. A second run over an unchanged archive
(same objects and etags, same recipe and input geometry) reuses the cache and decodes
nothing. The cache costs ``H * W * C`` bytes per item (784 B at 28 px grey, 150 KB at
224 px RGB), compressed by Parquet.

Labels come from sidecar CSVs in the source (``path,label[,organ][,group]``), an
explicit ``labels`` CSV, a DICOM attribute (``label_tag``), or nowhere (self-supervised).
The split is :func:`assign_parts`: by label and by group, so that no patient, study or
slide is on two sides; or the labels' own ``split`` column (train/val/gallery/query) where it has one.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.errors import ConfigError, DataError, StorageUnavailableError
from medret.eval.benchmarks import Part, RetrievalSplit, with_gallery_order
from medret.train.config import TrainConfig

log = logging.getLogger(__name__)

PARTS = ("train", "val", "gallery", "query")
#: DICOM keywords ``label_tag`` accepts -> the item metadata key the DICOM reader records them under
DICOM_TAGS = {
    "BodyPartExamined": "body_part",
    "ViewPosition": "view_position",
    "ImageLaterality": "laterality",
    "Modality": "modality",
    "PhotometricInterpretation": "photometric",
    "SOPClassUID": "sop_class_uid",
}
#: columns that name an item's group (patient, study, slide), tried in this order when ``group_column`` is unset
GROUP_COLUMNS = ("patient_id", "patient", "group", "subject", "slide_id", "patient_pseudo_id", "study_uid")
ORGAN_COLUMNS = ("organ", "dataset")
#: "2": rows keep their object's etag and, for slide tiles, the level-0 position (views re-read from the slide)
CACHE_FORMAT = "2"


@dataclass(frozen=True)
class Archive:
    """A prepared archive: where its rows are, their geometry, labels and split."""

    root: str  # the cache folder (local path or bucket/prefix on ``fs``)
    input_size: tuple[int, int]
    channels: int
    organs: list[str]
    classes: list[list[str]]  # [organ index] -> label names; combined label = offset of organ + class index
    parts: dict[str, str]  # group -> part
    counts: dict[str, int]
    skipped: list[str]  # "uri: reason" of objects that could not be read (bad files)
    recipe: str

    @property
    def items(self) -> str:
        return f"{self.root}/items"

    @property
    def n_classes(self) -> int:
        return sum(len(c) for c in self.classes)

    def class_index(self) -> dict[tuple[str, str], int]:
        out, k = {}, 0
        for o, names in zip(self.organs, self.classes, strict=True):
            for name in names:
                out[(o, name)] = k
                k += 1
        return out

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Archive:
        d = json.loads(text)
        d["input_size"] = tuple(d["input_size"])
        return cls(**d)


# -- the split ---------------------------------------------------------------------------
def assign_parts(
    labels: list[str], groups: list[str], *, seed: int = 0, fractions: tuple[float, ...] = (0.6, 0.1, 0.2, 0.1)
) -> dict[str, str]:
    """``{group: part}``: each group's items on one side only, each label spread like ``fractions``.

    A group is filed under its most common label (ties: the smallest). For each label in
    sorted order, its groups, sorted by name, are permuted with ``numpy.random.default_rng(seed)``
    (one generator for the whole split); walking them in that order, a group goes to the first
    part whose cumulative share (0.6, 0.7, 0.9, 1.0 of the label's items) the items placed before
    it have not yet filled. With one item per group this is the medmnist-4 procedure.

    >>> parts = assign_parts(["a"] * 10, [str(i) for i in range(10)])
    >>> sorted(parts.values()).count("train"), sorted(parts.values()).count("query")
    (6, 1)
    >>> assign_parts(["a", "b", "a"], ["p1", "p1", "p2"])["p1"] == assign_parts(["a", "a"], ["p1", "p2"])["p1"]
    True
    """
    if len(labels) != len(groups):
        raise ValueError("labels and groups differ in length")
    per_group: dict[str, dict[str, int]] = {}
    for lab, g in zip(labels, groups, strict=True):
        counts = per_group.setdefault(g, {})
        counts[lab] = counts.get(lab, 0) + 1
    by_label: dict[str, list[tuple[str, int]]] = {}
    for g, counts in per_group.items():
        top = min(counts, key=lambda lab: (-counts[lab], lab))
        by_label.setdefault(top, []).append((g, sum(counts.values())))
    bounds = np.cumsum(fractions) / sum(fractions)
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for lab in sorted(by_label):
        members = sorted(by_label[lab])
        order = rng.permutation(len(members))
        total = sum(n for _, n in members)
        cuts = np.floor(np.round(bounds * total, 9))  # floor(0.6 n), floor(0.7 n), ... as medmnist-4 cuts
        placed = 0
        for i in order:
            g, n = members[i]
            part = int(np.searchsorted(cuts, placed, side="right"))
            out[g] = PARTS[min(part, len(PARTS) - 1)]
            placed += n
    return out


# -- labels ------------------------------------------------------------------------------
def read_labels_csv(path: str, cfg: TrainConfig) -> dict[str, dict[str, str]]:
    """``{object key: row}`` from a labels CSV outside the source; ``path`` is relative to the source root."""
    from medret.storage.objects import open_store
    from medret.storage.uri import parse_uri

    parsed = parse_uri(path)
    try:
        if parsed.is_s3:
            store = open_store(posixpath.dirname(path.rstrip("/")), cfg.s3)
            text = store.read_bytes(posixpath.basename(path)).decode("utf-8-sig")
        else:
            text = Path(path).expanduser().read_text(encoding="utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(text)))
    except FileNotFoundError as err:
        raise ConfigError(f"labels {path!r}: no such file") from err
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"labels {path!r}: not a UTF-8 CSV: {err}") from err
    if rows and "path" not in rows[0]:
        raise DataError(f"labels {path!r}: needs a 'path' column (has {list(rows[0])})")
    return {posixpath.normpath(r.pop("path").strip()): {k: v for k, v in r.items() if k} for r in rows if r["path"]}


def _label_of(meta: dict[str, Any], cfg: TrainConfig) -> str:
    if cfg.label_tag:
        return str(meta.get(DICOM_TAGS[cfg.label_tag], "")).strip().upper()
    return str(meta.get(cfg.label_column, "")).strip()


def _group_of(meta: dict[str, Any], uri: str, cfg: TrainConfig) -> str:
    """The item's group: the configured column (``object``: each object its own), else the first group
    column it has, else its object (so a slide's tiles or a volume's slices never straddle the split)."""
    if cfg.group_column == "object":
        return uri
    for c in (cfg.group_column,) if cfg.group_column else GROUP_COLUMNS:
        if meta.get(c) not in (None, ""):
            return f"{c}={meta[c]}"
    return uri


def _organ_of(meta: dict[str, Any]) -> str:
    return next((str(meta[c]) for c in ORGAN_COLUMNS if meta.get(c) not in (None, "")), "all")


# -- preparing -----------------------------------------------------------------------------
def training_rows(
    batch: dict[str, npt.NDArray[Any]], cfg_json: str, shape: tuple[int, ...]
) -> dict[str, npt.NDArray[Any]]:
    """Item rows of the indexing ``load`` stage -> cache rows: uint8 image bytes, label, organ, group, and
    where the image came from (the object's etag; a slide tile's level-0 ``tile_x``/``tile_y``, else -1).

    Rows of objects that could not be read keep their error (the driver reports them) and no image.
    """
    cfg = TrainConfig.model_validate_json(cfg_json)
    n = len(batch["ok"])
    keys = ("item_id", "uri", "etag", "label", "organ", "group", "split", "error", "fault")
    out: dict[str, list[Any]] = {k: [] for k in keys}
    at: dict[str, list[int]] = {"tile_x": [], "tile_y": []}
    images = []
    for i in range(n):
        if not batch["ok"][i] and not str(batch["error"][i]):
            continue  # a unit that gave no items (a slide unit whose tiles were all background): nothing to keep
        meta = {c: batch[c][i] for c in batch if c not in ("image", "extra")}
        extra = str(batch["extra"][i])
        if extra:
            meta.update(json.loads(extra))
        ok = bool(batch["ok"][i])
        image = np.asarray(batch["image"][i], np.float32)
        error, fault = str(batch["error"][i]), str(batch["fault"][i])
        if ok and image.shape != shape:  # never reshaped or padded into something it is not
            ok, error, fault = False, f"model input is {image.shape}, this encoder takes {shape}", "object"
        out["item_id"].append(str(batch["item_id"][i]) if ok else "")
        out["uri"].append(str(batch["uri"][i]))
        out["etag"].append(str(batch["etag"][i]))
        for c in at:
            at[c].append(int(meta.get(c, -1)) if ok else -1)
        out["label"].append(_label_of(meta, cfg) if ok else "")
        out["organ"].append(_organ_of(meta))
        out["group"].append(_group_of(meta, str(batch["uri"][i]), cfg))
        out["split"].append(str(meta.get("split", "")).strip().lower())
        out["error"].append("" if ok else error)
        out["fault"].append("" if ok else fault)
        images.append(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8).tobytes() if ok else b"")
    cols = {k: np.array(v, dtype=object) for k, v in out.items()}
    cols.update({c: np.array(v, np.int64) for c, v in at.items()})
    cols["image"] = np.array(images, dtype=object)
    return cols


def fingerprint(
    objects: list[Any], cfg: TrainConfig, recipes: dict[str, str], shape: tuple[int, ...], root: str
) -> str:
    """What the cache depends on: the source's root (its rows name their objects' URIs), every object and etag
    (sidecar labels included), recipes, geometry, label rule."""
    h = hashlib.sha256(f"{CACHE_FORMAT}\t{root}\n".encode())
    for o in sorted(objects, key=lambda o: o.key):
        h.update(f"{o.key}\t{o.etag}\n".encode())
    rule = {"recipes": recipes, "shape": shape, "tag": cfg.label_tag, "col": cfg.label_column, "grp": cfg.group_column}
    rule["tiling"] = cfg.tiling.model_dump(mode="json")
    h.update(json.dumps(rule, sort_keys=True).encode())
    return h.hexdigest()[:16]


def prepare(cfg: TrainConfig, geometry: tuple[tuple[int, int], int, str]) -> Archive:
    """List, read and preprocess the archive into the Parquet cache (or reuse it); then split it."""
    import pyarrow.fs as pafs

    from medret import kinds
    from medret.kinds import ReadContext
    from medret.pipelines.config import default_routes
    from medret.pipelines.sources import list_source
    from medret.storage.objects import open_store
    from medret.storage.retry import RetryingStore
    from medret.storage.s3 import arrow_filesystem

    input_size, channels, recipe = geometry
    shape: tuple[int, ...] = (*input_size, channels) if channels > 1 else tuple(input_size)
    store = RetryingStore(open_store(cfg.source, cfg.s3), budget_s=60.0)
    objects, _ = list_source(store, default_routes())
    if cfg.labels:
        extra = read_labels_csv(cfg.labels, cfg)
        for o in objects:
            if o.key.rstrip("/") in extra:
                o.meta = {**o.meta, **extra[o.key.rstrip("/")]}
                o.etag = f"{o.etag}+{hashlib.sha256(json.dumps(o.meta, sort_keys=True).encode()).hexdigest()[:12]}"
    if not objects:
        raise ConfigError(f"source {cfg.source!r} holds no images medret can read")
    recipes = kinds.recipes_for(recipe)
    fs, base = arrow_filesystem(cfg.cache_path(), cfg.s3)
    root = f"{base}/{fingerprint(objects, cfg, recipes, shape, store.uri_of(''))}"
    done = f"{root}/archive.json"
    if fs.get_file_info(done).type == pafs.FileType.File:
        with fs.open_input_stream(done) as f:
            archive = Archive.from_json(f.read().decode())
        log.info("reusing the prepared archive at %s (%s)", root, archive.counts)
        return archive
    ctx = ReadContext(store=store, input_size=input_size, recipes=recipes, tiling=cfg.tiling, channels=channels)
    _write_items(objects, ctx, cfg, shape, fs, root)
    archive = _split(cfg, fs, root, input_size, channels, recipe)
    with fs.open_output_stream(done) as f:
        f.write(archive.to_json().encode())
    return archive


def _write_items(objects: list[Any], ctx: Any, cfg: TrainConfig, shape: tuple[int, ...], fs: Any, root: str) -> None:
    import ray.data

    from medret.pipelines.stages import expand, load
    from medret.runtime import ensure_ray

    ensure_ray(log_to_driver=False)
    rows = [o.row() for o in objects]
    blocks = max(1, min(len(rows) // 64 + 1, 200))
    ds: Any = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.flat_map(functools.partial(expand, ctx=ctx))
    ds = ds.map_batches(functools.partial(load, ctx=ctx), batch_size=64)
    ds = ds.map_batches(training_rows, fn_kwargs={"cfg_json": cfg.model_dump_json(), "shape": shape}, batch_size=256)
    ds.write_parquet(f"{root}/items", filesystem=fs)


def _split(cfg: TrainConfig, fs: Any, root: str, input_size: tuple[int, int], channels: int, recipe: str) -> Archive:
    """Read the cache's label columns only (no images), check faults, and assign the parts."""
    import pyarrow.dataset as pads

    table = pads.dataset(f"{root}/items", filesystem=fs, format="parquet").to_table(
        columns=["item_id", "uri", "label", "organ", "group", "split", "error", "fault"]
    )
    cols = {c: table.column(c).to_pylist() for c in table.column_names}
    rows = zip(cols["uri"], cols["error"], cols["fault"], strict=True)
    infra = [f"{u}: {e}" for u, e, f in rows if e and f != "object"]
    if infra:  # a store that failed is not a bad file: nothing is cached, the run can be repeated
        fs.delete_dir_contents(root, missing_dir_ok=True)
        raise StorageUnavailableError(f"{len(infra)} object(s) could not be read from the store: {infra[0]}")
    skipped = sorted({f"{u}: {e}" for u, e in zip(cols["uri"], cols["error"], strict=True) if e})
    ok = [i for i, e in enumerate(cols["error"]) if not e]
    if not ok:
        raise DataError(f"source {cfg.source!r}: no object could be read ({skipped[:3]})")
    labels = [cols["label"][i] for i in ok]
    if not cfg.label_free and not any(labels):
        how = f"DICOM attribute {cfg.label_tag}" if cfg.label_tag else f"column {cfg.label_column!r}"
        raise ConfigError(
            f"source {cfg.source!r}: no item has a label ({how}); add a labels CSV (--labels), "
            "name a DICOM attribute (--label-tag), or train a self-supervised method"
        )
    organs_of = [cols["organ"][i] for i in ok]
    parts = _given_parts(cols, ok, cfg) or assign_parts(labels, [cols["group"][i] for i in ok], seed=cfg.seed)
    organs = sorted(set(organs_of))
    classes = [sorted({lab for lab, o in zip(labels, organs_of, strict=True) if o == organ}) for organ in organs]
    counts = {p: 0 for p in PARTS}
    for i in ok:
        counts[parts[cols["group"][i]]] += 1
    if skipped:
        log.warning("%d object(s) could not be read and are left out: %s", len(skipped), skipped[:5])
    return Archive(root, input_size, channels, organs, classes, parts, counts, skipped, recipe)


def _given_parts(cols: dict[str, list[Any]], ok: list[int], cfg: TrainConfig) -> dict[str, str]:
    """The split the labels CSV gives in a ``split`` column (train/val/gallery/query), if it gives one."""
    given = {i: cols["split"][i] for i in ok if cols["split"][i]}
    if not given:
        return {}
    bad = sorted({v for v in given.values() if v not in PARTS})
    missing = len(ok) - len(given)
    if bad or missing:
        what = f"values {bad} (use {', '.join(PARTS)})" if bad else f"no value for {missing} item(s)"
        raise DataError(f"source {cfg.source!r}: the labels' 'split' column has {what}")
    parts: dict[str, str] = {}
    for i, part in given.items():
        if parts.setdefault(cols["group"][i], part) != part:
            raise DataError(f"source {cfg.source!r}: group {cols['group'][i]!r} is given two splits in 'split'")
    return parts


# -- reading prepared rows -------------------------------------------------------------------
def label_rows(
    batch: dict[str, npt.NDArray[Any]], archive_json: str, part: str, *, where: bool = False
) -> dict[str, npt.NDArray[Any]]:
    """Cache rows -> the rows of ``part``: image (uint8 array), organ index and combined label; with ``where``,
    also ``at``: each slide tile's :class:`~medret.preprocess.wsi.tiling.TileAt` (None for other images)."""
    archive = Archive.from_json(archive_json)
    index, organs = archive.class_index(), {o: i for i, o in enumerate(archive.organs)}
    keep = [i for i, g in enumerate(batch["group"]) if not batch["error"][i] and archive.parts.get(str(g)) == part]
    shape = (*archive.input_size, archive.channels) if archive.channels > 1 else archive.input_size
    images = np.zeros((len(keep), *shape), np.uint8)
    for j, i in enumerate(keep):
        images[j] = np.frombuffer(batch["image"][i], np.uint8).reshape(shape)
    out = {
        "image": images,
        "organ": np.array([organs[str(batch["organ"][i])] for i in keep], np.int64),
        "label": np.array([index[(str(batch["organ"][i]), str(batch["label"][i]))] for i in keep], np.int64),
    }
    if where:
        from medret.preprocess.wsi.tiling import TileAt

        at = np.empty(len(keep), dtype=object)
        for j, i in enumerate(keep):
            x, y = int(batch["tile_x"][i]), int(batch["tile_y"][i])
            at[j] = TileAt(str(batch["uri"][i]), x, y, str(batch["etag"][i])) if x >= 0 and y >= 0 else None
        out["at"] = at
    return out


def part_dataset(archive: Archive, part: str, cfg: TrainConfig) -> Any:
    """A Ray Dataset of one part's rows, read from the cache (streamed, never whole in memory)."""
    import ray.data

    from medret.storage.s3 import arrow_filesystem

    fs, _ = arrow_filesystem(cfg.cache_path(), cfg.s3)
    # small CPU requests: the training workers hold most of the CPUs while these tasks feed them
    ds: Any = ray.data.read_parquet(
        archive.items,
        filesystem=fs,
        shuffle="files" if part == "train" else None,
        num_cpus=0.1,
    )
    return ds.map_batches(
        label_rows, fn_kwargs={"archive_json": archive.to_json(), "part": part}, batch_size=512, num_cpus=0.1
    )


def iter_part(
    archive: Archive, part: str, cfg: TrainConfig, *, batch_size: int = 1024, limit: int | None = None
) -> Iterator[npt.NDArray[np.uint8]]:
    """The images of ``part`` in batches, in cache order, up to ``limit`` (never the whole archive in memory)."""
    for rows in _part_rows(archive, part, cfg, batch_size, limit):
        yield rows["image"]


def iter_part_at(
    archive: Archive, part: str, cfg: TrainConfig, *, batch_size: int = 1024, limit: int | None = None
) -> Iterator[tuple[npt.NDArray[np.uint8], npt.NDArray[Any]]]:
    """:func:`iter_part`, each image with where it was read: a slide tile's ``TileAt``, else None."""
    for rows in _part_rows(archive, part, cfg, batch_size, limit, where=True):
        yield rows["image"], rows["at"]


def slide_opener(cfg: TrainConfig) -> Any:
    """``TileAt -> Slide`` for the tiles of ``cfg.source``: each slide opened as the indexing job opens it (a
    local file where it is one, else a download cached by etag; the tiling's ``default_mpp`` where the slide
    states no pixel size)."""
    from medret.preprocess.wsi.tiling import TileAt, open_cached_slide
    from medret.storage.cache import local_copy
    from medret.storage.objects import open_store
    from medret.storage.retry import RetryingStore

    store = RetryingStore(open_store(cfg.source, cfg.s3), budget_s=60.0)
    root = store.uri_of("").rstrip("/") + "/"

    def open_(at: TileAt) -> Any:
        key = at.slide[len(root) :] if at.slide.startswith(root) else ""
        if not key or store.uri_of(key) != at.slide:
            raise ConfigError(
                f"{at.slide}: the training cache names a slide outside source {cfg.source!r}; "
                f"delete the cache under {cfg.cache_path()!r} to prepare the archive again"
            )
        return open_cached_slide(local_copy(store, key, at.version), cfg.tiling)

    return open_


def _part_rows(
    archive: Archive, part: str, cfg: TrainConfig, batch_size: int, limit: int | None, *, where: bool = False
) -> Iterator[dict[str, npt.NDArray[Any]]]:
    import pyarrow.dataset as pads

    from medret.storage.s3 import arrow_filesystem

    fs, _ = arrow_filesystem(cfg.cache_path(), cfg.s3)
    dataset = pads.dataset(archive.items, filesystem=fs, format="parquet")
    left = limit
    for batch in dataset.to_batches(batch_size=batch_size):
        cols = {c: np.array(batch.column(c).to_pylist(), dtype=object) for c in batch.schema.names}
        rows = label_rows(cols, archive.to_json(), part, where=where)
        if left is not None:
            rows = {k: v[:left] for k, v in rows.items()}
            left -= len(rows["label"])
        if len(rows["label"]):
            yield rows
        if left is not None and left <= 0:
            return


def read_part(archive: Archive, part: str, cfg: TrainConfig, *, limit: int | None = None) -> Part:
    """Up to ``limit`` rows of ``part`` in memory (validation, evaluation, samples for fitting), in cache order."""
    got = list(_part_rows(archive, part, cfg, 1024, limit))
    a = archive
    shape = (0, *a.input_size, a.channels) if a.channels > 1 else (0, *a.input_size)
    images = np.concatenate([g["image"] for g in got]) if got else np.zeros(shape, np.uint8)
    organ = np.concatenate([g["organ"] for g in got]) if got else np.zeros(0, np.int64)
    label = np.concatenate([g["label"] for g in got]) if got else np.zeros(0, np.int64)
    return Part(images, organ, label, np.arange(len(label)))


def archive_split(archive: Archive, cfg: TrainConfig, parts: tuple[str, ...] = ("gallery", "query")) -> RetrievalSplit:
    """The named parts in memory as a :class:`RetrievalSplit` (labels already combined, so every organ offset is 0).

    The gallery is put in the benchmark's fixed label-independent order (an archive laid out in
    class folders would otherwise break Hamming ties by class)."""
    split = RetrievalSplit(organs=archive.organs, parts={p: read_part(archive, p, cfg) for p in parts})
    return with_gallery_order(split) if "gallery" in parts else split


def iter_part_batches(shard: Any, batch_size: int, *, seed: int) -> Iterator[Any]:
    """A worker's shard of the training rows, in local-shuffled batches of ``batch_size`` (the last partial dropped)."""
    return shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=max(4 * batch_size, 2048),
        local_shuffle_seed=seed,
    )
