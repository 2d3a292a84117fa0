"""Secrets of the query service (the bearer token, S3 keys): from the environment or files, never
from arguments.

A Serve deployment's init arguments are stored by the controller, shown in the dashboard and
in ``serve status``; a command line is shown by ``ps``. So secrets travel only as:

- ``MEDRET_TOKEN`` in the replicas' environment (RayService: the pod spec's ``env`` from a
  Kubernetes Secret), or ``MEDRET_TOKEN_FILE`` / ``token_file`` naming a mounted secret file;
- for ``medret serve`` on one machine, a private file (mode 0600) that it writes and names in
  ``secrets_file``, since replicas of an already running Ray do not see its environment.

:func:`resolve` fills them in where the replica starts; :func:`without_secrets` is what may be
serialised.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from medret.errors import ConfigError
from medret.serve.config import ServiceConfig

TOKEN_ENV = "MEDRET_TOKEN"
TOKEN_FILE_ENV = "MEDRET_TOKEN_FILE"


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        raise ConfigError(f"{what} {path!r} cannot be read: {err.strerror or err}") from err


def resolve(cfg: ServiceConfig, env: dict[str, str] | None = None) -> ServiceConfig:
    """``cfg`` with its token and S3 keys filled in from the secret files and the environment.

    The token is the first found of: the config's ``token``, its ``secrets_file``, its
    ``token_file``, then ``MEDRET_TOKEN``, then ``MEDRET_TOKEN_FILE``.
    """
    env = dict(os.environ if env is None else env)
    update: dict[str, Any] = {}
    secrets: dict[str, Any] = {}
    if cfg.secrets_file:
        try:
            secrets = json.loads(_read(cfg.secrets_file, "secrets_file") or "{}")
        except ValueError as err:
            raise ConfigError(f"secrets_file {cfg.secrets_file!r} is not JSON") from err
    # the config's own names first: an inherited MEDRET_TOKEN never overrides a file the config names
    token = cfg.token or secrets.get("token")
    if not token and cfg.token_file:
        token = _read(cfg.token_file, "token_file")
    if not token:
        token = env.get(TOKEN_ENV)
    if not token and env.get(TOKEN_FILE_ENV):
        token = _read(env[TOKEN_FILE_ENV], TOKEN_FILE_ENV)
    if token:
        update["token"] = token
    s3 = {k: v for k, v in secrets.get("s3", {}).items() if v and not getattr(cfg.s3, k)}
    if s3:
        update["s3"] = cfg.s3.model_copy(update=s3)
    return cfg.model_copy(update=update) if update else cfg


def has_token(cfg: ServiceConfig, env: dict[str, str] | None = None) -> bool:
    return bool(resolve(cfg, env).token)


def without_secrets(cfg: ServiceConfig) -> str:
    """The config as JSON for a deployment's init arguments: no token, no S3 keys."""
    data = cfg.model_dump(mode="json")  # the token field is never dumped
    data["s3"] = {k: v for k, v in data["s3"].items() if k not in ("access_key_id", "secret_access_key")}
    return json.dumps(data)


def write_secrets_file(cfg: ServiceConfig) -> tuple[ServiceConfig, Path | None]:
    """Put the token and S3 keys of ``cfg`` in a new 0600 file; the config names the file instead."""
    s3 = {k: getattr(cfg.s3, k) for k in ("access_key_id", "secret_access_key") if getattr(cfg.s3, k)}
    if not cfg.token and not s3:
        return cfg, None
    fd, path = tempfile.mkstemp(prefix="medret-serve-", suffix=".json")  # created 0600
    with os.fdopen(fd, "w") as f:
        json.dump({"token": cfg.token, "s3": s3}, f)
    return cfg.model_copy(update={"secrets_file": path}), Path(path)


def is_loopback(host: str) -> bool:
    """``127.0.0.1``, ``::1``, ``localhost``: reachable from this machine only.

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_auth(cfg: ServiceConfig, where: str, env: dict[str, str] | None = None) -> None:
    """Refuse an anonymous service reachable from other machines unless ``allow_anonymous`` says so."""
    if cfg.allow_anonymous or has_token(cfg, env):
        return
    raise ConfigError(
        f"refusing to serve {where} without a bearer token: set {TOKEN_ENV} (or {TOKEN_FILE_ENV} / token_file, "
        "e.g. a mounted Kubernetes secret), or set allow_anonymous: true to serve the API and thumbnails to anyone "
        "who can reach it"
    )
