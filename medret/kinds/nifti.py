"""``nifti``: a NIfTI-1/2 volume (brain MRI), registered and sliced by the ``mri-brain`` recipe."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from medret.kinds.base import Item, Kind, ReadContext, Unit, stats


class Nifti(Kind):
    name = "nifti"
    description = "a NIfTI volume (brain MRI): reoriented, registered to the template, one input per axial level"
    patterns = ("*.nii.gz", "*.nii")
    suffixes = (".nii", ".nii.gz")
    default_recipe = "mri-brain"
    recipe_input = "volume"
    order = 40
    query_mode = "nifti"
    query_choice = "slice"
    heavy = True

    def recognise(self, name: str, head: bytes) -> bool:
        if head.startswith(b"\x1f\x8b") and "".join(PurePosixPath(name.lower()).suffixes[-2:]).endswith(".nii.gz"):
            return True
        if head.startswith(b"\x1f\x8b") and name.lower().endswith(".nii"):
            return True
        return head[344:348] in (b"n+1\x00", b"ni1\x00") or head[:4] == b"n+2\x00"

    def items(self, ctx: ReadContext, unit: Unit, data: bytes | None) -> list[Item]:
        from medret.io.volume import read_nifti

        volume = read_nifti(data if data is not None else b"", name=unit.uri, pixel_budget=ctx.pixel_budget)
        return Item.of(ctx.recipe(self.name)(volume, input_size=ctx.input_size), {"modality": "MR", **volume.meta})

    def describe(self, path: Path, label: str, **options: Any) -> dict[str, Any]:
        from medret.io.volume import read_nifti

        v = read_nifti(path, name=label, pixel_budget=options["pixel_budget"])
        out: dict[str, Any] = {
            "reader": "nibabel",
            **stats(v.array),
            "spacing_mm": [round(s, 4) for s in v.spacing],
            "orientation": v.orientation,
            "origin_mm": [round(o, 2) for o in v.origin],
            "meta": v.meta,
        }
        if options.get("preprocess"):
            from medret.preprocess.mri.recipe import describe, load_template, preprocess_brain

            out["preprocess"] = describe(preprocess_brain(v, load_template("robex")))
        return out
