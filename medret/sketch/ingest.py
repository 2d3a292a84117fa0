"""The indexing job's hook: a volume, its lesion mask and the recipe's result -> lesion table rows.

A lesion label volume travels beside its image: a file named like the image with ``_seg`` or
``_mask`` before the extension (``case.nii.gz`` -> ``case_seg.nii.gz``), or the sidecar CSV's
``mask_path`` column. The job (not this floor) reads it and calls :func:`lesion_slices` with the
image's :class:`~medret.preprocess.mri.recipe.BrainResult`, then :func:`sync_job_lesions` after
the code table's commit. Volumes without a mask get no rows and are not sketch-searchable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from medret.config import S3Config
from medret.io.volume import Volume
from medret.preprocess.mri.recipe import BrainResult
from medret.sketch.carry import carry_lesion
from medret.sketch.encoder import LesionEncoder, LesionSlice
from medret.sketch.store import LesionTable, lesion_rows

MASK_SUFFIXES = ("_seg", "_mask")
_EXT = re.compile(r"(\.nii\.gz|\.nii|\.nrrd|\.mha|\.mhd)$", re.IGNORECASE)


def is_lesion_mask(name: str) -> bool:
    """Whether an object's name marks it as a lesion mask (never indexed as an image)."""
    stem = _EXT.sub("", name)
    return stem != name and stem.lower().endswith(MASK_SUFFIXES)


def mask_names(image_name: str) -> list[str]:
    """The names a lesion mask of ``image_name`` may have beside it, in order of preference."""
    m = _EXT.search(image_name)
    if not m:
        return []
    stem, ext = image_name[: m.start()], m.group(1)
    return [f"{stem}{s}{ext}" for s in MASK_SUFFIXES]


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
