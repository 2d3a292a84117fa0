"""MedMNIST ``.npz`` sets: ``{train,val,test}_{images,labels}`` arrays.

Images are (N, H, W) grey or (N, H, W, 3) RGB uint8; labels (N,) or (N, 1).
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from medret.errors import DataError, EmptyFileError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class MedMNIST:
    """One MedMNIST file, its official splits concatenated in train, val, test order."""

    path: Path
    images: npt.NDArray[np.uint8]  # (N, H, W) or (N, H, W, 3)
    labels: npt.NDArray[np.int64]  # (N,)
    split: npt.NDArray[np.str_]  # official split of each image

    @property
    def rgb(self) -> bool:
        return self.images.ndim == 4


def read_medmnist(src: str | os.PathLike[str] | bytes, *, name: str | None = None) -> MedMNIST:
    """A MedMNIST set from a path or from the file's bytes (named ``name`` in messages)."""
    p = Path(name or ("<bytes>" if isinstance(src, bytes) else src))
    if not isinstance(src, bytes) and not Path(src).is_file():
        raise DataError(f"{p}: no such MedMNIST file")
    if isinstance(src, bytes) and not src:
        raise EmptyFileError(str(p), "file is empty (0 bytes)")
    try:
        with np.load(io.BytesIO(src) if isinstance(src, bytes) else src, allow_pickle=False) as z:
            missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in z.files]
            if missing:
                raise DataError(f"{p}: not a MedMNIST .npz, missing arrays {missing} (has {z.files})")
            images, labels, split = [], [], []
            for s in SPLITS:
                im = np.asarray(z[f"{s}_images"])
                lab = np.asarray(z[f"{s}_labels"])
                if lab.ndim == 2 and lab.shape[1] == 1:
                    lab = lab[:, 0]
                if lab.ndim != 1:
                    raise DataError(
                        f"{p}: {s}_labels must be (N,) or (N, 1), got {lab.shape} (multi-label sets are not supported)"
                    )
                if im.ndim not in (3, 4) or (im.ndim == 4 and im.shape[3] != 3) or len(im) != len(lab):
                    raise DataError(f"{p}: {s}_images has shape {im.shape} for {len(lab)} labels")
                images.append(im.astype(np.uint8, copy=False))
                labels.append(lab.astype(np.int64))
                split.append(np.full(len(lab), s))
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{p}: cannot read as .npz: {err}") from err
    shapes = {im.shape[1:] for im in images}
    if len(shapes) != 1:
        raise DataError(f"{p}: splits have different image shapes {sorted(shapes)}")
    return MedMNIST(p, np.concatenate(images), np.concatenate(labels), np.concatenate(split))


def to_grey(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """RGB -> grey with ITU-R BT.601 luma weights; grey passes through."""
    if images.ndim == 3:
        return images
    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)


def to_channels(images: npt.NDArray[np.uint8], channels: int) -> npt.NDArray[np.uint8]:
    """``images`` (N, H, W) or (N, H, W, 3) as ``channels`` 1 (grey, :func:`to_grey`) or 3 (RGB, grey
    repeated in each channel); images that already have them pass through unchanged.

    >>> to_channels(np.full((1, 2, 2), 7, np.uint8), 3).shape
    (1, 2, 2, 3)
    >>> int(to_channels(np.full((1, 2, 2, 3), 7, np.uint8), 1)[0, 0, 0])
    7
    """
    if channels == 1:
        return to_grey(images)
    if channels != 3:
        raise DataError(f"images can be made 1 (grey) or 3 (RGB) channels, not {channels}")
    return images if images.ndim == 4 else np.repeat(images[..., None], 3, axis=3)
