"""A lesion mask carried through its image's registration lands where it was drawn in template space."""

from __future__ import annotations

from typing import Any as Case

import numpy as np
import pytest

from medret.errors import DataError
from medret.io.volume import Volume
from medret.preprocess.mri.skullstrip import dice
from medret.sketch.carry import carry_lesion
from medret.sketch.encoder import RasterEncoder
from medret.sketch.grid import TemplateGrid
from medret.sketch.score import dice_reference

pytestmark = pytest.mark.slow


def test_a_carried_lesion_lands_where_it_was_drawn(moved_case: Case) -> None:
    assert moved_case.drawn is not None
    for value in (1, 2):
        d = dice(moved_case.carried == value, moved_case.drawn == value)
        assert d >= 0.9, f"label {value}: Dice {d:.3f} against the lesion drawn in template space"
    # nearest neighbour: no label values that were not in the mask
    assert set(np.unique(moved_case.carried)) <= {0, 1, 2}


def test_its_codes_match_the_codes_of_the_drawn_lesion(moved_case: Case, encoder: RasterEncoder) -> None:
    assert moved_case.drawn is not None
    got = {(s.level, s.cls): s for s in encoder.encode_volume(moved_case.carried)}
    want = {(s.level, s.cls): s for s in encoder.encode_volume(moved_case.drawn)}
    assert {"edema", "enhancing"} == {c for _, c in want}
    shared = got.keys() & want.keys()
    assert len(shared) >= 0.8 * len(want)
    big = [k for k in shared if want[k].bits >= 10]
    assert big
    for k in big:
        assert dice_reference(got[k].code[None], want[k].code)[0] >= 0.8, k
    lf = [s for s in want.values() if s.cls == "enhancing"]
    assert all(s.hemisphere == "left" for s in lf)


def test_the_tcga_lesion_lands_in_the_right_frontal_lobe(tcga_case: Case, encoder: RasterEncoder) -> None:
    slices = [s for s in encoder.encode_volume(tcga_case.carried) if s.cls == "edema"]
    assert slices, "the real lesion produced no lesion codes"
    biggest = max(slices, key=lambda s: s.area_mm2)
    assert biggest.hemisphere == "right"
    from medret.sketch.regions import NAMES

    assert NAMES[int(biggest.profile.argmax())] in ("right_frontal", "right_deep")
    # voxels: the carried lesion keeps its volume (nearest neighbour, affine with little scale)
    vox = float(np.prod(tcga_case.mask.spacing))
    assert (tcga_case.carried > 0).sum() == pytest.approx((tcga_case.mask.array > 0).sum() * vox, rel=0.25)


def test_a_mask_on_another_grid_is_refused_by_name(tcga_case: Case, grid: TemplateGrid) -> None:
    m = tcga_case.mask
    wrong = Volume(m.array[:, :, :-4], m.spacing, m.origin, m.direction, {})
    with pytest.raises(DataError, match=r"case_seg\.nii\.gz: the lesion mask's grid .* differs from its image's"):
        carry_lesion(wrong, tcga_case.result.subject, tcga_case.result.registration, grid, name="case_seg.nii.gz")
    empty = Volume(np.zeros_like(m.array), m.spacing, m.origin, m.direction, {})
    with pytest.raises(DataError, match="case_seg.nii.gz: the lesion mask marks no lesion"):
        carry_lesion(empty, tcga_case.result.subject, tcga_case.result.registration, grid, name="case_seg.nii.gz")
    odd = Volume(np.where(m.array > 0, 7.0, 0.0) + (m.array == 0) * 0, m.spacing, m.origin, m.direction, {})
    odd.array[0, 0, 0] = 3.0
    with pytest.raises(DataError, match=r"values \[3\.0, 7\.0\] are not among the configured labels"):
        carry_lesion(odd, tcga_case.result.subject, tcga_case.result.registration, grid, name="case_seg.nii.gz")
