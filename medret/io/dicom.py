"""2-D DICOM (X-ray, CT/MR slices, US, secondary capture): bytes -> stored pixels + safe metadata.

Decoders (all permissively licensed): GDCM (BSD; JPEG baseline/extended/lossless,
JPEG-LS, JPEG 2000), pylibjpeg-openjpeg (MIT/BSD-2; JPEG 2000, HTJ2K),
pylibjpeg-rle (MIT), pyjpegls (MIT/CharLS BSD-3), Pillow (MIT-CMU). The GPL'd
pylibjpeg-libjpeg is deliberately not used.

The reader applies only the *modality* transform (rescale slope/intercept or the
Modality LUT), which turns stored values into physical units. Windowing and
MONOCHROME1 inversion belong to preprocessing; the reader hands their parameters
over in :class:`~medret.io.base.Display`.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import warnings
from dataclasses import replace
from typing import Any

import numpy as np

from medret.errors import CorruptFileError, MedretError, NotAnImageError, TruncatedFileError
from medret.io.base import (
    DEFAULT_PIXEL_BUDGET,
    Decoded,
    Display,
    Source,
    check_budget,
    read_source,
    source_name,
)
from medret.io.guard import check_codestreams, inflate

log = logging.getLogger(__name__)

#: VL Whole Slide Microscopy Image Storage: tiled slides, read by :mod:`medret.io.wsi`.
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def pseudonymise(value: str, salt: str) -> str:
    """A salted, keyed digest of an identifier: stable per salt, not reversible.

    >>> pseudonymise("PAT-001", "s3cret") == pseudonymise("PAT-001", "s3cret")
    True
    >>> pseudonymise("PAT-001", "s3cret") != pseudonymise("PAT-001", "other")
    True
    """
    return hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()[:24]


#: Deflated Explicit VR Little Endian: the whole dataset is one deflate stream
DEFLATED = "1.2.840.10008.1.2.1.99"


def _inflate_deflated(data: bytes, label: str, pixel_budget: int) -> bytes:
    """A deflated-transfer-syntax file rewritten as plain Explicit VR Little Endian, inflated under a
    bound (pydicom would inflate it whole before anything could be checked)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    fp = io.BytesIO(data)
    try:
        preamble = read_preamble(fp, force=True)
        meta = _read_file_meta_info(fp)
    except Exception as err:
        raise CorruptFileError(label, f"unreadable DICOM file meta ({type(err).__name__}: {err})") from err
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
        return data
    limit = pixel_budget * 2 + (16 << 20)  # 16-bit pixels at the budget plus the non-pixel elements
    body = inflate(data[fp.tell() :], label, limit=limit, wbits=-15, what=" (the pixel budget's worth)")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.write((preamble or b"\0" * 128) + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return bytes(out.getvalue()) + body


def parse_dicom(
    data: bytes, label: str, *, stop_before_pixels: bool = False, pixel_budget: int = DEFAULT_PIXEL_BUDGET
) -> Any:
    """Parse a DICOM dataset, including ACR-NEMA files with no preamble or transfer syntax.

    A deflated dataset is inflated within ``pixel_budget``'s worth of bytes (a bomb is refused).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if DEFLATED.encode() in data[:4096]:
        data = _inflate_deflated(data, label, pixel_budget)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels)
            ds.keys()  # force a parse of the top level so damage shows up here
    except (InvalidDicomError, EOFError) as err:
        raise TruncatedFileError(label, f"DICOM data ends early ({err})") from err
    except Exception as err:  # pydicom raises many types on garbage; this is the boundary
        raise CorruptFileError(label, f"not a readable DICOM file ({type(err).__name__}: {err})") from err
    if len(ds) == 0 or not any(tag.group in (0x0008, 0x0020, 0x0028) for tag in ds.keys()):  # noqa: SIM118
        raise CorruptFileError(label, "not a DICOM file (no DICOM header or known elements)")
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        # ACR-NEMA era: no file meta. Use the encoding pydicom detected when forcing the read.
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def _floats(value: Any) -> tuple[float, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return (float(value),)
    return tuple(float(v) for v in value)


def _spacing(ds: Any) -> tuple[float, float] | None:
    for key in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        v = _floats(ds.get(key))
        if len(v) == 2 and v[0] > 0 and v[1] > 0:
            return (v[0], v[1])
    return None


def _display(ds: Any, bits_stored: int) -> Display:
    lut = None
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        n, first, bits = (int(x) for x in item.LUTDescriptor)
        table = np.asarray(item.LUTData, dtype=np.float32).ravel()[: n or 65536]
        lut = (first, bits, table)
    return Display(
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip(),
        bits_stored=bits_stored,
        window_center=_floats(ds.get("WindowCenter")),
        window_width=_floats(ds.get("WindowWidth")),
        voi_function=str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper(),
        voi_lut=lut,
    )


#: Non-identifying attributes copied into the row. Nothing else leaves the reader.
SAFE_ATTRIBUTES = {
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "instance_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID",
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "view_position": "ViewPosition",
    "laterality": "ImageLaterality",
    "photometric": "PhotometricInterpretation",
}


def safe_metadata(ds: Any, *, salt: str | None = None) -> dict[str, Any]:
    """Whitelisted, non-identifying metadata; patient and study IDs only as salted pseudonyms."""
    meta: dict[str, Any] = {}
    for key, keyword in SAFE_ATTRIBUTES.items():
        v = ds.get(keyword)
        if v not in (None, ""):
            meta[key] = str(v).strip()
    for key, keyword in (("rows", "Rows"), ("columns", "Columns"), ("bits_stored", "BitsStored")):
        if keyword in ds:
            meta[key] = _int(ds, keyword, 0, "dataset")
    meta["frames"] = max(_int(ds, "NumberOfFrames", 1, "dataset"), 1)
    meta["samples_per_pixel"] = _int(ds, "SamplesPerPixel", 1, "dataset")
    meta["transfer_syntax"] = str(ds.file_meta.TransferSyntaxUID)
    spacing = _spacing(ds)
    if spacing:
        meta["pixel_spacing_mm"] = list(spacing)
    if salt is not None:
        for key, keyword in (("patient_pseudo_id", "PatientID"), ("accession_pseudo", "AccessionNumber")):
            v = ds.get(keyword)
            if v not in (None, ""):
                meta[key] = pseudonymise(str(v), salt)
    return meta


def _int(ds: Any, keyword: str, default: int, label: str) -> int:
    value = ds.get(keyword)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as err:
        raise CorruptFileError(label, f"{keyword} is not an integer: {value!r}") from err


#: JPEG processes that pydicom's permissive plugins cannot decode (12-bit extended), decoded by
#: imagecodecs (BSD; libjpeg-turbo 3) instead of the GPL'd libjpeg.
_IMAGECODECS_FALLBACK = {"1.2.840.10008.1.2.4.51": "jpeg8_decode", "1.2.840.10008.1.2.4.57": "ljpeg_decode"}


def _decode_fallback(ds: Any, frames: int) -> np.ndarray:
    import imagecodecs
    from pydicom.encaps import generate_frames

    decode = getattr(imagecodecs, _IMAGECODECS_FALLBACK[str(ds.file_meta.TransferSyntaxUID)])
    out = [decode(f) for f in generate_frames(ds.PixelData, number_of_frames=frames)]
    arr = np.stack(out) if frames > 1 else out[0]
    if int(ds.get("PixelRepresentation") or 0):
        arr = arr.astype(np.int16 if arr.itemsize == 2 else np.int8)
    return arr


def _decode(ds: Any, label: str, frames: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(ds.pixel_array)
    except Exception as err:  # decoder plugins raise assorted types on damaged streams
        if str(ds.file_meta.TransferSyntaxUID) in _IMAGECODECS_FALLBACK:
            try:
                return _decode_fallback(ds, frames)
            except Exception as err2:
                raise CorruptFileError(label, f"pixel data cannot be decoded ({type(err2).__name__}: {err2})") from err
        raise CorruptFileError(label, f"pixel data cannot be decoded ({type(err).__name__}: {err})") from err


def _require_image(ds: Any, label: str) -> None:
    if "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        return
    sop = ds.get("SOPClassUID")
    what = f"{sop.name} ({sop})" if sop is not None else "a DICOM object with no SOP class"
    raise NotAnImageError(label, f"{what} holds no pixel data")


def _check_native_length(ds: Any, label: str, expected: int) -> None:
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        expected = expected * 2 // 3  # chroma subsampled 2:1 horizontally
    have = len(ds.PixelData)
    if have < expected:
        raise TruncatedFileError(label, f"pixel data has {have:,} bytes, the header declares {expected:,}")


def check_pixels(ds: Any, label: str, pixel_budget: int) -> int:
    """Everything about the pixels that can be checked before decoding them; returns the frame count.

    The header's Rows x Columns x frames against the budget, native pixel data against the
    length it needs, and each compressed frame's codestream (JPEG SOF, JPEG 2000 SIZ)
    against the header: decoders allocate what the codestream says, not what the header says.
    """
    _require_image(ds, label)
    rows, cols = _int(ds, "Rows", 0, label), _int(ds, "Columns", 0, label)
    frames = max(_int(ds, "NumberOfFrames", 1, label), 1)
    spp = _int(ds, "SamplesPerPixel", 1, label)
    if rows <= 0 or cols <= 0:
        raise CorruptFileError(label, f"declares an image of {rows}x{cols} pixels")
    check_budget(label, rows * cols * frames * spp, pixel_budget, f"{rows}x{cols}x{frames} frames x{spp}")
    if "PixelData" not in ds:
        return frames
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        _check_native_length(ds, label, rows * cols * frames * spp * _int(ds, "BitsAllocated", 8, label) // 8)
        return frames
    from pydicom.encaps import generate_frames

    try:
        encapsulated = generate_frames(ds.PixelData, number_of_frames=frames)
        check_codestreams(encapsulated, label, rows=rows, cols=cols, budget=pixel_budget, samples=spp)
    except MedretError:
        raise
    except Exception as err:
        raise CorruptFileError(label, f"encapsulated pixel data is malformed ({type(err).__name__}: {err})") from err
    return frames


def read_dicom(
    src: Source, *, name: str | None = None, pixel_budget: int = DEFAULT_PIXEL_BUDGET, salt: str | None = None
) -> Decoded:
    """Decode a 2-D (or multi-frame) DICOM image.

    Pixels come back in modality units (float32 for monochrome, uint8/uint16 for
    colour, which pydicom converts from YBR to RGB).
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    label = source_name(src, name)
    ds = parse_dicom(read_source(src, name), label, pixel_budget=pixel_budget)
    frames = check_pixels(ds, label, pixel_budget)
    bits_alloc = _int(ds, "BitsAllocated", 8, label)
    arr = _decode(ds, label, frames)
    if arr.size == 0:
        raise CorruptFileError(label, "decoded to an empty array")
    display = _display(ds, _int(ds, "BitsStored", bits_alloc, label))
    if display.photometric == "PALETTE COLOR":
        arr = np.asarray(apply_color_lut(arr, ds))
    if arr.shape[-1] == 3 and arr.ndim == (4 if frames > 1 else 3):
        display = replace(display, photometric="RGB")  # pydicom returns YBR and palette images as RGB
    else:
        arr = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    return Decoded(
        pixels=arr,
        kind="dicom",
        reader="pydicom",
        spacing=_spacing(ds),
        frames=frames,
        display=display,
        meta=safe_metadata(ds, salt=salt),
    )
