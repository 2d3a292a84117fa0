"""Step 2: similarity (rigid + scale) then affine registration of a subject to a template (SimpleITK, Mattes MI).

Both images are resampled to a coarse isotropic grid first (registration at 1 mm
buys nothing for an affine model and costs ~10x the time), then registered
multi-resolution. The result keeps the transform in both directions so results in
template space map back to the subject and vice versa.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.errors import PreprocessError
from medret.io.volume import Volume


@dataclass(frozen=True)
class RegistrationConfig:
    resolution_mm: float = 3.0
    shrink: tuple[int, ...] = (2, 1)
    smoothing_mm: tuple[float, ...] = (4.0, 0.0)
    bins: int = 32
    sampling: float = 0.25
    rigid_iterations: int = 200
    affine_iterations: int = 200
    mask_margin_mm: float = 25.0
    init: str = "moments"
    start_angle_deg: float = 15.0
    start_angle_steps: int = 2
    start_shift_mm: float = 15.0
    seed: int = 7


@dataclass(frozen=True)
class Registration:
    """``transform`` maps template (fixed) points to subject (moving) points, in LPS millimetres."""

    transform: Any
    metric: float
    seconds: float

    @property
    def inverse(self) -> Any:
        return self.transform.GetInverse()

    def to_subject(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.array([self.transform.TransformPoint(tuple(map(float, p))) for p in points])

    def to_template(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        inv = self.inverse
        return np.array([inv.TransformPoint(tuple(map(float, p))) for p in points])

    def as_dict(self) -> dict[str, Any]:
        t = self.transform
        return {
            "matrix": list(t.GetMatrix()),
            "translation": list(t.GetTranslation()),
            "center": list(t.GetCenter()),
            "metric": self.metric,
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Registration:
        """The affine :meth:`as_dict` recorded, rebuilt exactly (JSON keeps every bit of a float)."""
        import SimpleITK as sitk

        t = sitk.AffineTransform(3)
        t.SetMatrix([float(v) for v in d["matrix"]])
        t.SetTranslation([float(v) for v in d["translation"]])
        t.SetCenter([float(v) for v in d["center"]])
        return cls(transform=t, metric=float(d.get("metric", float("nan"))), seconds=float(d.get("seconds", 0.0)))


def coarse(img: Any, resolution_mm: float) -> Any:
    """Smooth and resample to an isotropic grid of ``resolution_mm`` covering the same extent."""
    import SimpleITK as sitk

    spacing = np.array(img.GetSpacing())
    size = np.array(img.GetSize())
    new_size = np.maximum(np.round(size * spacing / resolution_mm), 1).astype(int)
    sigma = [max((resolution_mm - s) / 2.0, 0.05 * s) for s in spacing]
    smooth = sitk.SmoothingRecursiveGaussian(img, sigma)
    return sitk.Resample(
        smooth,
        [int(s) for s in new_size],
        sitk.Transform(),
        sitk.sitkLinear,
        img.GetOrigin(),
        [resolution_mm] * 3,
        img.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )


def _method(cfg: RegistrationConfig, iterations: int, region: Any = None) -> Any:
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    if region is not None:
        reg.SetMetricFixedMask(region)
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=cfg.bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(cfg.sampling, cfg.seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=iterations, relaxationFactor=0.6
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(cfg.shrink))
    reg.SetSmoothingSigmasPerLevel(list(cfg.smoothing_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def _region(mask: Volume, like: Any, margin_mm: float) -> Any:
    """The template's brain mask grown by ``margin_mm``, on the coarse fixed grid: where the metric looks."""
    import SimpleITK as sitk

    m = sitk.Resample(mask.to_sitk(), like, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32) > 0.5
    radius = max(round(margin_mm / like.GetSpacing()[0]), 0)
    return sitk.BinaryDilate(m, [radius] * 3) if radius else m


def _best_start(fixed: Any, moving: Any, init: Any, cfg: RegistrationConfig, region: Any) -> Any:
    """Exhaustive search over a coarse grid of rotations (each axis) and superior-inferior shifts.

    A centre-of-mass start is often far off (necks, cropped fields of view, tilted
    heads) and gradient descent from there stalls in a local optimum; evaluating the
    metric on a small grid around it (5^3 x 3 = 375 metric evaluations on the
    coarse image, about a second) finds the right basin first.
    """
    import SimpleITK as sitk

    if cfg.start_angle_deg <= 0 and cfg.start_shift_mm <= 0:
        return init
    angle = np.deg2rad(cfg.start_angle_deg)
    reg = _method(cfg, 0, region)
    reg.SetShrinkFactorsPerLevel([1])
    reg.SetSmoothingSigmasPerLevel([0.0])
    n_rot = cfg.start_angle_steps if angle > 0 else 0
    n_shift = 1 if cfg.start_shift_mm > 0 else 0
    reg.SetOptimizerAsExhaustive([n_rot, n_rot, n_rot, 0, 0, n_shift], stepLength=1.0)
    reg.SetOptimizerScales([angle / max(n_rot, 1) or 1.0] * 3 + [1.0, 1.0, cfg.start_shift_mm or 1.0])
    start = sitk.Euler3DTransform(init)
    reg.SetInitialTransform(start, inPlace=True)
    reg.Execute(fixed, moving)
    return start


def _with_params_of(dst: Any, src: Any) -> Any:
    """``dst`` set to the same centre, matrix and translation as ``src`` (a more general transform)."""
    dst.SetCenter(src.GetCenter())
    dst.SetMatrix(src.GetMatrix())
    dst.SetTranslation(src.GetTranslation())
    return dst


def register(
    subject: Volume, template: Volume, cfg: RegistrationConfig | None = None, *, template_mask: Volume | None = None
) -> Registration:
    """Estimate the affine transform from template space to subject space.

    With ``template_mask`` (the template's brain), the metric is computed only within
    ``mask_margin_mm`` of the brain, so a template's neck or a subject's cropped
    field of view cannot pull the fit away from the head.
    """
    import SimpleITK as sitk

    cfg = cfg or RegistrationConfig()
    t0 = time.perf_counter()
    fixed = coarse(template.to_sitk(), cfg.resolution_mm)
    moving = coarse(subject.to_sitk(), cfg.resolution_mm)
    region = _region(template_mask, fixed, cfg.mask_margin_mm) if template_mask is not None else None
    mode = (
        sitk.CenteredTransformInitializerFilter.MOMENTS
        if cfg.init == "moments"
        else (sitk.CenteredTransformInitializerFilter.GEOMETRY)
    )
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(), mode)
    try:
        start = _best_start(fixed, moving, init, cfg, region)
        similarity = _with_params_of(sitk.Similarity3DTransform(), start)
        rigid_reg = _method(cfg, cfg.rigid_iterations, region)
        rigid_reg.SetInitialTransform(similarity, inPlace=True)
        rigid_reg.Execute(fixed, moving)
        affine = _with_params_of(sitk.AffineTransform(3), similarity)
        affine_reg = _method(cfg, cfg.affine_iterations, region)
        affine_reg.SetInitialTransform(affine, inPlace=True)
        affine_reg.Execute(fixed, moving)
        metric = float(affine_reg.GetMetricValue())
    except RuntimeError as err:
        raise PreprocessError(f"registration to the template failed: {err}") from err
    return Registration(transform=affine, metric=metric, seconds=time.perf_counter() - t0)


def to_template_space(subject: Volume, template: Volume, reg: Registration, *, spacing_mm: float = 0.0) -> Volume:
    """Resample the subject onto the template's grid (or a coarser isotropic one) through ``reg``."""
    import SimpleITK as sitk

    ref = template.to_sitk()
    if spacing_mm > 0:
        ref = coarse(ref, spacing_mm)
    out = sitk.Resample(subject.to_sitk(), ref, reg.transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return Volume.from_sitk(out, {**subject.meta, "space": "template"})
