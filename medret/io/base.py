"""What every reader returns and how sources are given (which reader a file needs: :mod:`medret.kinds`).

A reader takes a *source* (a local path, or the object's bytes plus a name for
messages) and returns a :class:`Decoded` image: pixels exactly as stored after
the modality transform, physical spacing, display hints for later windowing, and
a JSON-safe metadata dict that never holds patient-identifying attributes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.errors import EmptyFileError, ObjectNotFoundError, PixelBudgetError

#: Refuse to decode images that declare more pixels than this (decompression bombs).
DEFAULT_PIXEL_BUDGET = 400_000_000

Source = str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class Display:
    """How stored values map to display intensities (used by preprocessing, not by readers)."""

    photometric: str = "MONOCHROME2"
    bits_stored: int = 8
    window_center: tuple[float, ...] = ()
    window_width: tuple[float, ...] = ()
    voi_function: str = "LINEAR"
    voi_lut: tuple[int, int, npt.NDArray[np.float32]] | None = None  # (first mapped value, bits, table)


@dataclass(frozen=True)
class Decoded:
    """One decoded 2-D image (possibly multi-frame).

    ``pixels`` is (H, W), (H, W, 3), (F, H, W) or (F, H, W, 3); ``frames`` says which.
    ``spacing`` is (row, column) pixel size in millimetres when the file states it.
    """

    pixels: npt.NDArray[Any]
    kind: str
    reader: str
    spacing: tuple[float, float] | None = None
    frames: int = 1
    display: Display = field(default_factory=Display)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rgb(self) -> bool:
        return self.pixels.shape[-1] == 3 and self.pixels.ndim == (4 if self.frames > 1 else 3)

    def frame(self, i: int) -> npt.NDArray[Any]:
        return self.pixels[i] if self.frames > 1 else self.pixels


def source_name(src: Source, name: str | None = None) -> str:
    if name:
        return name
    return "<bytes>" if isinstance(src, bytes) else str(src)


def read_source(src: Source, name: str | None = None) -> bytes:
    """The whole content of a source; refuses empty files."""
    label = source_name(src, name)
    if isinstance(src, bytes):
        data = src
    else:
        try:
            data = Path(src).read_bytes()
        except FileNotFoundError as err:
            raise ObjectNotFoundError(f"{label}: no such file") from err
        except IsADirectoryError as err:
            raise ObjectNotFoundError(f"{label}: is a directory, not a file") from err
    if not data:
        raise EmptyFileError(label, "file is empty (0 bytes)")
    return data


@contextlib.contextmanager
def local_path(src: Source, name: str | None = None, suffix: str = "") -> Iterator[Path]:
    """A local file for libraries that need a path (OpenSlide, nibabel); bytes are spilled to a temp file."""
    if not isinstance(src, bytes):
        p = Path(src)
        if not p.is_file():
            raise ObjectNotFoundError(f"{source_name(src, name)}: no such file")
        if p.stat().st_size == 0:
            raise EmptyFileError(str(p), "file is empty (0 bytes)")
        yield p
        return
    if not src:
        raise EmptyFileError(source_name(src, name), "file is empty (0 bytes)")
    suffix = suffix or "".join(Path(name or "").suffixes[-2:])
    with tempfile.TemporaryDirectory(prefix="medret-") as tmp:
        p = Path(tmp) / f"object{suffix}"
        p.write_bytes(src)
        yield p


def check_budget(label: str, pixels: int, budget: int, what: str) -> None:
    if pixels > budget:
        raise PixelBudgetError(
            label, f"declares {what} = {pixels:,} pixels, above the pixel budget of {budget:,}; refusing to decode"
        )
