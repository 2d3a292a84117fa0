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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
    from medret.pipelines.sources import SourceObject
    from medret.storage.objects import ObjectStore

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


def version_of(obj: SourceObject) -> str:
    """What a volume's lesion rows are made from: its image's etag and its mask's."""
    return f"{obj.etag}|{obj.mask_etag}"


def patient_of(obj: SourceObject) -> str:
    """The sidecar's ``patient`` (or ``patient_id``, ``study_uid``) column, else the volume itself."""
    for k in ("patient", "patient_id", "study_uid"):
        if obj.meta.get(k):
            return str(obj.meta[k])
    return obj.uri


def _registrations(index: CodeIndex, objects: Sequence[SourceObject]) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """The recorded registration of each volume indexed at its listed etag, and the volumes indexed at it."""
    regs: dict[str, dict[str, Any]] = {}
    indexed: set[str] = set()
    etag_of = {o.uri: o.etag for o in objects}
    uris = sorted(etag_of)
    for i in range(0, len(uris), 256):
        chunk = uris[i : i + 256]
        t = index.to_arrow(["source_uri", "etag", "extra"], where=f"source_uri IN ({', '.join(map(quote, chunk))})")
        for u, etag, extra in zip(*(t.column(c).to_pylist() for c in ("source_uri", "etag", "extra")), strict=True):
            if etag != etag_of.get(u):
                continue
            indexed.add(u)
            if extra and REGISTRATION_KEY in extra:
                reg = json.loads(extra).get(REGISTRATION_KEY)
                if isinstance(reg, dict) and "subject" in reg:
                    regs[u] = reg
    return regs, indexed


def _error_text(err: BaseException) -> str:
    text = str(err) if isinstance(err, MedretError) else f"{type(err).__name__}: {err}"
    return text.splitlines()[0][:500] if text else type(err).__name__


def carry_masks(
    work: Sequence[MaskWork], store: ObjectStore, config: LesionGridConfig
) -> list[tuple[str, str, list[dict[str, Any]] | str]]:
    """Lesion rows of each volume: its mask read from ``store`` and carried through its recorded registration.

    Returns ``(uri, fault, rows)`` per volume, or ``(uri, fault, error)`` where reading or carrying failed
    (``fault`` as :func:`medret.errors.fault_of` says: "object" for a bad mask, "infra" for a store down).
    """
    from medret.io.volume import read_nifti
    from medret.preprocess.mri.recipe import deterministic_itk

    deterministic_itk()
    encoder = create_lesion_encoder(config)
    out: list[tuple[str, str, list[dict[str, Any]] | str]] = []
    for w in work:
        try:
            labels = read_nifti(store.read_bytes(w.mask_key), name=w.mask_uri)
            reg = Registration.from_dict(w.registration)
            subject = VolumeGrid.from_dict(w.registration["subject"])
            carried = carry_lesion(labels, subject, reg, encoder.grid, name=w.mask_uri)
            slices = encoder.encode_volume(carried)
            rows = lesion_rows(w.uri, slices, patient=w.patient, mask_uri=w.mask_uri, version=w.version)
            out.append((w.uri, "", rows))
        except Exception as err:  # one bad mask fails its volume, not the task
            out.append((w.uri, fault_of(err), _error_text(err)))
    return out


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
    when its image or mask etag differs from the one its rows record, and only once its image is indexed at
    the listed etag (its recorded registration is what carries the mask). A bad mask (unreadable, on another
    grid, values not among the configured labels) removes the volume's rows and is listed in ``failed``;
    ``on_error="fail"`` raises it instead. A store that fails raises (nothing is removed for it).
    """
    t0 = time.perf_counter()
    volumes = {o.uri: o for o in objects if o.mask}
    if not volumes and not LesionTable.exists(index.uri, index.name, s3):
        return None
    lt = LesionTable.for_index(index.uri, index.name, config, s3)
    have = lt.versions()
    out = LesionSync(volumes=len(volumes))
    pending = [o for o in volumes.values() if have.get(o.uri) != version_of(o)]
    out.unchanged = len(volumes) - len(pending)
    regs, indexed = _registrations(index, pending)
    drop = sorted(set(have) - set(volumes))  # volumes gone from the source or that lost their mask
    work: list[MaskWork] = []
    for o in pending:
        mask_uri = store.uri_of(o.mask)
        if not o.mask_etag:
            out.failed.append(
                {
                    "uri": mask_uri,
                    "error": f"{mask_uri}: named as the lesion mask of {o.uri} by its "
                    "sidecar's mask_path, but the source holds no such object",
                }
            )
        elif o.uri in regs:
            work.append(MaskWork(o.uri, o.mask, mask_uri, version_of(o), patient_of(o), regs[o.uri]))
            continue
        elif o.uri in indexed:
            out.failed.append(
                {
                    "uri": mask_uri,
                    "error": f"{mask_uri}: its image {o.uri} was indexed without a "
                    "recorded registration (not by the mri-brain recipe, or by an older medret); "
                    "re-index the image (force) to make its lesion mask searchable",
                }
            )
        if o.uri in have:  # not indexed at this etag (a bad image): not searchable until it is
            drop.append(o.uri)
    if drop:
        lt.replace(drop, [])
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
    """Carry the masks in Ray tasks, committing every :data:`COMMIT_VOLUMES` volumes as they come home."""
    import ray

    from medret.errors import StorageAuthError, StorageUnavailableError
    from medret.runtime import ensure_ray

    ensure_ray(log_to_driver=False)
    task = ray.remote(num_cpus=1)(carry_masks)
    mask_of = {w.uri: w.mask_uri for w in work}
    refs = [task.remote(work[i : i + TASK_VOLUMES], store, config) for i in range(0, len(work), TASK_VOLUMES)]
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
            out.written += sum(1 for u in uris if any(r["source_uri"] == u for r in rows))
            out.rows += len(rows)
            uris.clear()
            rows.clear()

    while refs:
        done, refs = ray.wait(refs, num_returns=1)
        for uri, fault, got in ray.get(done[0]):
            if not fault:
                uris.append(uri)
                rows.extend(got)
            elif fault in ("infra", "auth"):
                infra = infra or (fault, str(got))
            elif fault == "object":
                out.failed.append({"uri": mask_of[uri], "error": str(got)})
                if uri in have:  # rows of the mask before: stale now
                    uris.append(uri)
                    out.removed += 1
            # "gone": the mask vanished after the listing; the next run lists the source without it
        if len(uris) >= COMMIT_VOLUMES:
            commit()
    commit()
    if infra:
        raise (StorageAuthError if infra[0] == "auth" else StorageUnavailableError)(infra[1])
