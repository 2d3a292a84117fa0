"""The training config: which method, on which data, on how many workers, stored where."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field, field_validator, model_validator

from medret.config import Frozen, S3Config
from medret.preprocess.wsi.tiling import TilingConfig

#: methods that keep the preset's pretrained backbone frozen and fit only the hash layer, in the driver (no Ray
#: Train workers): ``frozen-itq`` without any gradient step, ``frozen-selfsup`` on cached features of augmented views
TRAINING_FREE = ("frozen-itq", "frozen-selfsup")
#: DICOM attributes ``label_tag`` may name (those the DICOM reader records; nothing identifying)
LABEL_TAGS = (
    "BodyPartExamined",
    "ViewPosition",
    "ImageLaterality",
    "Modality",
    "PhotometricInterpretation",
    "SOPClassUID",
)


class TrainConfig(Frozen):
    """``medret train --config FILE`` reads this; every field can be set with ``--set key=value``."""

    method: str = "default"
    bits: int = Field(default=48, ge=16, le=256)
    data: list[str] = Field(
        default_factory=lambda: ["medmnist-4"],
        description="'medmnist-4' or MedMNIST-layout .npz files (each file becomes an organ)",
    )
    source: str = Field(
        default="",
        description="train on an archive instead: s3://bucket/prefix or a local folder, read through the kinds "
        "and the encoder's recipe (replaces 'data')",
    )
    labels: str = Field(default="", description="labels CSV (path,label[,organ][,group]); default: sidecars in source")
    label_column: str = Field(default="label", description="the labels CSV column that holds the class")
    label_tag: str = Field(default="", description=f"take the label from a DICOM attribute: one of {LABEL_TAGS}")
    group_column: str = Field(
        default="", description="column naming the patient/study/slide (default: the first of patient_id, ... present)"
    )
    cache: str = Field(default="", description="prepared-input cache (default: storage_path/cache)")
    data_cpus: float = Field(
        default=1.0, gt=0, description="CPUs kept free for the Ray Data tasks that stream an archive to the workers"
    )
    tiling: TilingConfig = Field(default_factory=TilingConfig, description="how slides in the source are tiled")
    input_size: tuple[int, int] | None = Field(default=None, description="model input size (default: 28x28)")
    channels: int | None = Field(default=None, ge=1, le=3, description="1 grey or 3 RGB (default: 1)")
    recipe: str | None = Field(default=None, description="preprocessing recipe for images (default: medmnist)")
    preset: str = Field(default="", description="start from a modality preset: xray, histology, mri, medmnist")
    modality: str = Field(default="any", description="what the encoder is for (recorded; routes uploads)")
    augmentation: str | None = Field(default=None, description="registered augmentation (default: medmnist's)")
    mean: tuple[float, ...] | None = Field(default=None, description="input normalisation (default: 0.5 per channel)")
    std: tuple[float, ...] | None = Field(default=None, description="input normalisation (default: 0.25 per channel)")
    epochs: int | None = Field(default=None, ge=1, description="default: the method's own")
    batch_size: int | None = Field(default=None, ge=2, description="global batch; default: the method's own")
    lr: float | None = Field(default=None, gt=0)
    weight_decay: float | None = Field(default=None, ge=0)
    architecture: str | None = None
    arch: dict[str, Any] | None = None
    hyper: dict[str, Any] = Field(default_factory=dict, description="the method's loss weights and knobs")
    fine_bits: int | None = Field(
        default=None, ge=0, description="similarity bits (ITQ on features) at the end of the code; default: method's"
    )
    organ_balance: float = Field(
        default=0.5, ge=0, le=1, description="sample organs with weight n^-balance: 0 natural, 1 equal"
    )
    bit_balance: bool | None = Field(
        default=None,
        description="after training, move each hash bit's threshold from 0 to its median over training codes, "
        "so every bit splits the data in half; default: the method's (on for dnhn)",
    )
    samples_per_epoch: int | None = Field(default=None, ge=1, description="default: the training set size")
    init: str | None = Field(
        default=None,
        description="start from this encoder's weights ('default', an encoder.npz or a training folder): "
        "fine-tuning; its method, bits and architecture must be this run's",
    )
    augment: bool = True
    refit: bool = Field(
        default=False,
        description="after choosing the best epoch on val, train again from scratch on train + val for that many "
        "epochs (same schedule) and export the last: the usual protocol, +17% data (.npz data only)",
    )
    seed: int = 0
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(
        default=None, gt=0, description="default: 1 with a GPU, else what the cluster can give every worker"
    )
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    val_queries: int = Field(default=2000, ge=0, description="val images used for the per-epoch mAP@100")
    export_samples: int = Field(
        default=10_000,
        ge=1,
        description="training images sampled at each checkpoint to fit the similarity bits and the bit balance",
    )
    name: str = Field(default="", pattern=r"^[A-Za-z0-9_\-.]*$", description="run name; default from the method")
    storage_path: str = Field(default="medret-out/train", description="local folder or s3://bucket/prefix")
    output: str = Field(default="", description="local folder for encoder.npz and reports; default storage/name")
    max_failures: int = Field(default=0, ge=-1)
    max_steps: int | None = Field(default=None, ge=1, description="stop each epoch after this many steps")
    s3: S3Config = Field(default_factory=S3Config)

    @field_validator("data")
    @classmethod
    def _data_files(cls, v: list[str]) -> list[str]:
        """Absolute paths, checked here: Ray workers run in other directories (and on other nodes)."""
        if v == ["medmnist-4"]:
            return v
        if not v:
            raise ValueError("needs 'medmnist-4' or at least one .npz file")
        out = []
        for item in v:
            if item == "medmnist-4":
                raise ValueError("'medmnist-4' cannot be mixed with files")
            p = Path(item).expanduser()
            if not p.is_file():
                raise ValueError(f"{item}: no such file (give MedMNIST-layout .npz files or 'medmnist-4')")
            out.append(str(p.resolve()))
        return out

    @model_validator(mode="before")
    @classmethod
    def _from_preset(cls, data: Any) -> Any:
        """Fields a preset fixes (architecture, input, normalisation, recipe...), where the run leaves them unset."""
        if not isinstance(data, dict) or not data.get("preset"):
            return data
        from medret.errors import UnknownNameError
        from medret.models.presets import get_preset

        try:
            p = get_preset(str(data["preset"]))
        except UnknownNameError as err:
            raise ValueError(str(err)) from None
        fixed = {
            "architecture": p.architecture,
            "arch": dict(p.arch),
            "input_size": p.input_size,
            "channels": p.channels,
            "mean": p.mean,
            "std": p.std,
            "recipe": p.recipe,
            "augmentation": p.augmentation,
            "modality": p.modality,
            "method": p.method,
        }
        out = {
            **{k: v for k, v in fixed.items() if data.get(k) is None},
            **{k: v for k, v in data.items() if v is not None},
        }
        if isinstance(data.get("arch"), dict) and data.get("architecture") in (None, p.architecture):
            out["arch"] = {**p.arch, **data["arch"]}  # options on top of the preset's for its own backbone
        if "mpp" in p.recipe_args and "tiling" not in data:
            out["tiling"] = {"mpp": p.recipe_args["mpp"]}
        return out

    @field_validator("label_tag")
    @classmethod
    def _tag(cls, v: str) -> str:
        if v and v not in LABEL_TAGS:
            raise ValueError(f"must be one of {', '.join(LABEL_TAGS)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> TrainConfig:
        if self.source and self.data != ["medmnist-4"]:
            raise ValueError("give either 'source' (an archive) or 'data' (.npz files), not both")
        if not self.source and (self.labels or self.label_tag):
            raise ValueError("'labels' and 'label_tag' need a 'source' archive")
        return self

    @property
    def label_free(self) -> bool:
        """The method learns without labels (self-supervised): labels are withheld from it."""
        from medret.methods import METHODS

        if self.method in TRAINING_FREE:
            return True
        return not getattr(METHODS.get(self.method), "uses_labels", True)

    def cache_path(self) -> str:
        return self.cache or f"{self.storage_path.rstrip('/')}/cache"

    def geometry(self) -> tuple[tuple[int, int], int, str]:
        """``(input_size, channels, recipe)`` of the encoder this run trains."""
        return (self.input_size or (28, 28), self.channels or 1, self.recipe or "medmnist")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v % 8:
            raise ValueError("must be a multiple of 8")
        return v

    @model_validator(mode="after")
    def _fine_bits_fit(self) -> TrainConfig:
        if self.fine_bits is not None and self.fine_bits >= self.bits:
            raise ValueError(f"fine_bits must be smaller than bits ({self.bits}), got {self.fine_bits}")
        return self

    @model_validator(mode="after")
    def _method_known(self) -> TrainConfig:
        from medret.errors import UnknownNameError
        from medret.methods import METHODS

        if self.method in TRAINING_FREE:
            if not self.architecture:
                raise ValueError(f"method {self.method!r} needs an architecture (a backbone): give a preset")
            return self
        try:
            METHODS.get(self.method)
        except UnknownNameError as err:
            raise ValueError(f"{err}; or on a frozen backbone: {', '.join(TRAINING_FREE)}") from None
        return self

    def resolved_fine_bits(self) -> int:
        from medret.methods import METHODS, Method

        if self.fine_bits is not None:
            return self.fine_bits
        fraction = float(cast("type[Method]", METHODS.get(self.method)).defaults.get("fine_fraction", 0.0))
        return round(self.bits * fraction)

    def run_name(self) -> str:
        return self.name or f"{self.method}-{self.bits}b"

    def resolved(self, key: str, *fallback: Any) -> Any:
        """A field, or the method's default for it when unset (``fallback`` where the method has none)."""
        from medret.methods import METHODS, Method

        value = getattr(self, key)
        if value is not None:
            return value
        defaults = cast("type[Method]", METHODS.get(self.method)).defaults
        return defaults.get(key, *fallback) if fallback else defaults[key]
