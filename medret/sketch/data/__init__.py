"""The lesion mask medret ships: the reviewed FLAIR hyperintensity of the real TCGA-LGG case in
``../shared/data/mri`` (how it was made and reviewed: ``README.md`` here). The tests, the sketch
benchmark and the demo use it."""

from __future__ import annotations

from pathlib import Path

#: the lesion mask of ``mri/brainles__TCGA-FG-6692_fla.nii.gz``, on that FLAIR's own grid, label 1
TCGA_MASK = Path(__file__).with_name("TCGA-FG-6692_fla_mask.nii.gz")
#: the image it belongs to, under the data root (``medret.config.data_root()``)
TCGA_FLAIR = "mri/brainles__TCGA-FG-6692_fla.nii.gz"
