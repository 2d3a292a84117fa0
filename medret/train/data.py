"""Training data for the workers: the split, organ-balanced sampling, augmentation. Pure torch/numpy."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from medret.eval.benchmarks import Part, RetrievalSplit, medmnist4, split_from_files
from medret.methods.base import TaskInfo
from medret.models.augment import augment

__all__ = ["augment"]  # re-exported: it lives with the models so that methods (a lower floor) may use it


def load_split(data: Sequence[str], gallery_order: str = "shuffled", channels: int = 1) -> RetrievalSplit:
    """``["medmnist-4"]`` or a list of MedMNIST-layout ``.npz`` paths, the gallery in ``gallery_order``,
    images grey (``channels=1``) or RGB (3)."""
    if list(data) == ["medmnist-4"]:
        return medmnist4(gallery_order=gallery_order, channels=channels)
    return split_from_files(list(data), gallery_order, channels)


@dataclass(frozen=True)
class Labels:
    """Combined (organ, class) labels: ``offsets[organ] + class``."""

    offsets: npt.NDArray[np.int64]
    n_classes: int

    @classmethod
    def of(cls, split: RetrievalSplit) -> Labels:
        sizes = []
        for oi in range(len(split.organs)):
            classes = [split[p].label[split[p].organ == oi] for p in ("train", "val", "gallery", "query")]
            sizes.append(int(max((c.max() for c in classes if len(c)), default=-1)) + 1)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        return cls(offsets, int(sum(sizes)))

    def combined(self, part: Part) -> npt.NDArray[np.int64]:
        return self.offsets[part.organ] + part.label


def task_info(split: RetrievalSplit, bits: int, fine_bits: int = 0) -> TaskInfo:
    images = split["train"].images
    channels = 1 if images.ndim == 3 else images.shape[3]
    return TaskInfo(
        bits=bits,
        n_classes=Labels.of(split).n_classes,
        n_organs=len(split.organs),
        channels=channels,
        input_size=(images.shape[1], images.shape[2]),
        fine_bits=fine_bits,
    )


def epoch_indices(organ: npt.NDArray[np.int64], *, balance: float, samples: int, seed: int) -> npt.NDArray[np.int64]:
    """Indices for one epoch, drawn with replacement so that organ ``o`` has weight ``n_o ** (1 - balance)``.

    ``balance`` 0 keeps the natural mix (a permutation, no replacement); 1 makes organs equally likely.

    >>> idx = epoch_indices(np.array([0] * 90 + [1] * 10), balance=1.0, samples=1000, seed=0)
    >>> 400 < int((idx >= 90).sum()) < 600
    True
    """
    rng = np.random.default_rng(seed)
    if balance == 0:
        base = rng.permutation(len(organ))
        reps = math.ceil(samples / len(organ))
        return np.concatenate([base] + [rng.permutation(len(organ)) for _ in range(reps - 1)])[:samples]
    counts = np.bincount(organ)
    w = np.power(counts[organ].astype(np.float64), -balance)
    return rng.choice(len(organ), size=samples, replace=True, p=w / w.sum())


def batches(
    indices: npt.NDArray[np.int64], *, batch_size: int, rank: int, world: int
) -> Iterator[npt.NDArray[np.int64]]:
    """This worker's share of every global batch (the last partial batch is dropped)."""
    per = batch_size // world
    for start in range(0, len(indices) - batch_size + 1, batch_size):
        yield indices[start + rank * per : start + (rank + 1) * per]


def to_tensor(images: npt.NDArray[np.uint8]) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255)
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
