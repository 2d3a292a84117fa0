"""``medret train --data X.npz`` sizes a run it has never seen (:mod:`medret.train.auto`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medret.eval.benchmarks import MEDMNIST4, medmnist4
from medret.methods import METHODS
from medret.train.auto import MAX_EPOCHS, MAX_PASSES, DataShape, apply_auto, auto_recipe, data_shape
from medret.train.config import TrainConfig


def subset(data_dir: Path, stem: str) -> str:
    return str(data_dir / "medmnist" / f"{stem}.npz")


@pytest.mark.parametrize("method", METHODS.names())
def test_on_medmnist4_every_method_gets_back_its_tuned_defaults(method: str) -> None:
    d = METHODS.get(method).defaults
    r = auto_recipe(DataShape(39_737, 4, True), batch=d["batch_size"], epochs=d["epochs"], lr=d["lr"], benchmark=True)
    assert (r.batch_size, r.epochs, r.samples_per_epoch, r.lr, r.channels) == (
        d["batch_size"],
        d["epochs"],
        None,
        d["lr"],
        1,
    )


def test_the_training_part_and_colour_are_read_as_the_split_cuts_them(data_dir: Path) -> None:
    split = medmnist4(data_dir / "medmnist")
    for oi, (_, stem) in enumerate(MEDMNIST4):
        shape = data_shape([subset(data_dir, stem)])
        assert shape.n_train == int((split["train"].organ == oi).sum())
        assert shape.colour == (stem == "retinamnist")
    assert data_shape(["medmnist-4"]) == DataShape(len(split["train"]), 4, True)


@pytest.mark.parametrize("stem", [s for _, s in MEDMNIST4])
def test_a_single_subset_gets_enough_steps_and_no_more_than_the_tuned_run(data_dir: Path, stem: str) -> None:
    cfg, r = apply_auto(TrainConfig(data=[subset(data_dir, stem)]))
    assert r is not None
    n = data_shape(cfg.data).n_train
    assert cfg.batch_size == r.batch_size and n // r.batch_size >= 14  # BreastMNIST (468) gets 14 steps a pass
    assert r.batch_size in (32, 64, 128, 256)
    assert r.passes <= MAX_PASSES and 1 <= r.epochs <= MAX_EPOCHS
    assert r.steps <= 15 * (39_737 // 256) + n // r.batch_size  # the tuned run's length, to a whole epoch
    assert cfg.channels == (3 if stem == "retinamnist" else 1)
    assert cfg.lr == pytest.approx(2e-3 * np.sqrt(r.batch_size / 256), rel=1e-2)
    if stem == "breastmnist":  # the methods' batch of 256 would make one step an epoch
        assert r.steps >= 500 and cfg.samples_per_epoch and cfg.samples_per_epoch > n


def test_what_the_user_sets_wins(data_dir: Path) -> None:
    base = TrainConfig(data=[subset(data_dir, "breastmnist")], epochs=5, batch_size=64, channels=1)
    cfg, r = apply_auto(base)
    assert r is not None
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.samples_per_epoch, cfg.channels) == (5, 64, None, None, 1)
    cfg, _ = apply_auto(TrainConfig(data=[subset(data_dir, "retinamnist")], preset="medmnist"))
    assert cfg.channels == 1  # a preset fixes the geometry
    cfg, _ = apply_auto(TrainConfig(data=[subset(data_dir, "retinamnist")], init="default"))
    assert cfg.channels == 1  # so do the weights a fine-tuning run starts from (the shipped default is grey)
    assert apply_auto(TrainConfig(data=[subset(data_dir, "retinamnist")]))[0].channels == 3


def test_archives_and_training_free_runs_are_left_alone(tmp_path: Path) -> None:
    cfg = TrainConfig(source=str(tmp_path))
    assert apply_auto(cfg) == (cfg, None)
