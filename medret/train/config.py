"""The training config: which method, on which data, on how many workers, stored where."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field, field_validator, model_validator

from medret.config import Frozen, S3Config


class TrainConfig(Frozen):
    """``medret train --config FILE`` reads this; every field can be set with ``--set key=value``."""

    method: str = "default"
    bits: int = Field(default=48, ge=16, le=256)
    data: list[str] = Field(
        default_factory=lambda: ["medmnist-4"],
        description="'medmnist-4' or MedMNIST-layout .npz files (each file becomes an organ)",
    )
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
    seed: int = 0
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(
        default=None, gt=0, description="default: 1 with a GPU, else what the cluster can give every worker"
    )
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    val_queries: int = Field(default=2000, ge=0, description="val images used for the per-epoch mAP@100")
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

        try:
            METHODS.get(self.method)
        except UnknownNameError as err:
            raise ValueError(str(err)) from None
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
