"""How ``medret train --data X.npz`` sizes a run it has never seen: batch, learning rate, epochs, channels.

The methods' own defaults (batch 256, 15 epochs for ``default``) were tuned on medmnist-4, whose
training part has 39,737 images. Taken as they are, they fit a small set badly: BreastMNIST's 468
training images make one batch of 256 an epoch (the partial batch is dropped), so 15 epochs are 15
optimizer steps. The rule below scales the tuned run to the data, so that it gives back exactly the
tuned defaults on medmnist-4 and stays sensible far from it:

- **batch**: the largest power of two up to ``n_train / 32`` (at least 32 steps per pass over the
  data), between 32 and the method's batch;
- **learning rate**: the method's, times ``sqrt(batch / method batch)`` (Adam's usual square-root rule);
- **training length**: the tuned run's number of optimizer steps (``epochs x 39,737 / batch`` of the
  method), but at most ``MAX_PASSES`` passes over the data, where more steps only memorise it;
- **epochs**: one epoch per pass when the run makes at most ``MAX_EPOCHS`` passes, else ``MAX_EPOCHS``
  epochs of equal length (``samples_per_epoch``), so a small set still gets that many validation
  points to choose its best epoch from;
- **channels**: RGB when a file is in colour (grey files repeated in each channel), else grey;
  medmnist-4 stays grey, as the benchmark's recorded figures are; a fine-tuning run (``init``)
  keeps its encoder's;
- **balance**: several files are organs and are sampled with weight ``n ** -0.5`` (``organ_balance``,
  unchanged); classes keep their natural mix, which is the mix mAP is measured on.

Every value the user sets wins; the rule fills only what is left unset, and the run records its
decisions (``auto`` in the encoder's provenance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

#: the training part the methods' defaults were tuned on (medmnist-4, 60% of each class)
TUNED_TRAIN = 39_737
MIN_BATCH = 32
#: at least this many optimizer steps per pass over the data
STEPS_PER_PASS = 32
MAX_PASSES = 60
MAX_EPOCHS = 30


@dataclass(frozen=True)
class DataShape:
    """What the rule looks at: the training images per file (organ), and whether any file is in colour."""

    n_train: int
    organs: int
    colour: bool


@dataclass(frozen=True)
class AutoRecipe:
    batch_size: int
    lr: float
    epochs: int
    samples_per_epoch: int | None
    channels: int
    steps: int
    passes: float
    why: str

    def record(self) -> dict[str, Any]:
        return asdict(self)


def floor_pow2(x: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(1.0, x))))


def auto_recipe(
    shape: DataShape,
    *,
    batch: int,
    epochs: int,
    lr: float,
    benchmark: bool = False,
    fixed_batch: int | None = None,
) -> AutoRecipe:
    """The run for ``shape``, scaled from a method tuned at ``batch``, ``epochs`` and ``lr`` on medmnist-4
    (its length counted in batches of ``fixed_batch`` where the user chose the batch).

    >>> r = auto_recipe(DataShape(39_737, 4, True), batch=256, epochs=15, lr=2e-3, benchmark=True)
    >>> (r.batch_size, r.epochs, r.samples_per_epoch, r.channels, r.lr)
    (256, 15, None, 1, 0.002)
    >>> r = auto_recipe(DataShape(468, 1, False), batch=256, epochs=15, lr=2e-3)
    >>> (r.batch_size, r.epochs, r.samples_per_epoch, r.steps)
    (32, 30, 936, 870)
    """
    n = max(1, shape.n_train)
    b = fixed_batch or max(min(MIN_BATCH, batch), min(batch, floor_pow2(n / STEPS_PER_PASS)))
    tuned_steps = epochs * (TUNED_TRAIN // batch)
    samples = min(tuned_steps * b, MAX_PASSES * n)
    passes = samples / n
    if passes <= MAX_EPOCHS + 0.5:
        n_epochs, per_epoch = max(1, round(passes)), None
    else:
        n_epochs, per_epoch = MAX_EPOCHS, int(samples // MAX_EPOCHS)
    steps = n_epochs * ((per_epoch or n) // b)
    rgb = shape.colour and not benchmark
    new_lr = float(f"{lr * math.sqrt(b / batch):.3g}")
    why = (
        f"{n:,} training images in {shape.organs} file(s): batch {b} ({n // b} steps a pass), lr {new_lr:g}, "
        f"{steps:,} steps in {n_epochs} epochs ({passes:.1f} passes; the tuned run makes {tuned_steps:,} steps, "
        f"at most {MAX_PASSES} passes), {'RGB' if rgb else 'grey'}"
        + (" (medmnist-4 is measured grey)" if shape.colour and benchmark else "")
    )
    return AutoRecipe(b, new_lr, n_epochs, per_epoch, 3 if rgb else 1, steps, round(passes, 2), why)


def data_shape(data: Sequence[str]) -> DataShape:
    """The training-part size and colour of ``data`` (``["medmnist-4"]`` or ``.npz`` paths), as the split cuts it."""
    from medret.config import data_root
    from medret.eval.benchmarks import MEDMNIST4, split_indices
    from medret.io.medmnist import read_medmnist

    benchmark = [data_root() / "medmnist" / f"{stem}.npz" for _, stem in MEDMNIST4]
    paths = benchmark if list(data) == ["medmnist-4"] else data
    n_train, colour = 0, False
    for p in paths:
        ds = read_medmnist(p)
        n_train += len(split_indices(ds.labels)["train"])  # the split's own cut, not a copy of it
        colour = colour or ds.images.ndim == 4
    return DataShape(n_train, len(paths), colour)


def init_channels(spec: str) -> int:
    """The channels of the encoder a fine-tuning run starts from: its weights fix them."""
    from medret.models.encoder import checkpoint_config
    from medret.models.pretrained import encoder_path

    return int(checkpoint_config(encoder_path(spec)).channels)


def apply_auto(cfg: Any) -> tuple[Any, AutoRecipe | None]:
    """``cfg`` (a TrainConfig on ``.npz`` data or medmnist-4) with what the user left unset filled by
    :func:`auto_recipe`, and the recipe; unchanged (and ``None``) for archives and training-free methods."""
    from medret.methods import METHODS, Method
    from medret.train.config import TRAINING_FREE

    if cfg.source or cfg.method in TRAINING_FREE:
        return cfg, None
    defaults = cast("type[Method]", METHODS.get(cfg.method)).defaults
    recipe = auto_recipe(
        data_shape(cfg.data),
        batch=int(defaults["batch_size"]),
        epochs=int(defaults["epochs"]),
        lr=float(defaults["lr"]),
        benchmark=list(cfg.data) == ["medmnist-4"],
        fixed_batch=cfg.batch_size,
    )
    fill: dict[str, Any] = {}
    if cfg.batch_size is None:
        fill["batch_size"] = recipe.batch_size
        if cfg.lr is None:
            fill["lr"] = recipe.lr
    if cfg.epochs is None and cfg.samples_per_epoch is None:
        fill["epochs"] = recipe.epochs
        fill["samples_per_epoch"] = recipe.samples_per_epoch
    if cfg.channels is None and cfg.input_size is None and cfg.recipe is None:
        fill["channels"] = recipe.channels if not cfg.init else init_channels(cfg.init)
    return cfg.model_copy(update=fill), recipe
