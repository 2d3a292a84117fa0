"""Real volumes through medret's own registration, once per session: a template moved by a known affine with
lesions drawn in template space, and the TCGA-LGG FLAIR with its lesion mask; a lesion table of both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from medret.io.volume import Volume, read_nifti
from medret.preprocess.mri.recipe import BrainResult, load_template, preprocess_brain
from medret.sketch.carry import carry_lesion
from medret.sketch.data import TCGA_FLAIR, TCGA_MASK
from medret.sketch.encoder import RasterEncoder, load_grid
from medret.sketch.grid import LesionGridConfig, TemplateGrid, resample_to

CONFIG = LesionGridConfig(labels=((1, "edema"), (2, "enhancing")))


@dataclass(frozen=True)
class Case:
    image: Volume
    mask: Volume  # labels on the image's own grid
    result: BrainResult
    carried: np.ndarray  # labels on the reference grid, through the image's registration
    drawn: np.ndarray | None = None  # labels drawn directly in template space (where known)


def ellipsoid(
    tg: TemplateGrid, centre_mm: tuple[float, float, float], radii_mm: tuple[float, float, float]
) -> np.ndarray:
    z, y, x = np.ogrid[: tg.ref.array.shape[0], : tg.ref.array.shape[1], : tg.ref.array.shape[2]]
    ox, oy, oz = tg.ref.origin
    d = sum(((g + o - c) / r) ** 2 for g, o, c, r in zip((x, y, z), (ox, oy, oz), centre_mm, radii_mm, strict=True))
    return np.asarray(d <= 1.0)


def known_affine(centre: tuple[float, ...]) -> object:
    """Rotation ~10 degrees, 8 mm shift, 5% scale: subject points -> template points."""
    import SimpleITK as sitk

    euler = sitk.Euler3DTransform()
    euler.SetRotation(*np.deg2rad([8.0, -6.0, 10.0]))
    t = sitk.AffineTransform(3)
    t.SetMatrix((np.array(euler.GetMatrix()).reshape(3, 3) @ np.diag([1.05, 0.97, 1.03])).ravel().tolist())
    t.SetTranslation([8.0, -6.0, 5.0])
    t.SetCenter(centre)
    return t


@pytest.fixture(scope="session")
def grid() -> TemplateGrid:
    return load_grid(CONFIG)


@pytest.fixture(scope="session")
def encoder(grid: TemplateGrid) -> RasterEncoder:
    return RasterEncoder(grid)


@pytest.fixture(scope="session")
def moved_case(grid: TemplateGrid) -> Case:
    """The template head moved by a known affine, on a 1 mm grid, with three lesions (two classes)
    drawn in template space and carried into the subject by the same known transform."""
    template = load_template(CONFIG.template)
    ref = grid.ref
    z = grid.level_mm(14)
    drawn = np.zeros(ref.array.shape, np.int16)
    drawn[ellipsoid(grid, (35.0, -40.0, z), (14.0, 14.0, 14.0))] = 1  # left frontal edema
    drawn[ellipsoid(grid, (35.0, -40.0, z), (6.0, 6.0, 6.0))] = 2  # its enhancing core
    drawn[ellipsoid(grid, (-40.0, 20.0, z + 20), (20.0, 10.0, 8.0))] = 1  # right parietal, elongated
    centre = tuple(float(o + s / 2) for o, s in zip(ref.origin, ref.array.shape[::-1], strict=True))
    affine = known_affine(centre)
    moved = resample_to(template.image, ref, affine, nearest=False)
    labels = Volume(drawn.astype(np.float32), ref.spacing, ref.origin, ref.direction, {})
    subject_labels = resample_to(labels, ref, affine, nearest=True)
    image = Volume(moved * np.where(subject_labels > 0, 1.6, 1.0), ref.spacing, ref.origin, ref.direction, {})
    mask = Volume(subject_labels, ref.spacing, ref.origin, ref.direction, {})
    result = preprocess_brain(image, template)
    carried = carry_lesion(mask, result.subject, result.registration, grid, name="moved-template")
    return Case(image, mask, result, carried, drawn)


@pytest.fixture(scope="session")
def tcga_case(grid: TemplateGrid, data_dir: Path) -> Case:
    image = read_nifti(data_dir / TCGA_FLAIR)
    mask = read_nifti(TCGA_MASK)
    result = preprocess_brain(image, load_template(CONFIG.template))
    carried = carry_lesion(mask, result.subject, result.registration, grid, name=TCGA_MASK.name)
    return Case(image, mask, result, carried)


def synthetic_lesions(grid: TemplateGrid, n: int, seed: int = 11) -> dict[str, np.ndarray]:
    """``n`` ellipsoid lesions drawn directly in template space inside the brain (label 1, some with a core)."""
    rng = np.random.default_rng(seed)
    brain = np.argwhere(grid.brain[grid.z0 + 20 : grid.z0 + grid.n_levels * grid.config.level_mm - 20])
    out = {}
    for i in range(n):
        z, y, x = brain[rng.integers(len(brain))] + (grid.z0 + 20, 0, 0)
        ox, oy, oz = grid.ref.origin
        a, b, c = (float(r) for r in rng.uniform(5, 16, 3))
        radii = (a, b, c)
        lab = np.zeros(grid.ref.array.shape, np.int16)
        lab[ellipsoid(grid, (ox + x, oy + y, oz + z), radii) & grid.brain] = 1
        if i % 3 == 0:
            lab[ellipsoid(grid, (ox + x, oy + y, oz + z), (a / 2, b / 2, c / 2)) & grid.brain] = 2
        out[f"synthetic-{i:03d}"] = lab
    return out


@pytest.fixture(scope="session")
def lesion_index(
    tmp_path_factory: pytest.TempPathFactory, encoder: RasterEncoder, moved_case: Case, tcga_case: Case
) -> str:
    """A lesion table ``mri__lesions`` (next to no code table) with the two registered cases and 30 synthetic
    template-space patients."""
    from medret.sketch.ingest import sync_job_lesions

    uri = str(tmp_path_factory.mktemp("sketch-index"))
    volumes = {"file:///data/tcga_fla.nii.gz": encoder.encode_volume(tcga_case.carried)}
    volumes["file:///data/moved.nii.gz"] = encoder.encode_volume(moved_case.carried)
    patients = {"file:///data/tcga_fla.nii.gz": "TCGA-FG-6692", "file:///data/moved.nii.gz": "moved-template"}
    for name, lab in synthetic_lesions(encoder.grid, 30).items():
        volumes[f"file:///data/{name}.nii.gz"] = encoder.encode_volume(lab)
        patients[f"file:///data/{name}.nii.gz"] = name
    sync_job_lesions(uri, "mri", encoder, volumes, patients=patients)
    return uri
