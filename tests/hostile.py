"""A hostile corpus, made in the tests: files that declare little and cost a lot to decode.

Each builder returns ``(filename, bytes)``; without medret's guards each would cost the
decoder hundreds of megabytes to gigabytes (the numbers in the docstrings).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ZEROS = bytes(16 << 20)


def nifti_gzip_bomb(inflated_mb: int = 384) -> tuple[str, bytes]:
    """A .nii.gz whose header says 8x8x8 float32 and whose gzip stream inflates to ``inflated_mb`` MB."""
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4))
    raw = img.to_bytes()
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    body = c.compress(raw) + b"".join(c.compress(ZEROS) for _ in range(inflated_mb // 16)) + c.flush()
    return "bomb.nii.gz", body


def _explicit_le(ds: object) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)  # type: ignore[arg-type]
    return bytes(buf.getvalue())


def _file(meta_ts: str, body: bytes, sop: str = "1.2.840.10008.5.1.4.1.1.1") -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    meta.TransferSyntaxUID = meta_ts
    meta.ImplementationClassUID = "1.2.3.4"
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return bytes(out.getvalue()) + body


def _image(rows: int, cols: int, **extra: object) -> object:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def deflated_dicom_bomb(inflated_mb: int = 384) -> tuple[str, bytes]:
    """A deflated-transfer-syntax DICOM of an 8x8 image followed by ``inflated_mb`` MB of zeros."""
    ds = _image(8, 8, PixelData=bytes(64))
    c = zlib.compressobj(1, zlib.DEFLATED, -15)
    body = c.compress(_explicit_le(ds))
    # a private OB element holding the zeros (tag 0x0009,0x1010), then the rest
    size = (inflated_mb // 16) * len(ZEROS)
    body += c.compress(struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, size))
    body += b"".join(c.compress(ZEROS) for _ in range(inflated_mb // 16)) + c.flush()
    return "deflated-bomb.dcm", _file("1.2.840.10008.1.2.1.99", body)


def jpeg_dicom_bomb(side: int = 20000) -> tuple[str, bytes]:
    """A JPEG-baseline DICOM whose header says 64x64 and whose codestream's SOF says ``side`` x ``side``."""
    from pydicom.encaps import encapsulate

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(buf, format="JPEG")
    jpeg = bytearray(buf.getvalue())
    at = jpeg.find(b"\xff\xc0")
    jpeg[at + 5 : at + 9] = struct.pack(">HH", side, side)
    ds = _image(64, 64, PixelData=encapsulate([bytes(jpeg)]))
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return "jpeg-bomb.dcm", _file("1.2.840.10008.1.2.4.50", _explicit_le(ds))


def j2k_siz_edited(real: Path, side: int = 20000) -> tuple[str, bytes]:
    """A real JPEG 2000 DICOM with only its codestream's SIZ marker edited to ``side`` x ``side``."""
    data = bytearray(real.read_bytes())
    at = data.find(b"\xff\x4f\xff\x51")
    assert at > 0, "no J2K codestream"
    data[at + 8 : at + 16] = struct.pack(">II", side, side)
    return "j2k-siz.dcm", bytes(data)


def many_page_tiff(pages: int = 2000) -> tuple[str, bytes]:
    """A TIFF of ``pages`` 1x1 pages (counting them all walked every IFD)."""
    frames = [Image.fromarray(np.zeros((1, 1), np.uint8)) for _ in range(pages)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    return "pages.tif", buf.getvalue()


def small_png() -> tuple[str, bytes]:
    """A 64x64 PNG: with ``kind=tile`` and ``mpp=100`` it would be upscaled to 12800x12800."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "tile.png", buf.getvalue()
