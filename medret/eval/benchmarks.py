"""The ``medmnist-4`` retrieval benchmark split, exactly as ../shared/BENCHMARKS.md defines it.

For each subset (breast, retina, chest, abdomen): concatenate the official
train, val, test; a fresh ``default_rng(0)``; per class in ascending order permute
its indices and cut 60 / 10 / 20 / 10 % into train / val / gallery / query.
Any MedMNIST-layout file can be split the same way (its organ is its file stem).

The split leaves each organ's gallery sorted by class, and Hamming ties are broken by gallery
position, so that order would favour low class ids. The gallery is therefore put in a fixed,
label-independent order: the organs' gallery parts concatenated in file order, then permuted as a
whole by ``default_rng(12345).permutation(n)`` (``GALLERY_SEED``). ``gallery_order="class"`` keeps
the old order, for comparison only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from medret.config import data_root
from medret.errors import DataError
from medret.io.medmnist import read_medmnist, to_channels

MEDMNIST4 = (
    ("breast", "breastmnist"),
    ("retina", "retinamnist"),
    ("chest", "pneumoniamnist"),
    ("abdomen", "organamnist"),
)
PARTS = ("train", "val", "gallery", "query")
GALLERY_SEED = 12345
GALLERY_ORDERS = ("shuffled", "class")


def split_indices(labels: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[np.int64]]:
    """Per-class 60/10/20/10 split with a fresh ``default_rng(0)``, classes ascending."""
    rng = np.random.default_rng(0)
    out: dict[str, list[npt.NDArray[np.int64]]] = {p: [] for p in PARTS}
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        cuts = [0, int(np.floor(0.6 * n)), int(np.floor(0.7 * n)), int(np.floor(0.9 * n)), n]
        for part, a, b in zip(PARTS, cuts[:-1], cuts[1:], strict=True):
            out[part].append(idx[a:b])
    return {p: np.concatenate(v) if v else np.zeros(0, np.int64) for p, v in out.items()}


@dataclass
class Part:
    """One part of the benchmark: images with organ and class labels, in benchmark order."""

    images: npt.NDArray[np.uint8]  # (N, H, W) grey or (N, H, W, 3) RGB
    organ: npt.NDArray[np.int64]  # index into RetrievalSplit.organs
    label: npt.NDArray[np.int64]  # class within the organ
    source: npt.NDArray[np.int64]  # index of the image in its file (train, val, test concatenated)

    def __len__(self) -> int:
        return len(self.label)


@dataclass
class RetrievalSplit:
    organs: list[str]
    parts: dict[str, Part] = field(default_factory=dict)

    def __getitem__(self, part: str) -> Part:
        return self.parts[part]

    def counts(self) -> dict[str, dict[str, int]]:
        return {o: {p: int((self.parts[p].organ == i).sum()) for p in PARTS} for i, o in enumerate(self.organs)}

    def reordered(self, part: str, order: npt.NDArray[np.int64]) -> RetrievalSplit:
        """The same split with ``part``'s items in ``order`` (positions into the current order)."""
        p = self.parts[part]
        moved = Part(p.images[order], p.organ[order], p.label[order], p.source[order])
        return RetrievalSplit(self.organs, {**self.parts, part: moved})


def gallery_permutation(n: int, seed: int = GALLERY_SEED) -> npt.NDArray[np.int64]:
    """The benchmark's gallery order: ``default_rng(seed).permutation(n)`` of the class-ordered gallery."""
    return np.random.default_rng(seed).permutation(n)


def with_gallery_order(split: RetrievalSplit, order: str = "shuffled", seed: int = GALLERY_SEED) -> RetrievalSplit:
    """``split`` (its gallery in class order, as :func:`build_split` cuts it) in the named gallery order."""
    if order not in GALLERY_ORDERS:
        raise DataError(f"gallery order must be one of {GALLERY_ORDERS}, got {order!r}")
    if order == "class":
        return split
    return split.reordered("gallery", gallery_permutation(len(split["gallery"]), seed))


def build_split(
    files: Sequence[tuple[str, str | os.PathLike[str]]], gallery_order: str = "shuffled", channels: int = 1
) -> RetrievalSplit:
    """Split ``(organ, path)`` files; the gallery in ``gallery_order``. Images become grey (RGB via BT.601
    luma) with ``channels=1``, RGB (grey files repeated in each channel) with ``channels=3``."""
    split = RetrievalSplit(organs=[o for o, _ in files])
    chunks: dict[str, list[Part]] = {p: [] for p in PARTS}
    for oi, (_, path) in enumerate(files):
        ds = read_medmnist(path)
        images = to_channels(ds.images, channels)
        for part, idx in split_indices(ds.labels).items():
            chunks[part].append(Part(images[idx], np.full(len(idx), oi), ds.labels[idx], idx))
    shapes = {c.images.shape[1:] for cs in chunks.values() for c in cs}
    if len(shapes) > 1:
        raise DataError(f"files have different image sizes {sorted(shapes)}; use files of one size")
    for part, cs in chunks.items():
        split.parts[part] = Part(
            np.concatenate([c.images for c in cs]),
            np.concatenate([c.organ for c in cs]),
            np.concatenate([c.label for c in cs]),
            np.concatenate([c.source for c in cs]),
        )
    return with_gallery_order(split, gallery_order)


def medmnist4(
    root: str | os.PathLike[str] | None = None, gallery_order: str = "shuffled", channels: int = 1
) -> RetrievalSplit:
    base = Path(root) if root is not None else data_root() / "medmnist"
    files = [(organ, base / f"{stem}.npz") for organ, stem in MEDMNIST4]
    missing = [str(p) for _, p in files if not p.is_file()]
    if missing:
        raise DataError(f"medmnist-4 needs {missing}; set MEDRET_DATA to a folder holding medmnist/*.npz")
    return build_split(files, gallery_order, channels)


def split_from_files(
    paths: Sequence[str | os.PathLike[str]], gallery_order: str = "shuffled", channels: int = 1
) -> RetrievalSplit:
    """A user's own MedMNIST-layout files; each becomes an organ named after the file."""
    return build_split([(Path(p).stem, p) for p in paths], gallery_order, channels)
