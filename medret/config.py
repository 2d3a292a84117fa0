"""Typed configuration: defaults < YAML file < ``MEDRET_*`` env vars < CLI flags.

Every config is a frozen pydantic model validated on construction. Nested fields
are addressed with dots on the command line (``index.uri``) and with double
underscores in the environment (``MEDRET_INDEX__URI``). The resolved config is
written beside a job's outputs with :func:`save_resolved`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from medret.errors import ConfigError


def data_root() -> Path:
    """``$MEDRET_DATA`` or ``../shared/data`` beside the repository (or the working directory)."""
    env = os.environ.get("MEDRET_DATA")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return Path.cwd().parent / "shared" / "data"


ENV_PREFIX = "MEDRET_"
M = TypeVar("M", bound=BaseModel)


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class S3Config(Frozen):
    """How to reach S3 or an S3-compatible server.

    Credentials left empty come from the standard AWS chain (env vars, shared
    files, instance roles); ``AWS_ENDPOINT_URL`` is honoured as well.
    """

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = Field(default=None, repr=False)
    max_attempts: int = Field(
        default=8, ge=1, le=20, description="total tries per request (backoff on throttling and 5xx)"
    )
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    addressing_style: Literal["auto", "path", "virtual"] = "auto"

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_is_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v

    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


class DicomWebConfig(Frozen):
    """How to reach a DICOMweb server (a PACS) given as ``dicomweb+http(s)://host/prefix``.

    Credentials come from the environment (``MEDRET_DICOMWEB_USER`` / ``MEDRET_DICOMWEB_PASSWORD``
    for HTTP basic auth, ``MEDRET_DICOMWEB_TOKEN`` for a bearer token) or from these fields; the
    secrets are never written out with the config, nor put in a URI, a log line or the manifest.
    """

    user: str | None = None
    password: SecretStr | None = Field(default=None, exclude=True, description="or MEDRET_DICOMWEB_PASSWORD")
    token: SecretStr | None = Field(default=None, exclude=True, description="or MEDRET_DICOMWEB_TOKEN")
    verify_tls: bool = Field(default=True, description="check the server's certificate (https)")
    ca_bundle: str | None = Field(default=None, description="CA certificates to check it against (a PEM file)")
    timeout_s: float = Field(default=60.0, gt=0, description="connect and read timeout per request")
    page_size: int = Field(default=500, ge=1, le=10000, description="QIDO-RS results per page (limit)")
    skip_non_images: bool = Field(
        default=True, description="leave SR, presentation states, RT plans/structures, documents out of the listing"
    )
    max_instance_bytes: int = Field(default=2 << 30, ge=1 << 20, description="largest instance retrieved (WADO-RS)")


class IndexConfig(Frozen):
    """Where a code table lives: a local folder or an ``s3://bucket/prefix`` URI."""

    uri: str = "medret-out/index"
    table: str = Field(default="codes", pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")

    @field_validator("uri")
    @classmethod
    def _a_store_that_holds_tables(cls, v: str) -> str:
        if v.lower().startswith("dicomweb"):
            raise ValueError("a DICOMweb server is a source, not a place for code tables; use a folder or s3://")
        return v


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        got = e.get("input")
        lines.append(f"  {loc}: {e['msg']} (got {got!r})")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def env_overrides(model: type[BaseModel], env: Mapping[str, str]) -> dict[str, Any]:
    """``MEDRET_INDEX__URI=x`` -> ``{"index": {"uri": "x"}}`` for fields ``model`` has."""
    out: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        dotted = key[len(ENV_PREFIX) :].lower().replace("__", ".")
        if _has_field(model, dotted.split(".")):
            _set_dotted(out, dotted, value)
    return out


def _has_field(model: type[BaseModel], parts: list[str]) -> bool:
    field = model.model_fields.get(parts[0])
    if field is None:
        return False
    if len(parts) == 1:
        return True
    sub = field.annotation
    return isinstance(sub, type) and issubclass(sub, BaseModel) and _has_field(sub, parts[1:])


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    model: type[M],
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> M:
    """Build ``model`` from a YAML file, ``MEDRET_*`` env vars and dotted CLI overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(loaded).__name__}")
        data = loaded
        source = str(p)
    data = _merge(data, env_overrides(model, os.environ if env is None else env))
    cli: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(cli, dotted, value)
    data = _merge(data, cli)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from err


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a.b": 1, "c": ["x", "y"]}`` (values are YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"overrides are dotted.key=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def job_args(doc: str, argv: Sequence[str] | None = None) -> tuple[str | None, dict[str, Any]]:
    """The command line every ``jobs/*.py`` takes: ``[--config FILE] [dotted.key=value ...]``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file with the job's config fields")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value (YAML values), e.g. index.uri=s3://b/index")
    args = ap.parse_args(argv)
    try:
        return args.config, parse_sets(args.overrides)
    except ConfigError as err:
        ap.error(str(err))
        raise  # unreachable: ap.error exits


def save_resolved(config: BaseModel, directory: str | os.PathLike[str]) -> Path:
    """Write the resolved config as ``config.resolved.yaml`` in ``directory`` (local path)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "config.resolved.yaml"
    target.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return target
