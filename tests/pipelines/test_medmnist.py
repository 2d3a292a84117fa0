from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medret.errors import DataError
from medret.eval.benchmarks import medmnist4, split_from_files, split_indices
from medret.io.medmnist import read_medmnist, to_grey


def test_medmnist4_split_counts(data_dir: Path) -> None:
    split = medmnist4(data_dir / "medmnist")
    assert {p: len(split[p]) for p in split.parts} == {"train": 39737, "val": 6623, "gallery": 13246, "query": 6634}
    assert split.counts() == {
        "breast": {"train": 468, "val": 78, "gallery": 156, "query": 78},
        "retina": {"train": 958, "val": 160, "gallery": 319, "query": 163},
        "chest": {"train": 3017, "val": 503, "gallery": 1006, "query": 504},
        "abdomen": {"train": 35294, "val": 5882, "gallery": 11765, "query": 5889},
    }
    # the parts partition every image of every file exactly once
    for oi in range(4):
        src = np.concatenate([split[p].source[split[p].organ == oi] for p in split.parts])
        assert len(np.unique(src)) == len(src)
    assert split["query"].images.shape[1:] == (28, 28) and split["query"].images.dtype == np.uint8


def test_split_is_the_documented_procedure() -> None:
    labels = np.array([1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0])
    rng = np.random.default_rng(0)
    idx0 = np.where(labels == 0)[0]
    idx0 = idx0[rng.permutation(3)]
    idx1 = np.where(labels == 1)[0]
    idx1 = idx1[rng.permutation(9)]
    got = split_indices(labels)
    assert got["train"].tolist() == [*idx0[:1], *idx1[:5]]
    assert got["val"].tolist() == [*idx0[1:2], *idx1[5:6]]
    assert got["gallery"].tolist() == [*idx0[2:2], *idx1[6:8]]
    assert got["query"].tolist() == [*idx0[2:], *idx1[8:]]


def test_reader_labels_and_rgb(data_dir: Path, tmp_path: Path) -> None:
    retina = read_medmnist(data_dir / "medmnist" / "retinamnist.npz")
    assert retina.rgb and retina.images.shape == (1600, 28, 28, 3) and retina.labels.shape == (1600,)
    assert to_grey(retina.images).shape == (1600, 28, 28)
    # (N, 1) labels and a user's own file named after its stem
    rng = np.random.default_rng(0)
    arrays = {
        f"{s}_images": rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        for s, n in (("train", 30), ("val", 10), ("test", 20))
    }
    arrays |= {f"{s}_labels": rng.integers(0, 3, (n, 1)) for s, n in (("train", 30), ("val", 10), ("test", 20))}
    np.savez(tmp_path / "mydata.npz", **arrays)
    split = split_from_files([tmp_path / "mydata.npz"])
    assert split.organs == ["mydata"] and sum(len(split[p]) for p in split.parts) == 60


def test_reader_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="broken.npz"):
        read_medmnist(bad)
    np.savez(tmp_path / "partial.npz", train_images=np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(DataError, match="missing arrays"):
        read_medmnist(tmp_path / "partial.npz")
    with pytest.raises(DataError, match="no such"):
        read_medmnist(tmp_path / "absent.npz")


def test_the_medmnist_recipe_makes_the_benchmarks_grey_input(data_dir: Path) -> None:
    """An RGB MedMNIST image indexed through the medmnist kind's recipe is the benchmark's grey image
    (luma rounded to uint8, then / 255), so its code is the code the benchmark scores."""
    from medret.io.base import Decoded
    from medret.preprocess.recipes import RECIPES

    retina = read_medmnist(data_dir / "medmnist" / "retinamnist.npz")
    grey = to_grey(retina.images).astype(np.float32) / 255.0
    made = np.stack(
        [RECIPES.get("medmnist")(Decoded(im, kind="medmnist", reader="numpy"))[0].image for im in retina.images]
    )
    assert np.array_equal(made, grey)
    colour = RECIPES.get("medmnist")(Decoded(retina.images[0], kind="medmnist", reader="numpy"), channels=3)[0].image
    assert colour.shape == (28, 28, 3) and np.allclose(colour, retina.images[0] / 255.0, atol=1e-6)
