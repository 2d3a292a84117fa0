"""2-D radiograph preprocessing: VOI windowing, MONOCHROME1 inversion, grey conversion, aspect-safe resize.

All functions are pure: arrays (and spacing in mm) in, arrays (and spacing) out.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from medret.errors import ConfigError
from medret.io.base import Display


def apply_voi(
    pixels: npt.NDArray[np.floating], display: Display, *, percentiles: tuple[float, float] = (0.5, 99.5)
) -> npt.NDArray[np.float32]:
    """Map modality values to [0, 1] by the VOI LUT, else the first window, else percentile windowing.

    >>> import numpy as np
    >>> d = Display(window_center=(50.0,), window_width=(100.0,))
    >>> [float(v) for v in apply_voi(np.array([-10.0, 49.5, 200.0]), d)]
    [0.0, 0.5, 1.0]
    """
    x = np.asarray(pixels, dtype=np.float32)
    if display.voi_lut is not None:
        first, bits, table = display.voi_lut
        idx = np.clip(np.rint(x) - first, 0, len(table) - 1).astype(np.int64)
        return (table[idx] / float((1 << bits) - 1)).astype(np.float32)
    if display.window_center and display.window_width and display.window_width[0] > 0:
        c, w = display.window_center[0], display.window_width[0]
        if display.voi_function == "SIGMOID":
            return (1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))).astype(np.float32)
        if display.voi_function == "LINEAR_EXACT":
            return np.clip((x - (c - w / 2)) / w, 0.0, 1.0).astype(np.float32)
        # DICOM PS3.3 C.11.2.1.2.1 (LINEAR)
        return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0).astype(np.float32)
    lo, hi = np.percentile(x, percentiles)
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def invert_monochrome1(x: npt.NDArray[np.float32], photometric: str) -> npt.NDArray[np.float32]:
    """MONOCHROME1 shows low values white; flip so bone is bright in every image."""
    return (1.0 - x).astype(np.float32) if photometric == "MONOCHROME1" else x


def colour_to_unit(rgb: npt.NDArray[np.integer]) -> npt.NDArray[np.float32]:
    """Integer RGB -> float in [0, 1] by the dtype's range."""
    top = float(np.iinfo(rgb.dtype).max) if np.issubdtype(rgb.dtype, np.integer) else max(float(rgb.max()), 1.0)
    return (rgb.astype(np.float32) / top).astype(np.float32)


def to_grey(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """RGB -> luma (ITU-R BT.601), grey passes through."""
    if x.ndim == 3 and x.shape[-1] == 3:
        return (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.float32)
    return x


def resize_aspect(
    x: npt.NDArray[np.float32], size: tuple[int, int], spacing: tuple[float, float] | None = None
) -> tuple[npt.NDArray[np.float32], tuple[float, float] | None]:
    """Fit ``x`` (H, W) or (H, W, C) inside ``size`` (H, W) keeping its aspect ratio, centred on a zero background.

    Each channel is resized alone (bilinear, in float), so a colour image is letterboxed exactly as
    each of its planes would be. Returns the letterboxed image and the new pixel spacing (mm), if
    the input had one.

    >>> import numpy as np
    >>> out, sp = resize_aspect(np.ones((100, 50), np.float32), (28, 28), (0.2, 0.2))
    >>> out.shape, float(out[:, :7].max()), float(out[:, 7:21].min()), sp
    ((28, 28), 0.0, 1.0, (0.7142857142857143, 0.7142857142857143))
    >>> resize_aspect(np.ones((100, 50, 3), np.float32), (28, 28))[0].shape
    (28, 28, 3)
    """
    from PIL import Image

    if min(size) <= 0:
        raise ConfigError(f"input size must be positive, got {size}")
    h, w = x.shape[:2]
    scale = min(size[0] / h, size[1] / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (size[0] - nh) // 2, (size[1] - nw) // 2
    new_spacing = (spacing[0] * h / nh, spacing[1] * w / nw) if spacing else None
    planes = [x] if x.ndim == 2 else [x[..., c] for c in range(x.shape[2])]
    out = np.zeros((*size, *x.shape[2:]), dtype=np.float32)
    for c, plane in enumerate(planes):
        img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
        resized = np.asarray(img.resize((nw, nh), Image.Resampling.BILINEAR))
        if x.ndim == 2:
            out[top : top + nh, left : left + nw] = resized
        else:
            out[top : top + nh, left : left + nw, c] = resized
    return out, new_spacing


#: the channel counts a 2-D recipe makes: grey, or RGB
CHANNELS = (1, 3)


def check_channels(recipe: str, channels: int) -> int:
    """``channels`` if the recipe can make it (1: grey, 3: RGB), else a :class:`ConfigError` naming both.

    >>> check_channels("xray", 3)
    3
    >>> check_channels("xray", 4)
    Traceback (most recent call last):
    ...
    medret.errors.ConfigError: recipe 'xray' makes 1 (grey) or 3 (RGB) channel inputs; the encoder asks for channels=4
    """
    if channels not in CHANNELS:
        raise ConfigError(
            f"recipe {recipe!r} makes 1 (grey) or 3 (RGB) channel inputs; the encoder asks for channels={channels}"
        )
    return channels


def fit(
    x: npt.NDArray[np.float32], size: tuple[int, int], channels: int, spacing: tuple[float, float] | None = None
) -> tuple[npt.NDArray[np.float32], tuple[float, float] | None]:
    """An image in [0, 1] ((H, W) grey or (H, W, 3) RGB) -> the letterboxed model input with ``channels``.

    One channel: turned grey first, then letterboxed to (H, W). Three: letterboxed in colour to
    (H, W, 3); a grey image is letterboxed, then repeated in each channel (the same numbers as
    letterboxing three equal planes), so the padding is zero in every channel either way.

    >>> import numpy as np
    >>> fit(np.ones((10, 5), np.float32), (8, 8), 3)[0].shape, fit(np.ones((10, 5, 3), np.float32), (8, 8), 1)[0].shape
    ((8, 8, 3), (8, 8))
    """
    if channels == 1:
        return resize_aspect(to_grey(x), size, spacing)
    image, new_spacing = resize_aspect(x, size, spacing)
    if image.ndim == 2:
        image = np.repeat(image[..., None], channels, axis=2)
    return image, new_spacing
