"""Brain MRI: volumes from NIfTI and DICOM series, and the recipe's quality on real volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medret.errors import DataError
from medret.io.volume import Volume, dicom_series, read_dicom_series, read_nifti
from medret.preprocess.mri.bias import n4_correct
from medret.preprocess.mri.normalize import normalize
from medret.preprocess.mri.orient import reorient
from medret.preprocess.mri.recipe import load_template, preprocess_brain
from medret.preprocess.mri.register import register
from medret.preprocess.mri.skullstrip import dice, skull_strip

MRI = "mri"


@pytest.fixture(scope="module")
def colin(data_dir: Path) -> tuple[Volume, Volume]:
    return read_nifti(data_dir / MRI / "mricron__ch2.nii.gz"), read_nifti(data_dir / MRI / "mricron__ch2bet.nii.gz")


def random_affine(img: object, rng: np.random.Generator) -> object:
    """Rotations up to 15 degrees, shifts up to 15 mm, scaling up to 8% (the issue's bounds)."""
    import SimpleITK as sitk

    euler = sitk.Euler3DTransform()
    euler.SetRotation(*np.deg2rad(rng.uniform(-15, 15, 3)))
    matrix = np.array(euler.GetMatrix()).reshape(3, 3) @ np.diag(rng.uniform(0.92, 1.08, 3))
    t = sitk.AffineTransform(3)
    t.SetMatrix(matrix.ravel().tolist())
    t.SetTranslation(rng.uniform(-15, 15, 3).tolist())
    t.SetCenter(img.TransformContinuousIndexToPhysicalPoint([s / 2 for s in img.GetSize()]))  # type: ignore[attr-defined]
    return t


def moved(vol: Volume, transform: object, *, mask: bool = False) -> Volume:
    import SimpleITK as sitk

    img = vol.to_sitk()
    out = sitk.Resample(img, img, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out)
    return Volume((arr > 0.5).astype(np.float32) if mask else arr, vol.spacing, vol.origin, vol.direction, {})


def test_nifti_matches_simpleitk(data_dir: Path) -> None:
    import SimpleITK as sitk

    for name in ("brainles__TCGA-FG-6692_t1c.nii.gz", "mricron__chris_t1.nii.gz"):
        v = read_nifti(data_dir / MRI / name)
        ref = sitk.ReadImage(str(data_dir / MRI / name))
        np.testing.assert_array_equal(v.array, sitk.GetArrayFromImage(ref).astype(np.float32))
        np.testing.assert_allclose(v.spacing, ref.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(v.origin, ref.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(v.direction, ref.GetDirection(), atol=1e-6)


def test_reorient_preserves_world(colin: tuple[Volume, Volume]) -> None:
    vol, _ = colin
    assert vol.orientation == "RAS"
    lps = reorient(vol, "LPS")
    assert lps.orientation == "LPS"
    img, img2 = vol.to_sitk(), lps.to_sitk()
    p = img.TransformIndexToPhysicalPoint((40, 90, 100))
    idx = img2.TransformPhysicalPointToIndex(p)
    assert vol.array[100, 90, 40] == lps.array[idx[2], idx[1], idx[0]]


def write_series(vol: Volume, folder: Path) -> list[Path]:
    """Write a real volume as a DICOM MR series (one file per slice, shuffled names, with patient names)."""
    paths = []
    for name, data in dicom_series(vol, attrs={"PatientName": "Doe^Jane", "PatientID": "PID-12345"}, seed=3):
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def test_dicom_series_roundtrip(data_dir: Path, tmp_path: Path) -> None:
    vol = read_nifti(data_dir / MRI / "brainles__TCGA-FG-6692_t1c.nii.gz")
    paths = write_series(vol, tmp_path)
    [out] = read_dicom_series([(p.name, p.read_bytes()) for p in paths])
    # DICOM stacks along row x column, so a left-handed NIfTI grid comes back flipped in z:
    # the same voxels in the same world positions. Compare in one canonical layout.
    out, vol = reorient(out, "LPS"), reorient(vol, "LPS")
    np.testing.assert_array_equal(out.array, vol.array)
    np.testing.assert_allclose(out.spacing, vol.spacing, rtol=1e-5)
    np.testing.assert_allclose(out.origin, vol.origin, atol=1e-3)
    np.testing.assert_allclose(out.direction, vol.direction, atol=1e-5)
    assert "Doe" not in str(out.meta) and "PID-12345" not in str(out.meta)
    # A missing slice breaks the spacing check, naming the slice after the gap.
    import pydicom

    by_position = sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    gappy = [(p.name, p.read_bytes()) for p in by_position if p != by_position[10]]
    with pytest.raises(DataError, match="slice gap"):
        read_dicom_series(gappy)


def test_registration_recovers_known_affine(colin: tuple[Volume, Volume]) -> None:
    vol, brain = colin
    rng = np.random.default_rng(2026)
    for _ in range(2):
        a = random_affine(vol.to_sitk(), rng)
        reg = register(moved(vol, a), vol)
        bimg = brain.to_sitk()
        idx = np.argwhere(brain.array > 0)[::500]
        pts = [bimg.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in idx]
        back = np.array([a.TransformPoint(reg.transform.TransformPoint(p)) for p in pts])  # type: ignore[attr-defined]
        err = np.linalg.norm(back - np.array(pts), axis=1)
        assert err.mean() < 2.0, f"mean displacement {err.mean():.2f} mm"


def test_skull_strip_colin_with_other_template(colin: tuple[Volume, Volume]) -> None:
    vol, brain = colin
    template = load_template("robex", "RAS")
    rng = np.random.default_rng(7)
    for _ in range(2):
        a = random_affine(vol.to_sitk(), rng)
        subject, truth = moved(vol, a), moved(brain, a, mask=True).array > 0
        reg = register(subject, template.image, template_mask=template.mask)
        mask = skull_strip(subject, template.mask, reg)
        assert dice(mask, truth) >= 0.90


def test_skull_strip_tcga_t1c(data_dir: Path) -> None:
    vol = read_nifti(data_dir / MRI / "brainles__TCGA-FG-6692_t1c.nii.gz")
    truth = read_nifti(data_dir / MRI / "brainles__TCGA-FG-6692_t1c_brainmask.nii.gz").array > 0
    result = preprocess_brain(vol, load_template("robex", "LAS"), _cfg("LAS"))
    assert dice(result.mask, truth) >= 0.85
    assert result.slices.shape[0] == 4 and np.isfinite(result.slices).all()
    assert set(result.timings) >= {"reorient", "register", "skull_strip", "n4", "normalize", "slices"}
    from medret.preprocess.recipes import RECIPES

    prepared = RECIPES.get("mri-brain")(vol, input_size=(64, 64))
    assert len(prepared) == 4 and all(p.image.shape == (64, 64) for p in prepared)


def _cfg(orientation: str):  # type: ignore[no-untyped-def]
    from medret.preprocess.mri.recipe import MRIRecipeConfig

    return MRIRecipeConfig(orientation=orientation)


def test_n4_removes_a_known_bias(colin: tuple[Volume, Volume]) -> None:
    vol, brain = colin
    mask = brain.array > 0
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in vol.array.shape], indexing="ij")
    field = np.exp(0.25 * x + 0.2 * y - 0.15 * z + 0.2 * (x * x - y * z)).astype(np.float32)
    biased = Volume(vol.array * field, vol.spacing, vol.origin, vol.direction, {})

    def cov(a: np.ndarray) -> float:
        return float(a[mask].std() / a[mask].mean())

    corrected, _ = n4_correct(biased, mask)
    assert cov(biased.array) > 1.1 * cov(vol.array)  # the bias is measurable
    assert abs(cov(corrected.array) - cov(vol.array)) <= 0.10 * cov(vol.array)


def test_normalize_zscore_inside_mask() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(50, 5, (8, 8, 8)).astype(np.float32)
    m = np.zeros_like(a, bool)
    m[2:6, 2:6, 2:6] = True
    out = normalize(a, m)
    assert abs(out[m].mean()) < 1e-5 and abs(out[m].std() - 1) < 1e-4 and (out[~m] == 0).all()
