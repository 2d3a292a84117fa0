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
from typing import NamedTuple

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


class Codestream(NamedTuple):
    """What a compressed frame's own header declares: the decoder allocates this, not the DICOM header."""

    width: int
    height: int
    components: int


def codestream_size(frame: bytes, label: str = "frame") -> Codestream | None:
    """The size a JPEG, JPEG-LS or JPEG 2000 (J2K or JP2) codestream declares, None if it is none of these.

    The whole frame header is walked, however many segments come before the frame header;
    a codestream that starts like one of these and declares no usable size is refused,
    since its decoder would learn the size only while allocating.

    >>> sof = bytes.fromhex("ffd8ffc0000b08") + struct.pack(">HH", 300, 400) + bytes.fromhex("01011100")
    >>> codestream_size(sof)
    Codestream(width=400, height=300, components=1)
    >>> codestream_size(bytes.fromhex("ffd8ffd9"), "a.dcm")
    Traceback (most recent call last):
    ...
    medret.errors.CorruptFileError: a.dcm: JPEG codestream has no frame header (SOF) before its scan data
    """
    if frame[:4] == b"\xff\x4f\xff\x51":  # J2K: SOC then SIZ
        return _siz(frame, 2, label)
    if frame[4:12] == b"jP  \r\n\x87\n":
        return _siz(frame, _jp2_codestream(frame, label) + 2, label)
    if frame[:2] == b"\xff\xd8":
        return _sof(frame, label)
    return None


#: stray bytes tolerated between JPEG header segments (libjpeg skips them with a warning)
MAX_STRAY = 1024


def _sof(frame: bytes, label: str) -> Codestream:
    i, n = 2, len(frame)
    while i + 2 <= n:
        if frame[i] != 0xFF:
            skip = frame.find(b"\xff", i, i + MAX_STRAY + 1)
            if skip < 0:
                raise CorruptFileError(label, f"JPEG codestream has more than {MAX_STRAY} stray bytes at offset {i}")
            i = skip
            continue
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image, and no frame header yet
            break
        if i + 4 > n:
            break
        (length,) = struct.unpack(">H", frame[i + 2 : i + 4])
        if marker in _SOF:
            if i + 10 > n or length < 8:
                raise TruncatedFileError(label, "JPEG frame header (SOF) is cut short")
            height, width = struct.unpack(">HH", frame[i + 5 : i + 9])
            if width == 0 or height == 0:  # height 0 defers it to a DNL marker after the scan
                raise CorruptFileError(label, f"JPEG frame header declares {width}x{height} pixels")
            return Codestream(width, height, frame[i + 9])
        if length < 2:
            raise CorruptFileError(label, f"JPEG segment at offset {i} has length {length}")
        i += 2 + length
    raise CorruptFileError(label, "JPEG codestream has no frame header (SOF) before its scan data")


def _jp2_codestream(frame: bytes, label: str) -> int:
    """Offset of the codestream in a JP2 file's top-level contiguous-codestream (jp2c) box."""
    i, n = 0, len(frame)
    while i + 8 <= n:
        length, kind = struct.unpack(">I4s", frame[i : i + 8])
        head = 8
        if length == 1:  # 64-bit length follows
            if i + 16 > n:
                break
            (length,) = struct.unpack(">Q", frame[i + 8 : i + 16])
            head = 16
        elif length == 0:  # runs to the end
            length = n - i
        if kind == b"jp2c":
            return i + head
        if length < head:
            raise CorruptFileError(label, f"JP2 box {kind!r} at offset {i} has length {length}")
        i += length
    raise CorruptFileError(label, "JP2 file has no codestream (jp2c) box")


def _siz(frame: bytes, at: int, label: str) -> Codestream:
    if frame[at - 2 : at + 2] != b"\xff\x4f\xff\x51":
        raise CorruptFileError(label, "JPEG 2000 codestream does not start with SOC and SIZ markers")
    if at + 40 > len(frame):
        raise TruncatedFileError(label, "JPEG 2000 size marker (SIZ) is cut short")
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", frame[at + 6 : at + 22])
    (components,) = struct.unpack(">H", frame[at + 38 : at + 40])
    width, height = xsiz - xo, ysiz - yo
    if width <= 0 or height <= 0:
        raise CorruptFileError(label, f"JPEG 2000 size marker (SIZ) declares {width}x{height} pixels")
    return Codestream(width, height, components)


def check_codestreams(
    frames: Iterator[bytes], label: str, *, rows: int, cols: int, budget: int, samples: int = 1
) -> None:
    """Refuse encapsulated frames whose codestream declares more than the DICOM header (or the budget)."""
    for n, frame in enumerate(frames):
        size = codestream_size(frame, label)
        if size is None:
            continue
        width, height = size.width, size.height
        if size.components > max(samples, 1):
            raise PixelBudgetError(
                label,
                f"frame {n}'s codestream declares {size.components} components, more than the header's "
                f"{samples} samples per pixel; refusing to decode",
            )
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
