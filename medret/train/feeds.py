"""Where a worker's training batches come from: arrays in memory, or an archive streamed by Ray Data.

Both feeds give the same things: the task's shape (:meth:`task_info`), each epoch's batches of
``(uint8 images, organ, combined label)`` for this worker, a fixed validation part, and a
sample of training images for the fits done at export (bit balance, similarity bits).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from medret.eval.benchmarks import Part
from medret.methods.base import TaskInfo
from medret.train.config import TrainConfig
from medret.train.data import Labels, batches, epoch_indices, load_split

Batch = tuple[npt.NDArray[Any], npt.NDArray[np.int64], npt.NDArray[np.int64]]


class Feed(Protocol):
    organs: list[str]
    n_train: int
    n_classes: int

    def task_info(self, bits: int, fine_bits: int) -> TaskInfo: ...

    def epoch(self, epoch: int, *, batch_size: int, samples: int, rank: int, world: int) -> Iterator[Batch]: ...

    def val(self) -> Part:
        """Validation images with *combined* labels."""
        ...

    def train_sample(self, n: int, seed: int, *, balanced: bool) -> npt.NDArray[Any]:
        """Up to ``n`` training images: drawn as the epochs draw them (``balanced``), or uniformly without repeats."""
        ...


def _info(
    images: npt.NDArray[Any], n_classes: int, n_organs: int, bits: int, fine_bits: int, cfg: TrainConfig
) -> TaskInfo:
    return TaskInfo(
        mean=cfg.mean,
        std=cfg.std,
        bits=bits,
        n_classes=n_classes,
        n_organs=n_organs,
        channels=1 if images.ndim == 3 else int(images.shape[3]),
        input_size=(int(images.shape[1]), int(images.shape[2])),
        fine_bits=fine_bits,
    )


class MemoryFeed:
    """medmnist-4 or MedMNIST-layout ``.npz`` files, loaded whole; organ-balanced sampling."""

    def __init__(self, cfg: TrainConfig, *, with_val: bool = False) -> None:
        self.cfg = cfg
        self.split = load_split(cfg.data, channels=cfg.channels or 1)
        if with_val:  # a refit: the val part is trained on too (and no longer chooses anything)
            t, v = self.split["train"], self.split["val"]
            fields = ("images", "organ", "label", "source")
            self.split.parts["train"] = Part(*(np.concatenate([getattr(t, f), getattr(v, f)]) for f in fields))
        self.labels = Labels.of(self.split)
        self.organs = self.split.organs
        self.n_train = len(self.split["train"])
        self.n_classes = self.labels.n_classes
        self.train_label = self.labels.combined(self.split["train"])

    def task_info(self, bits: int, fine_bits: int) -> TaskInfo:
        return _info(self.split["train"].images, self.n_classes, len(self.organs), bits, fine_bits, self.cfg)

    def epoch(self, epoch: int, *, batch_size: int, samples: int, rank: int, world: int) -> Iterator[Batch]:
        cfg, train = self.cfg, self.split["train"]
        balance = 0.0 if cfg.label_free else cfg.organ_balance  # the organ is a label too
        idx = epoch_indices(train.organ, balance=balance, samples=samples, seed=cfg.seed * 100_003 + epoch)
        for b in batches(idx, batch_size=batch_size, rank=rank, world=world):
            yield train.images[b], train.organ[b], self.train_label[b]

    def val(self) -> Part:
        v = self.split["val"]
        return Part(v.images, v.organ, self.labels.combined(v), v.source)

    def train_sample(self, n: int, seed: int, *, balanced: bool) -> npt.NDArray[Any]:
        train = self.split["train"]
        if not balanced:
            return train.images[np.random.default_rng(seed).choice(len(train), min(len(train), n), replace=False)]
        balance = 0.0 if self.cfg.label_free else self.cfg.organ_balance
        return train.images[epoch_indices(train.organ, balance=balance, samples=n, seed=seed)]


class ArchiveFeed:
    """A prepared archive (:mod:`medret.train.archive`): the training rows stream from this worker's
    Ray Data shard (``ray.train.get_dataset_shard``), shuffled locally; validation and the export
    sample are read from the cache on demand. No organ balancing: the archive's own mix is kept."""

    def __init__(self, cfg: TrainConfig, archive_json: str) -> None:
        from medret.train.archive import Archive

        self.cfg = cfg
        self.archive = Archive.from_json(archive_json)
        self.organs = self.archive.organs
        self.n_train = self.archive.counts["train"]
        self.n_classes = max(1, self.archive.n_classes)
        self._val: Part | None = None

    def task_info(self, bits: int, fine_bits: int) -> TaskInfo:
        a = self.archive
        shape = (1, *a.input_size, a.channels) if a.channels > 1 else (1, *a.input_size)
        return _info(np.zeros(shape, np.uint8), self.n_classes, len(self.organs), bits, fine_bits, self.cfg)

    def epoch(self, epoch: int, *, batch_size: int, samples: int, rank: int, world: int) -> Iterator[Batch]:
        import ray.train

        from medret.train.archive import iter_part_batches

        shard = ray.train.get_dataset_shard("train")
        seed = self.cfg.seed * 100_003 + epoch * 1009 + rank
        for batch in iter_part_batches(shard, batch_size // world, seed=seed):
            yield batch["image"], batch["organ"], batch["label"]

    def val(self) -> Part:
        from medret.train.archive import read_part

        if self._val is None:
            self._val = read_part(self.archive, "val", self.cfg, limit=max(256, self.cfg.val_queries))
        return self._val

    def train_sample(self, n: int, seed: int, *, balanced: bool) -> npt.NDArray[Any]:
        from medret.train.archive import read_part

        return read_part(self.archive, "train", self.cfg, limit=n).images


def open_feed(cfg: TrainConfig, archive_json: str | None, *, with_val: bool = False) -> Feed:
    return ArchiveFeed(cfg, archive_json) if archive_json else MemoryFeed(cfg, with_val=with_val)
