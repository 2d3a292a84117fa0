"""The indexing job's lesion side: volumes with a lesion mask -> rows of ``<table>__lesions``.

A lesion label volume travels beside its image: a file named like the image with ``_seg`` or
``_mask`` before the extension (``case.nii.gz`` -> ``case_seg.nii.gz``), or the sidecar CSV's
``mask_path`` column. The source listing attaches it to its image and never indexes it as an
image (:func:`medret.pipelines.sources.list_source`).

The MRI recipe records, on each volume's first slice, the registration its slices were resampled
with and the grid it applies to. After the run's commits, :func:`sync_lesions` brings the lesion
table level with the source: each volume's rows carry the etags they were made from, so a new or
changed mask (or image) is carried into template space by its image's recorded transform
(nearest neighbour, never a registration of its own), encoded and swapped in; rows of volumes
that lost their mask or left the index are removed. The work runs as Ray tasks; a kill at any
point costs only a replay, because rows are a pure function of the image's transform and the mask.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from medret.config import S3Config
from medret.errors import DataError, IndexStoreError, MedretError, fault_of
from medret.index.filters import quote
from medret.io.volume import Volume, VolumeGrid
from medret.preprocess.mri.recipe import BrainResult
from medret.preprocess.mri.register import Registration
from medret.sketch.carry import carry_lesion
from medret.sketch.encoder import LesionEncoder, LesionSlice, create_lesion_encoder
from medret.sketch.grid import LesionGridConfig
from medret.sketch.store import LesionTable, lesion_rows

if TYPE_CHECKING:
    from medret.index.store import CodeIndex
    from medret.storage.objects import ObjectStore


class SourceObject(Protocol):
    """What the reconcile reads of a listed object (:class:`medret.pipelines.sources.SourceObject`)."""

    uri: str
    etag: str
    mask: str
    mask_etag: str
    meta: dict[str, Any]


log = logging.getLogger(__name__)

#: the item metadata key the MRI recipe records the registration under (``medret.preprocess.recipes``)
REGISTRATION_KEY = "registration"
#: volumes per Ray task, and volumes per lesion-table commit
TASK_VOLUMES = 4
COMMIT_VOLUMES = 64

MASK_SUFFIXES = ("_seg", "_mask")
_EXT = re.compile(r"(\.nii\.gz|\.nii|\.nrrd|\.mha|\.mhd)$", re.IGNORECASE)


def is_lesion_mask(name: str) -> bool:
    """Whether an object's name marks it as a lesion mask (``_seg``/``_mask`` before a volume's extension); the
    listing takes it as one when its image is beside it (:func:`image_of_mask`)."""
    stem = _EXT.sub("", name)
    return stem != name and stem.lower().endswith(MASK_SUFFIXES)


def mask_names(image_name: str) -> list[str]:
    """The names a lesion mask of ``image_name`` may have beside it, in order of preference."""
    m = _EXT.search(image_name)
    if not m:
        return []
    stem, ext = image_name[: m.start()], m.group(1)
    return [f"{stem}{s}{ext}" for s in MASK_SUFFIXES]


def image_of_mask(mask_name: str) -> str | None:
    """The image name a ``_seg``/``_mask`` name belongs beside (``case_seg.nii.gz`` -> ``case.nii.gz``).

    >>> image_of_mask("a/case_seg.nii.gz"), image_of_mask("a/case.nii.gz")
    ('a/case.nii.gz', None)
    """
    m = _EXT.search(mask_name)
    if not m or not is_lesion_mask(mask_name):
        return None
    stem = mask_name[: m.start()]
    cut = next(len(sfx) for sfx in MASK_SUFFIXES if stem.lower().endswith(sfx))
    return f"{stem[:-cut]}{m.group(1)}"


def find_mask(image_name: str, siblings: Sequence[str], sidecar: Mapping[str, Any] | None = None) -> str | None:
    """The mask of an image: the sidecar's ``mask_path`` first, then a ``_seg``/``_mask`` sibling."""
    if sidecar and sidecar.get("mask_path"):
        return str(sidecar["mask_path"])
    have = set(siblings)
    return next((n for n in mask_names(image_name) if n in have), None)


def lesion_slices(
    labels: Volume, result: BrainResult, encoder: LesionEncoder, *, name: str = "mask"
) -> list[LesionSlice]:
    """The lesion codes of one volume: its mask carried through ``result``'s registration, then encoded."""
    carried = carry_lesion(labels, result.subject, result.registration, encoder.grid, name=name)
    return encoder.encode_volume(carried)


def sync_job_lesions(
    uri: str,
    table: str,
    encoder: LesionEncoder,
    volumes: Mapping[str, Sequence[LesionSlice]],
    *,
    patients: Mapping[str, str] | None = None,
    masks: Mapping[str, str] | None = None,
    s3: S3Config | None = None,
) -> int:
    """Replace the lesion rows of the committed volumes ``source_uri -> slices`` in one commit.

    Call it right after the code table's commit with every committed MRI volume (those without a
    mask map to ``[]``, which removes rows a mask left before). Rows are a pure function of the
    volume and its mask, so replaying after a crash changes nothing.
    """
    if not volumes:
        return 0
    lt = LesionTable.for_index(uri, table, encoder.grid.config, s3)
    rows = [
        row
        for src, slices in volumes.items()
        for row in lesion_rows(src, slices, patient=(patients or {}).get(src, ""), mask_uri=(masks or {}).get(src, ""))
    ]
    return lt.replace(list(volumes), rows)


# -- the job's reconcile -------------------------------------------------------------------
@dataclass
class LesionSync:
    """What :func:`sync_lesions` did (the job summary's ``lesions``)."""

    volumes: int = 0  # volumes of the source that come with a lesion mask
    unchanged: int = 0  # their rows were made from the same image and mask already
    written: int = 0  # volumes whose rows were (re)made
    rows: int = 0
    removed: int = 0  # volumes whose rows were removed (mask gone or bad, image gone or not indexed)
    empty: int = 0  # masks carried to no rows (no lesion voxel, or too little on every level): redone each run
    failed: list[dict[str, str]] = field(default_factory=list)  # bad masks: retried next run
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class MaskWork:
    """One volume whose lesion rows are to be (re)made: what a Ray task needs, small and picklable."""

    uri: str
    mask_key: str
    mask_uri: str
    version: str
    patient: str
    registration: dict[str, Any]


def version_of(obj: SourceObject, indexed_at: str) -> str:
    """What a volume's lesion rows are made from: its image (etag, and when its codes were written, which a
    forced re-index changes with the registration it records) and its mask (key and etag)."""
    return f"{obj.etag}|{indexed_at}|{obj.mask}|{obj.mask_etag}"


def patient_of(obj: SourceObject) -> str:
    """The sidecar's ``patient`` (or ``patient_id``, ``study_uid``) column, else the volume itself."""
    for k in ("patient", "patient_id", "study_uid"):
        if obj.meta.get(k):
            return str(obj.meta[k])
    return obj.uri


def _chunks(uris: Sequence[str], n: int = 256) -> list[list[str]]:
    ordered = sorted(uris)
    return [ordered[i : i + n] for i in range(0, len(ordered), n)]


def _rows_of(index: CodeIndex, uris: Sequence[str], columns: Sequence[str]) -> Iterator[tuple[Any, ...]]:
    """``(source_uri, *columns)`` of every code-table row of these volumes, read a chunk of volumes at a time
    (a lookup through the table's ``source_uri`` index, not a scan of the table)."""
    cols = ["source_uri", *columns]
    for chunk in _chunks(uris):
        t = index.to_arrow(cols, where=f"source_uri IN ({', '.join(map(quote, chunk))})")
        yield from zip(*(t.column(c).to_pylist() for c in cols), strict=True)


def _indexed(index: CodeIndex, objects: Sequence[SourceObject]) -> dict[str, str]:
    """``uri -> when its codes were written`` of each volume the code table holds at its listed etag."""
    etag_of = {o.uri: o.etag for o in objects}
    out: dict[str, str] = {}
    for u, etag, at in _rows_of(index, list(etag_of), ["etag", "indexed_at"]):
        if etag == etag_of.get(u):
            out[u] = max(out.get(u, ""), at.isoformat() if at is not None else "")
    return out


def _in_table(index: CodeIndex, uris: Sequence[str]) -> set[str]:
    """Those of ``uris`` the code table still holds rows of."""
    return {u for (u,) in _rows_of(index, uris, [])}


def _registrations(index: CodeIndex, objects: Sequence[SourceObject]) -> dict[str, dict[str, Any]]:
    """The registration recorded with each volume's codes at its listed etag (where one was)."""
    etag_of = {o.uri: o.etag for o in objects}
    regs: dict[str, dict[str, Any]] = {}
    for u, etag, extra in _rows_of(index, list(etag_of), ["etag", "extra"]):
        if etag == etag_of.get(u) and extra and REGISTRATION_KEY in extra:
            reg = json.loads(extra).get(REGISTRATION_KEY)
            if isinstance(reg, dict) and "subject" in reg:
                regs[u] = reg
    return regs


def _error_text(err: BaseException) -> str:
    text = str(err) if isinstance(err, MedretError) else f"{type(err).__name__}: {err}"
    return text.splitlines()[0][:500] if text else type(err).__name__


def carry_masks(
    work: Sequence[MaskWork], store: ObjectStore, config: LesionGridConfig
) -> list[tuple[str, str, list[dict[str, Any]] | str]]:
    """Lesion rows of each volume: its mask read from ``store`` and carried through its recorded registration.

    Returns ``(uri, fault, rows)`` per volume, or ``(uri, fault, error)`` where reading or carrying failed
    (``fault`` as :func:`medret.errors.fault_of` says: "object" for a bad mask, "infra" or "auth" for a
    store that fails, after which the task's other masks are not tried). A mask with no lesion voxel (a
    negative case) makes no rows and no error.
    """
    from medret.io.volume import read_nifti
    from medret.preprocess.mri.recipe import deterministic_itk

    out: list[tuple[str, str, list[dict[str, Any]] | str]] = []
    try:
        deterministic_itk()
        encoder = create_lesion_encoder(config)
    except Exception as err:  # no template here (a worker without the data): every mask of the task is left out
        return [
            (w.uri, "object", f"{w.mask_uri}: the lesion encoder could not start: {_error_text(err)}") for w in work
        ]
    for i, w in enumerate(work):
        try:
            labels = read_nifti(store.read_bytes(w.mask_key), name=w.mask_uri)
            if not labels.array.any():
                out.append((w.uri, "", []))
                continue
            reg = Registration.from_dict(w.registration)
            subject = VolumeGrid.from_dict(w.registration["subject"])
            carried = carry_lesion(labels, subject, reg, encoder.grid, name=w.mask_uri)
            slices = encoder.encode_volume(carried)
            rows = lesion_rows(w.uri, slices, patient=w.patient, mask_uri=w.mask_uri, version=w.version)
            out.append((w.uri, "", rows))
        except Exception as err:  # one bad mask fails its volume, not the task
            fault = fault_of(err)
            out.append((w.uri, fault, _error_text(err)))
            if fault in ("infra", "auth"):  # the store is down: the job stops, the rest waits for the next run
                out += [(v.uri, fault, "not tried: the store failed") for v in work[i + 1 :]]
                break
    return out


def check_lesion_config(uri: str, table: str, config: LesionGridConfig, s3: S3Config | None = None) -> None:
    """Refuse, before a run writes anything, a lesion config other than the one the table's lesion table
    was built with (:meth:`LesionTable.for_index` says which)."""
    if LesionTable.exists(uri, table, s3):
        LesionTable.for_index(uri, table, config, s3)


def sync_lesions(
    index: CodeIndex,
    objects: Sequence[SourceObject],
    store: ObjectStore,
    config: LesionGridConfig,
    *,
    s3: S3Config | None = None,
    on_error: str = "quarantine",
    say: Callable[[str], None] | None = None,
) -> LesionSync | None:
    """Bring ``<table>__lesions`` level with the source after the run's commits; None when no volume of the
    source has a mask and the table has no lesion table.

    ``objects`` is the run's listing (each with its :attr:`~SourceObject.mask`). A volume's rows are remade
    when its image (etag, or the time its codes were written) or its mask (key, etag) differs from what its
    rows record, and only once its image is indexed at the listed etag (its recorded registration is what
    carries the mask). Rows are removed for a volume listed without a mask and for one whose codes left
    the table; a volume this run does not list (another source's) keeps its rows. A bad mask (unreadable,
    on another grid, values not among the configured labels) removes the volume's rows and is listed in
    ``failed``; ``on_error="fail"`` raises it instead. A store that fails raises (nothing is removed for it).
    """
    t0 = time.perf_counter()
    volumes = {o.uri: o for o in objects if o.mask}
    if not volumes and not LesionTable.exists(index.uri, index.name, s3):
        return None
    lt = LesionTable.for_index(index.uri, index.name, config, s3)
    have = lt.versions()
    out = LesionSync(volumes=len(volumes))
    indexed = _indexed(index, list(volumes.values()))
    want = {u: version_of(o, indexed.get(u, "")) for u, o in volumes.items()}
    pending = [o for o in volumes.values() if have.get(o.uri) != want[o.uri]]
    out.unchanged = len(volumes) - len(pending)
    regs = _registrations(index, [o for o in pending if o.uri in indexed])
    # rows of volumes this run lists without a mask, or whose codes are gone from the table; not of volumes
    # another source (another run) indexed into it
    listed = {o.uri for o in objects}
    stale = set(have) - set(volumes)
    unlisted = sorted(stale - listed)
    drop = sorted(stale & listed) + sorted(set(unlisted) - _in_table(index, unlisted))
    work: list[MaskWork] = []
    for o in pending:
        mask_uri = store.uri_of(o.mask)
        reg = regs.get(o.uri)
        if not o.mask_etag:
            why = f"named as the lesion mask of {o.uri} by its sidecar's mask_path, but the source holds no such object"
            out.failed.append({"uri": mask_uri, "error": f"{mask_uri}: {why}"})
        elif reg is not None and reg.get("template", config.template) != config.template:
            why = (
                f"its image {o.uri} was registered to the {reg.get('template')!r} template, but the lesion table's "
                f"grid is over {config.template!r}; set the job's lesions.template to {reg.get('template')!r}"
            )
            out.failed.append({"uri": mask_uri, "error": f"{mask_uri}: {why}"})
        elif reg is not None:
            work.append(MaskWork(o.uri, o.mask, mask_uri, want[o.uri], patient_of(o), reg))
            continue
        elif o.uri in indexed:
            why = (
                f"its image {o.uri} was indexed without a recorded registration (not by the mri-brain recipe, or by "
                "an older medret); re-index the image (force) to make its lesion mask searchable"
            )
            out.failed.append({"uri": mask_uri, "error": f"{mask_uri}: {why}"})
        if o.uri in have:  # not searchable until its image is indexed and its mask carried
            drop.append(o.uri)
    for chunk in _chunks(drop, 500):
        lt.replace(chunk, [])
    out.removed += len(drop)
    if work:
        if say:
            say(f"carrying {len(work)} lesion mask(s) into template space")
        _run(work, store, config, lt, have, out)
    out.seconds = time.perf_counter() - t0
    for f in out.failed:
        log.warning("lesion mask left out: %s", f["error"])
    if out.failed and on_error == "fail":
        first = out.failed[0]
        raise DataError(f"{first['error']} (on_error=fail stops the job; {len(out.failed)} bad lesion mask(s))")
    return out


def _run(
    work: Sequence[MaskWork],
    store: ObjectStore,
    config: LesionGridConfig,
    lt: LesionTable,
    have: Mapping[str, str],
    out: LesionSync,
) -> None:
    """Carry the masks in Ray tasks, committing every :data:`COMMIT_VOLUMES` volumes as they come home; on a
    store fault, what is done is committed, the tasks not yet done are cancelled, and the fault is raised."""
    import ray
    from ray.exceptions import RayError

    from medret.errors import StorageAuthError, StorageUnavailableError
    from medret.runtime import ensure_ray

    ensure_ray(log_to_driver=False)
    task = ray.remote(num_cpus=1)(carry_masks)
    mask_of = {w.uri: w.mask_uri for w in work}
    parts = {}
    for i in range(0, len(work), TASK_VOLUMES):
        part = work[i : i + TASK_VOLUMES]
        parts[task.remote(part, store, config)] = part
    refs = list(parts)
    uris: list[str] = []
    rows: list[dict[str, Any]] = []
    infra: tuple[str, str] | None = None

    def commit() -> None:
        if uris:
            try:
                lt.replace(uris, rows)
            except MedretError:
                raise
            except Exception as err:
                raise IndexStoreError(f"writing the lesion table {lt.name} at {lt.uri}: {err}") from err
            out.written += len({r["source_uri"] for r in rows})
            out.rows += len(rows)
            uris.clear()
            rows.clear()

    def bad(uri: str, error: str) -> None:
        out.failed.append({"uri": mask_of[uri], "error": error})
        if uri in have:  # rows of the mask before: stale now
            uris.append(uri)
            out.removed += 1

    while refs and infra is None:
        done, refs = ray.wait(refs, num_returns=1)
        try:
            results = ray.get(done[0])
        except RayError as err:  # the worker died carrying them (e.g. out of memory on a huge mask)
            results = [
                (w.uri, "object", f"{w.mask_uri}: the task carrying it failed: {_error_text(err)}")
                for w in parts[done[0]]
            ]
        for uri, fault, got in results:
            if not fault:
                uris.append(uri)
                rows.extend(got)
                out.empty += not got
            elif fault in ("infra", "auth"):
                infra = infra or (fault, str(got))
            elif fault == "object":
                bad(uri, str(got))
            # "gone": the mask vanished after the listing; the next run lists the source without it
        if len(uris) >= COMMIT_VOLUMES:
            commit()
    for ref in refs:  # a store fault: the rest waits for the next run
        ray.cancel(ref)
    commit()
    if infra:
        raise (StorageAuthError if infra[0] == "auth" else StorageUnavailableError)(infra[1])
