"""The indexing job's configuration: where from, where to, with what, routed how, on what resources."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from medret.config import DicomWebConfig, Frozen, IndexConfig, S3Config
from medret.preprocess.wsi.tiling import TilingConfig

__all__ = ["DEFAULT_ROUTE", "IndexJobConfig", "Resources", "Route", "TilingConfig", "default_routes"]

#: the keys of ``encoders`` and ``tables`` that stand for every kind no other key names
DEFAULT_ROUTE = ("default", "*")
_TABLE = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$"


class Route(Frozen):
    """Objects whose key matches ``pattern`` (a glob over the key below the source) are read as ``kind``.

    ``kind`` is any kind of :mod:`medret.kinds` a route may name (``medret kinds`` lists them), e.g.
    ``dicom-series``: the matching files of one folder are one object, read together as the
    volume(s) of their series (MRI/CT stored a slice per file); see :mod:`medret.pipelines.sources`.
    """

    pattern: str = Field(min_length=1)
    kind: str

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        from medret import kinds

        if v not in kinds.names():
            raise ValueError(f"unknown kind {v!r}; known: {', '.join(kinds.names())}")
        return v


def default_routes() -> tuple[Route, ...]:
    """The routes every job ends with: each registered kind's own key patterns."""
    from medret import kinds

    return tuple(Route(pattern=p, kind=k) for p, k in kinds.default_routes())


class Resources(Frozen):
    """What each stage asks Ray for. Fractions keep a 2-core machine from deadlocking."""

    read_cpus: float = Field(default=0.5, gt=0, description="CPUs per read/decode/preprocess task")
    read_batch: int = Field(default=32, ge=1, description="objects per read task (small objects are batched)")
    read_memory_mb: int = Field(
        default=256,
        ge=1,
        description="memory each read task reserves; the differing resource request also keeps Ray Data "
        "from fusing reading into the encoder actors",
    )
    encode_cpus: float = Field(default=0.5, ge=0, description="CPUs per encoder actor")
    encode_gpus: float = Field(default=0.0, ge=0, description="GPUs per encoder actor (0: CPU encoding)")
    encode_actors: tuple[int, int] = Field(default=(1, 2), description="min and max encoder actors")
    encode_batch: int = Field(default=256, ge=1, description="images per encoder call")
    encode_threads: int = Field(default=1, ge=1, description="torch threads inside each encoder actor")

    @field_validator("encode_actors", mode="before")
    @classmethod
    def _one_or_two(cls, v: object) -> object:
        return (v, v) if isinstance(v, int) else v

    @field_validator("encode_actors")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1]:
            raise ValueError("must be (min, max) with 1 <= min <= max")
        return v


def _mosaic(fields: dict[str, Any]) -> Any:
    from medret.slides.mosaic import MosaicConfig

    return MosaicConfig(**fields)


def _lesions(fields: dict[str, Any]) -> Any:
    from medret.sketch.grid import LesionGridConfig

    return LesionGridConfig.from_dict(fields)


#: the job config's sections that are the fields of a dataclass of their own
_SECTIONS = {"mosaic": _mosaic, "lesions": _lesions}


class IndexJobConfig(Frozen):
    """``medret index`` / ``jobs/backfill.py`` / ``jobs/incremental.py``."""

    @field_validator("mosaic", "lesions")
    @classmethod
    def _dataclass_fields(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """``mosaic`` and ``lesions`` hold the fields of a dataclass of their own: checked here, named."""
        from medret.errors import ConfigError

        try:
            _SECTIONS[str(info.field_name)](v)
        except TypeError as err:
            raise ValueError(f"unknown {info.field_name} field: {err}") from None
        except (ConfigError, ValueError) as err:
            raise ValueError(str(err)) from None
        return v

    def mosaic_config(self) -> Any:
        """The slide mosaic as :class:`medret.slides.mosaic.MosaicConfig`."""
        return _mosaic(self.mosaic)

    def lesion_config(self) -> Any:
        """What lesion masks become, as :class:`medret.sketch.grid.LesionGridConfig`."""
        return _lesions(self.lesions)

    source: str = Field(
        description="s3://bucket/prefix, a local folder, or a DICOMweb server: dicomweb+https://host/prefix[?filters]"
    )
    index: IndexConfig = IndexConfig()
    s3: S3Config = S3Config()
    dicomweb: DicomWebConfig = DicomWebConfig()
    encoder: str = Field(default="default", description="'default' (shipped), an encoder.npz or a training folder")
    encoders: dict[str, str] = Field(
        default_factory=dict,
        description="kind -> encoder (as `encoder`), e.g. {wsi: histology.npz, dicom: xray.npz}; 'default' or '*' "
        "for every other kind (else `encoder`). Each encoder writes a table of its own (see `tables`)",
    )
    tables: dict[str, str] = Field(
        default_factory=dict,
        description="kind (or 'default') -> the table its encoder writes, when `encoders` routes kinds; else "
        "index.table for the default encoder, <index.table>-<preset or encoder name>-<bits>b for the others",
    )
    incremental: bool = Field(default=False, description="also remove items of objects deleted from the source")
    force: bool = Field(default=False, description="re-index objects the manifest already holds at the same etag")
    only: list[str] = Field(default_factory=list, description="index just these object URIs (quarantine retry)")
    routes: list[Route] = Field(default_factory=list, description="checked before the built-in routes")
    recipes: dict[str, str] = Field(
        default_factory=dict,
        description="kind -> preprocessing recipe (default: each kind's own, e.g. dicom xray, nifti mri-brain, "
        "wsi wsi-tiles; raster and npz the encoder's)",
    )
    tiling: TilingConfig = TilingConfig()
    mosaic: dict[str, Any] = Field(
        default_factory=dict,
        description="how each slide's bag of tiles for slide search is chosen (medret.slides.mosaic.MosaicConfig "
        "fields: clusters, fraction, min_per_cluster, max_per_slide, by, seed); empty: the defaults",
    )
    lesions: dict[str, Any] = Field(
        default_factory=dict,
        description="what a brain volume's lesion mask (a *_seg/*_mask file beside it, or the sidecar's mask_path) "
        "becomes for sketch search (medret.sketch.grid.LesionGridConfig fields: labels [[value, name], ...], "
        "level_mm, grid, coverage, min_coverage, margin_mm); empty: the defaults, any non-zero voxel is 'lesion'",
    )
    resources: Resources = Resources()
    on_error: Literal["quarantine", "skip", "fail"] = Field(
        default="quarantine",
        description="bad objects: record in the manifest and go on / log and go on (retried next run) / stop the job",
    )
    pixel_budget: int = Field(
        default=400_000_000,
        ge=1,
        description="most pixels (voxels) an object may declare; larger ones, and compressed streams that "
        "inflate past it, are quarantined before decoding",
    )
    storage_retry_s: float = Field(
        default=120.0,
        ge=0,
        description="how long a store may stay unreachable (connection refused, timeouts, 5xx, throttling) before "
        "the job stops, losing nothing; such faults never quarantine an object",
    )
    max_quarantine_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="stop instead of quarantining when more than this share of a run's objects are unreadable",
    )
    quarantine_check_min: int = Field(
        default=100, ge=1, description="... judged once this many objects of the run are decided (indexed or bad)"
    )
    max_delete_share: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="an incremental run that would remove more than this share of the source's indexed objects "
        "stops instead, changing nothing (a folder not mounted, a wrong prefix or filter); 1 allows any",
    )
    commit_rows: int = Field(default=20_000, ge=1, description="commit once this many finished items are buffered")
    commit_seconds: float = Field(default=30.0, gt=0, description="... or once this long has passed")
    compact: bool = Field(
        default=True, description="after a run that wrote, merge the small fragments the encoder actors wrote"
    )
    compact_every: int = Field(
        default=50, ge=1, description="... and every this many commits during the run (keeps the table manifest small)"
    )
    max_objects: int | None = Field(default=None, ge=1, description="stop after this many objects (smoke runs)")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="serve Prometheus metrics while running")
    out: str = Field(default="medret-out", description="local folder for the summary, metrics and resolved config")
    progress: bool = True

    @field_validator("encoders", "tables")
    @classmethod
    def _kind_keys(cls, v: dict[str, str]) -> dict[str, str]:
        from medret import kinds

        known = [k.name for k in kinds.indexed()]
        bad = [k for k in v if k not in known and k not in DEFAULT_ROUTE]
        if bad:
            raise ValueError(f"unknown kind {bad[0]!r}; keys are kinds with items ({', '.join(known)}) or 'default'")
        if all(k in v for k in DEFAULT_ROUTE):
            raise ValueError("give 'default' or '*', not both")
        return v

    @field_validator("tables")
    @classmethod
    def _table_names(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for kind, name in v.items():
            if not re.match(_TABLE, name) or name.endswith(("__manifest", "__slides")):
                raise ValueError(f"{kind}: {name!r} is not a table name (letters, digits, '_' and '-', at most 64)")
        return v

    @property
    def routed(self) -> bool:
        """Whether kinds go to encoders (and tables) of their own, instead of one encoder for everything."""
        return bool(self.encoders or self.tables)

    def all_routes(self) -> list[Route]:
        return [*self.routes, *default_routes()]
