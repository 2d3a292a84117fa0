"""Which reader a file needs, decided from its first bytes first and its name second.

Content wins over the extension: a PNG saved as ``.dcm`` is read as a PNG.

>>> detect_kind("x.png", b"\\x89PNG\\r\\n\\x1a\\n" + bytes(200))
'raster'
>>> detect_kind("scan.nii.gz", b"\\x1f\\x8b" + bytes(200))
'nifti'
>>> detect_kind("slide.svs", b"II*\\x00" + bytes(200))
'wsi'
>>> detect_kind("notes.txt", b"hello")
Traceback (most recent call last):
...
medret.errors.UnsupportedFormatError: notes.txt: no reader for this file (extension '.txt', first bytes 68656c6c6f)
"""

from __future__ import annotations

from pathlib import PurePosixPath

from medret.errors import CorruptFileError, EmptyFileError, UnsupportedFormatError

#: How many leading bytes :func:`detect_kind` wants (DICOM's magic sits at offset 128).
HEAD_BYTES = 352

WSI_SUFFIXES = {".svs", ".ndpi", ".qptiff", ".scn", ".bif", ".mrxs", ".vms", ".vmu", ".svslide"}
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
RASTER_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF8")
KNOWN_SUFFIXES = WSI_SUFFIXES | {
    ".dcm",
    ".dicom",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".bmp",
    ".nii",
    ".nii.gz",
    ".npz",
}
_ACR_NEMA_GROUPS = {0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028}


def suffixes(name: str) -> str:
    return "".join(PurePosixPath(name.lower()).suffixes[-2:])


def _looks_like_bare_dicom(head: bytes) -> bool:
    """ACR-NEMA / no-preamble DICOM: starts with a little- or big-endian group number we know."""
    if len(head) < 8:
        return False
    little = int.from_bytes(head[:2], "little")
    big = int.from_bytes(head[:2], "big")
    return little in _ACR_NEMA_GROUPS or big in _ACR_NEMA_GROUPS


def detect_kind(name: str, head: bytes) -> str:
    """One of ``dicom``, ``raster``, ``wsi``, ``tiff``, ``nifti``, ``medmnist``; raises for anything else.

    ``tiff`` is a plain TIFF that may be a slide or a flat image: :func:`resolve_tiff` decides.
    """
    if not head:
        raise EmptyFileError(name, "file is empty (0 bytes)")
    suffix = suffixes(name)
    last = PurePosixPath(name.lower()).suffix
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(TIFF_MAGIC):
        return "wsi" if last in WSI_SUFFIXES else "tiff"
    if head.startswith(RASTER_MAGIC):
        return "raster"
    if head.startswith(b"\x1f\x8b") and suffix.endswith((".nii.gz", ".nii")):
        return "nifti"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[:4] in (b"n+2\x00",):
        return "nifti"
    if head.startswith(b"PK\x03\x04") and last == ".npz":
        return "medmnist"
    if last in {".dcm", ".dicom", ""} and _looks_like_bare_dicom(head):
        return "dicom"
    if last in KNOWN_SUFFIXES or suffix in KNOWN_SUFFIXES:
        raise CorruptFileError(
            name, f"named like a {suffix or last} file, but its content is not one (first bytes {head[:8].hex()})"
        )
    raise UnsupportedFormatError(name, f"no reader for this file (extension {last!r}, first bytes {head[:8].hex()})")


#: A TIFF this large on a side (or tiled, or pyramidal) is treated as a slide.
FLAT_TIFF_MAX_SIDE = 8192


def resolve_tiff(path: str) -> str:
    """``wsi`` for tiled, pyramidal or very large TIFFs, ``raster`` for ordinary flat ones."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            pyramidal = len(tif.series[0].levels) > 1 if tif.series else False
            big = max(page.shape[:2]) > FLAT_TIFF_MAX_SIDE
            return "wsi" if page.is_tiled or pyramidal or big else "raster"
    except Exception:
        return "raster"  # let the raster reader report what is wrong with it
