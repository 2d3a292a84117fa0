"""3-D volumes from NIfTI files and from DICOM series, in ITK's LPS world coordinates.

A :class:`Volume` is a plain array plus its geometry (spacing, origin, direction),
so preprocessing stays pure: arrays and millimetres in, arrays and millimetres out.
"""

from __future__ import annotations

import warnings
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.errors import CorruptFileError, DataError, NotAnImageError, TruncatedFileError
from medret.io.base import DEFAULT_PIXEL_BUDGET, Source, check_budget, read_source, source_name
from medret.io.dicom import check_pixels, parse_dicom, safe_metadata
from medret.io.guard import inflate

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Volume:
    """``array`` is indexed (z, y, x) like SimpleITK; spacing/origin are (x, y, z) in mm, LPS."""

    array: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major direction cosines (columns are the axes)
    meta: dict[str, Any]

    def to_sitk(self) -> Any:
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array, dtype=np.float32))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    @classmethod
    def from_sitk(cls, img: Any, meta: dict[str, Any] | None = None) -> Volume:
        import SimpleITK as sitk

        return cls(
            array=sitk.GetArrayFromImage(img).astype(np.float32, copy=False),
            spacing=tuple(img.GetSpacing()),
            origin=tuple(img.GetOrigin()),
            direction=tuple(img.GetDirection()),
            meta=dict(meta or {}),
        )

    @property
    def grid(self) -> VolumeGrid:
        """Its voxel grid without the voxels."""
        return VolumeGrid(tuple(self.array.shape), self.spacing, self.origin, self.direction)

    @property
    def orientation(self) -> str:
        """Three-letter DICOM orientation code of the array axes, e.g. ``LPS`` or ``RAS``."""
        import SimpleITK as sitk

        return str(sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(self.direction))


@dataclass(frozen=True)
class VolumeGrid:
    """A volume's voxel grid: ``shape`` (z, y, x) and the geometry of :class:`Volume`; JSON-recordable."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VolumeGrid:
        return cls(
            tuple(int(v) for v in d["shape"]),  # type: ignore[arg-type]
            tuple(float(v) for v in d["spacing"]),  # type: ignore[arg-type]
            tuple(float(v) for v in d["origin"]),  # type: ignore[arg-type]
            tuple(float(v) for v in d["direction"]),
        )


#: bytes of a NIfTI-2 header (the larger one) plus its extension flag
_HEADER_BYTES = 544


def _gunzip_head(data: bytes, label: str, n: int) -> bytes:
    """The first ``n`` inflated bytes of a gzip stream, inflating no more than that."""
    d = zlib.decompressobj(31)
    try:
        return d.decompress(data, n)
    except zlib.error as err:
        raise CorruptFileError(label, f"not a valid gzip stream ({err})") from err


def read_nifti(src: Source, *, name: str | None = None, pixel_budget: int = DEFAULT_PIXEL_BUDGET) -> Volume:
    """Decode a NIfTI-1/2 volume (``.nii`` or ``.nii.gz``) with nibabel, converting RAS to LPS."""
    import nibabel as nib

    label = source_name(src, name)
    raw = read_source(src, name)
    gz = raw[:2] == b"\x1f\x8b"
    head = _gunzip_head(raw, label, _HEADER_BYTES) if gz else raw
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            klass = nib.Nifti2Image if head[:4] == b"\x1c\x02\x00\x00" else nib.Nifti1Image
            header = klass.header_class.from_fileobj(_BytesReader(head))
    except Exception as err:
        raise CorruptFileError(label, f"not a NIfTI header ({type(err).__name__}: {err})") from err
    shape = tuple(int(d) for d in header.get_data_shape())
    if len(shape) < 3 or min(shape[:3]) < 1:
        raise NotAnImageError(label, f"NIfTI data shape {shape} is not a 3-D volume")
    voxels = int(np.prod(shape))
    check_budget(label, voxels, pixel_budget, "x".join(map(str, shape)))
    need = int(header.get_data_offset()) + voxels * header.get_data_dtype().itemsize
    if gz:  # inflate what the header declares and a little more, never a bomb's worth
        raw = inflate(raw, label, limit=need + (1 << 20), what=f" (the header declares {need:,})")
    if len(raw) < need:
        raise TruncatedFileError(label, f"volume data has {len(raw):,} bytes, the header declares {need:,}")
    img = klass.from_bytes(raw)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim > 3:
        data = data[..., 0] if data.shape[3] == 1 or data.ndim == 4 else data.reshape(shape[:3])
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    affine = np.asarray(img.affine, dtype=np.float64)
    lin = _RAS_TO_LPS @ affine[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    if not (spacing > 0).all():
        raise CorruptFileError(label, f"degenerate voxel-to-world matrix (spacing {spacing.tolist()})")
    direction = lin / spacing
    origin = _RAS_TO_LPS @ affine[:3, 3]
    meta = {"format": "nifti", "shape": list(shape[:3]), "datatype": str(header.get_data_dtype())}
    return Volume(
        array=np.ascontiguousarray(data.transpose(2, 1, 0)),
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in direction.ravel()),
        meta=meta,
    )


class _BytesReader:
    """The smallest file object nibabel's header parser accepts."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        out = self._data[self._pos : end]
        self._pos += len(out)
        return out

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else self._pos + pos if whence == 1 else len(self._data) + pos
        return self._pos

    def tell(self) -> int:
        return self._pos


#: Largest allowed relative deviation of one slice gap from the median gap.
SLICE_GAP_TOLERANCE = 0.05


def _slice_geometry(ds: Any, label: str) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, ValueError, TypeError) as err:
        raise DataError(f"{label}: slice lacks ImageOrientationPatient/ImagePositionPatient ({err})") from err
    if iop.shape != (6,) or ipp.shape != (3,):
        raise DataError(f"{label}: malformed ImageOrientationPatient {iop.tolist()} or position {ipp.tolist()}")
    return iop, ipp


def group_series(
    sources: Sequence[tuple[str, bytes]], *, pixel_budget: int = DEFAULT_PIXEL_BUDGET
) -> dict[str, list[tuple[str, Any]]]:
    """Parse DICOM files and group them by SeriesInstanceUID (files without one are refused)."""
    groups: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for label, data in sources:
        ds = parse_dicom(data, label, pixel_budget=pixel_budget)
        uid = str(ds.get("SeriesInstanceUID", "")).strip()
        if not uid:
            raise DataError(f"{label}: no SeriesInstanceUID; cannot place it in a series")
        groups[uid].append((label, ds))
    return dict(groups)


def volume_from_series(
    slices: Sequence[tuple[str, Any]],
    *,
    tolerance: float = SLICE_GAP_TOLERANCE,
    pixel_budget: int = DEFAULT_PIXEL_BUDGET,
) -> Volume:
    """Stack one series' slices in order along the slice normal, checking geometry is consistent.

    Each slice's pixels are checked before decoding (:func:`~medret.io.dicom.check_pixels`),
    and the whole volume against ``pixel_budget`` voxels.
    """
    from pydicom.pixels import apply_modality_lut

    if not slices:
        raise DataError("empty DICOM series")
    voxels = 0
    for label, ds in slices:
        check_pixels(ds, label, pixel_budget)
        voxels += int(ds.Rows) * int(ds.Columns)
    check_budget(slices[0][0], voxels, pixel_budget, f"a series of {len(slices)} slices")
    first_label, first = slices[0]
    iop0, _ = _slice_geometry(first, first_label)
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    placed = []
    for label, ds in slices:
        iop, ipp = _slice_geometry(ds, label)
        if not np.allclose(iop, iop0, atol=1e-3):
            raise DataError(f"{label}: orientation {iop.tolist()} differs from the series' {iop0.tolist()}")
        placed.append((float(ipp @ normal), ipp, label, ds))
    placed.sort(key=lambda p: p[0])
    pos = np.array([p[0] for p in placed])
    gaps = np.diff(pos)
    if len(placed) > 1:
        if (gaps < 1e-4).any():
            dup = placed[int(np.argmin(gaps)) + 1][2]
            raise DataError(f"{dup}: duplicate slice position {pos[int(np.argmin(gaps))]:.3f} mm in the series")
        median = float(np.median(gaps))
        worst = int(np.argmax(np.abs(gaps - median)))
        if abs(gaps[worst] - median) > tolerance * median:
            raise DataError(
                f"{placed[worst + 1][2]}: slice gap {gaps[worst]:.3f} mm differs from the series' "
                f"{median:.3f} mm by more than {tolerance:.0%} (missing or extra slice?)"
            )
        dz = median
    else:
        dz = float(first.get("SliceThickness") or 1.0)
    planes = []
    for _, _, label, ds in placed:
        try:
            planes.append(np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32))
        except Exception as err:
            raise CorruptFileError(label, f"pixel data cannot be decoded ({type(err).__name__}: {err})") from err
    if len({p.shape for p in planes}) != 1:
        raise DataError(f"{first_label}: slices of one series have different sizes")
    dy, dx = (float(v) for v in first.PixelSpacing)
    direction = np.stack([row, col, normal], axis=1)
    return Volume(
        array=np.stack(planes),
        spacing=(dx, dy, dz),
        origin=tuple(float(v) for v in placed[0][1]),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in direction.ravel()),
        meta={"format": "dicom-series", "slices": len(planes), **safe_metadata(first)},
    )


def read_dicom_series(
    sources: Sequence[tuple[str, bytes]], *, pixel_budget: int = DEFAULT_PIXEL_BUDGET
) -> list[Volume]:
    """One volume per SeriesInstanceUID among the given ``(name, bytes)`` files."""
    groups = group_series(sources, pixel_budget=pixel_budget)
    return [volume_from_series(group, pixel_budget=pixel_budget) for group in groups.values()]


def dicom_series(
    volume: Volume, *, modality: str = "MR", attrs: dict[str, Any] | None = None, seed: int | None = None
) -> list[tuple[str, bytes]]:
    """A volume as a DICOM series, one ``(file name, bytes)`` per slice: how scanners store MRI and CT.

    For tests and the demo (a NIfTI volume becomes the slice files an archive would hold). Integer
    data that fits 16 bits is stored as is; anything else through RescaleSlope/Intercept. ``attrs``
    adds attributes to every slice; ``seed`` shuffles the file names against the slice order, as
    archives do. No patient attributes are written unless ``attrs`` has them.
    """
    import io
    import random

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    a = volume.array
    lo, hi = float(a.min()), float(a.max())
    integral = np.issubdtype(a.dtype, np.integer) or bool(np.all(np.mod(a, 1) == 0))
    if integral and lo >= 0 and hi <= 65535:
        stored, signed, slope, intercept = a.astype(np.uint16), 0, 1.0, 0.0
    elif integral and lo >= -32768 and hi <= 32767:
        stored, signed, slope, intercept = a.astype(np.int16), 1, 1.0, 0.0
    else:
        slope = (hi - lo) / 65535 or 1.0
        stored, signed, intercept = np.round((a - lo) / slope).astype(np.uint16), 0, lo
    series, study = generate_uid(), generate_uid()
    d = np.array(volume.direction).reshape(3, 3)
    order = list(range(a.shape[0]))
    if seed is not None:
        random.Random(seed).shuffle(order)
    out = []
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = f"{n:04d}.dcm"
        ds = FileDataset(name, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, modality
        ds.ImageOrientationPatient = [float(x) for x in (*d[:, 0], *d[:, 1])]
        ds.ImagePositionPatient = [float(x) for x in np.array(volume.origin) + d[:, 2] * volume.spacing[2] * k]
        ds.PixelSpacing = [volume.spacing[1], volume.spacing[0]]
        ds.SliceThickness = volume.spacing[2]
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, signed
        if (slope, intercept) != (1.0, 0.0):
            ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.8g}", f"{intercept:.8g}"
        for key, value in (attrs or {}).items():
            setattr(ds, key, value)
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((name, buf.getvalue()))
    return out
