"""Plain 2-D images (PNG, JPEG, flat TIFF, BMP) through Pillow, with the same result as DICOM."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from medret.errors import CorruptFileError, PixelBudgetError, TruncatedFileError
from medret.io.base import (
    DEFAULT_PIXEL_BUDGET,
    Decoded,
    Display,
    Source,
    check_budget,
    read_source,
    source_name,
)
from medret.io.guard import pillow_budget

#: Pillow modes -> what we convert them to before handing pixels over.
_CONVERT = {"P": "RGB", "PA": "RGB", "RGBA": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "LA": "L", "1": "L", "I;16B": "I"}


#: most pages (TIFF) or frames (GIF, APNG) an image may have; counting them walks the file
MAX_FRAMES = 256


def _count_frames(im: Any, label: str) -> int:
    """Frames up to :data:`MAX_FRAMES`, walked one by one (``n_frames`` would walk all 20,000 of a bomb)."""
    if not getattr(im, "is_animated", False) and im.format != "TIFF":
        return 1
    n = 1
    try:
        while n <= MAX_FRAMES:
            im.seek(n)
            n += 1
    except EOFError:
        pass
    except Exception as err:
        raise CorruptFileError(label, f"page {n} cannot be read ({type(err).__name__}: {err})") from err
    finally:
        im.seek(0)
    if n > MAX_FRAMES:
        raise PixelBudgetError(label, f"has more than {MAX_FRAMES} pages or frames; refusing to read it")
    return n


def read_raster(src: Source, *, name: str | None = None, pixel_budget: int = DEFAULT_PIXEL_BUDGET) -> Decoded:
    """Decode a PNG/JPEG/TIFF/BMP image; 16-bit greys stay 16-bit, palettes and alpha become RGB."""
    from PIL import Image, UnidentifiedImageError

    label = source_name(src, name)
    data = read_source(src, name)
    try:
        with warnings.catch_warnings(), pillow_budget(pixel_budget):
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise PixelBudgetError(
            label, f"declares an image far above the pixel budget of {pixel_budget:,} ({err})"
        ) from err
    except UnidentifiedImageError as err:
        raise CorruptFileError(label, f"not a readable image (magic bytes {data[:8].hex()})") from err
    except Exception as err:
        raise CorruptFileError(label, f"cannot parse the image header ({type(err).__name__}: {err})") from err
    w, h = im.size
    bands = len(im.getbands())
    check_budget(label, w * h * bands, pixel_budget, f"{w}x{h}x{bands}")
    fmt = im.format or "image"
    frames = _count_frames(im, label)
    try:
        im.load()
    except OSError as err:
        if "truncated" in str(err) or "broken data stream" in str(err) or "end of file" in str(err).lower():
            raise TruncatedFileError(label, f"{fmt} data ends early ({err})") from err
        raise CorruptFileError(label, f"{fmt} data cannot be decoded ({err})") from err
    except Exception as err:
        raise CorruptFileError(label, f"{fmt} data cannot be decoded ({type(err).__name__}: {err})") from err
    mode = _CONVERT.get(im.mode, im.mode)
    arr = np.asarray(im.convert(mode) if mode != im.mode else im)
    if arr.size == 0 or arr.ndim not in (2, 3):
        raise CorruptFileError(label, f"decoded to an unusable array of shape {arr.shape}")
    bits = 8 if arr.dtype == np.uint8 else 16 if arr.dtype in (np.uint16, np.int32) and arr.max() < 65536 else 32
    photometric = "RGB" if arr.ndim == 3 else "MONOCHROME2"
    meta = {"format": fmt, "mode": im.mode, "rows": h, "columns": w, "pages": frames}
    return Decoded(
        pixels=arr,
        kind="raster",
        reader="pillow",
        display=Display(photometric=photometric, bits_stored=bits),
        meta=meta,
    )
