"""Budgets a decoder cannot exceed: bounded inflation, codestream sizes checked before decoding,
Pillow's own bomb guard set per call.

A hostile or broken file can declare a small image and still make a decoder allocate
gigabytes: a gzip or deflate stream that inflates far past what its header declares, a
JPEG or JPEG 2000 codestream inside a DICOM whose SOF/SIZ marker is larger than the
DICOM header's Rows x Columns. Every reader checks these here, before it allocates, and
refuses with :class:`~medret.errors.PixelBudgetError` (HTTP 413 in the service, a
quarantine reason in the indexing job).

>>> import gzip
>>> inflate(gzip.compress(b"x" * 1000), "a.gz", limit=2000)[:3]
b'xxx'
>>> inflate(gzip.compress(b"x" * 5000), "a.gz", limit=2000)
Traceback (most recent call last):
...
medret.errors.PixelBudgetError: a.gz: inflates to more than 2,000 bytes, more than it may hold; refusing to decode it
"""

from __future__ import annotations

import contextlib
import struct
import threading
import zlib
from collections.abc import Iterator

from medret.errors import CorruptFileError, PixelBudgetError, TruncatedFileError

_CHUNK = 1 << 20


def inflate(data: bytes, label: str, *, limit: int, wbits: int = 47, what: str = "") -> bytes:
    """Inflate a zlib / gzip (``wbits`` 47: either, with multi-member gzip) or raw deflate (``wbits`` -15)
    stream, refusing once the output would pass ``limit`` bytes; never allocates more than that."""
    out = bytearray()
    rest = data
    while rest:
        d = zlib.decompressobj(wbits)
        buf = rest
        try:
            while buf and not d.eof:
                out += d.decompress(buf, min(_CHUNK, limit + 1 - len(out)))
                if len(out) > limit:
                    raise PixelBudgetError(
                        label,
                        f"inflates to more than {limit:,} bytes{what}, more than it may hold; refusing to decode it",
                    )
                buf = d.unconsumed_tail
            out += d.flush()
        except zlib.error as err:
            raise CorruptFileError(label, f"compressed stream is damaged ({err})") from err
        if not d.eof:
            raise TruncatedFileError(label, "compressed stream ends early")
        rest = d.unused_data if wbits > 31 and d.unused_data[:2] == b"\x1f\x8b" else b""  # next gzip member
    if len(out) > limit:
        raise PixelBudgetError(label, f"inflates to more than {limit:,} bytes{what}; refusing to decode it")
    return bytes(out)


# -- Pillow -----------------------------------------------------------------------------------------
_PILLOW = threading.Lock()


@contextlib.contextmanager
def pillow_budget(pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit at ``pixels`` for the ``Image.open`` calls inside, then back.

    Pillow refuses images over twice ``MAX_IMAGE_PIXELS`` (the caller checks its exact budget
    right after the header parse); the limit is a module global, so it is set under a lock for
    the header parse only and restored, never disabled.
    """
    from PIL import Image

    with _PILLOW:
        before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max(1, pixels)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


# -- codestreams inside DICOM -----------------------------------------------------------------------
#: JPEG start-of-frame markers (baseline, extended, progressive, lossless; JPEG-LS SOF55 0xF7)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
#: markers with no length field
_STANDALONE = {0x01, *range(0xD0, 0xD9)}


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """``(width, height)`` that a JPEG, JPEG-LS or JPEG 2000 codestream declares, or None if not one.

    >>> sof = bytes.fromhex("ffd8ffc0000b08") + struct.pack(">HH", 300, 400) + bytes.fromhex("01011100")
    >>> codestream_size(sof)
    (400, 300)
    """
    head = frame[: 1 << 16]
    if head[:4] == b"\xff\x4f\xff\x51":  # J2K: SOC then SIZ
        return _siz(head, 2)
    at = head.find(b"\xff\x4f\xff\x51")  # a JP2 file wraps the codestream in boxes
    if head[4:8] == b"jP  " and at >= 0:
        return _siz(head, at + 2)
    if head[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack(">H", head[i + 2 : i + 4])
        if marker in _SOF and i + 9 <= len(head):
            height, width = struct.unpack(">HH", head[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return None


def _siz(head: bytes, at: int) -> tuple[int, int] | None:
    if at + 2 + 20 > len(head):
        return None
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", head[at + 6 : at + 22])
    return max(0, xsiz - xo), max(0, ysiz - yo)


def check_codestreams(
    frames: Iterator[bytes], label: str, *, rows: int, cols: int, budget: int, samples: int = 1
) -> None:
    """Refuse encapsulated frames whose codestream declares more than the DICOM header (or the budget)."""
    for n, frame in enumerate(frames):
        size = codestream_size(frame)
        if size is None:
            continue
        width, height = size
        if width * height * samples > budget:
            raise PixelBudgetError(
                label,
                f"frame {n}'s codestream declares {width}x{height} pixels, above the pixel budget of {budget:,}; "
                "refusing to decode",
            )
        if width > cols or height > rows:
            raise PixelBudgetError(
                label,
                f"frame {n}'s codestream declares {width}x{height} pixels, larger than the header's "
                f"{cols}x{rows}; refusing to decode",
            )
