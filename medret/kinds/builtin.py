"""The kinds medret ships, in the order their default routes are tried."""

from __future__ import annotations

from medret.kinds.base import Kind
from medret.kinds.dicom import Dicom
from medret.kinds.medmnist import MedMNIST
from medret.kinds.nifti import Nifti
from medret.kinds.raster import Raster
from medret.kinds.routing import Auto, Sidecar, Skip
from medret.kinds.series import DicomSeries
from medret.kinds.wsi import Tiff, Wsi

KINDS: tuple[type[Kind], ...] = (Auto, Sidecar, Dicom, DicomSeries, Nifti, Wsi, Tiff, MedMNIST, Raster, Skip)
