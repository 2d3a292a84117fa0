"""The Ray Serve application: one deployment whose ingress is :func:`medret.serve.app.create_app`.

``medret serve`` runs it locally; ``deploy/serve.yaml`` names :func:`app_builder` for
``serve run`` / ``serve deploy`` and KubeRay's RayService.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from medret.config import format_validation_error
from medret.errors import ConfigError
from medret.serve.engine import ServiceConfig
from medret.serve.secrets import TOKEN_ENV, TOKEN_FILE_ENV, require_auth, resolve, without_secrets

APP_NAME = "medret"


@serve.deployment(name="medret-query", ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class QueryDeployment:
    """A replica: the engine (tables, encoder, snapshot of the codes) plus the HTTP app.

    Its secrets (token, S3 keys) come from its environment or the secret files, never from
    the init arguments (:mod:`medret.serve.secrets`).
    """

    def __init__(self, config_json: str) -> None:
        from medret.serve.app import Service

        self.service = Service(replica_config(config_json))
        self.service.engine.warm()

    def __serve_build_asgi_app__(self) -> Any:
        from medret.serve.app import create_app

        return create_app(self.service)


def replica_config(config_json: str) -> ServiceConfig:
    """A replica's config: its init arguments with the secrets it finds where it runs."""
    cfg = resolve(ServiceConfig.model_validate_json(config_json))
    if cfg.auth_required and not cfg.token:
        raise ConfigError(
            "this replica finds no bearer token though the application was built with one: set "
            f"{TOKEN_ENV} (or {TOKEN_FILE_ENV} / token_file) in every replica's environment; refusing to "
            "serve without auth"
        )
    return cfg


def build(cfg: ServiceConfig) -> Any:
    """The bound application for ``serve.run``: the config without its secrets.

    A token seen here makes it required in every replica: a replica that cannot resolve it
    (an environment variable missing on one node) fails to start rather than serve anonymously.
    """
    if resolve(cfg).token:
        cfg = cfg.model_copy(update={"auth_required": True})
    return QueryDeployment.options(  # type: ignore[attr-defined]
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
    ).bind(without_secrets(cfg))


def app_builder(args: dict[str, Any]) -> Any:
    """``import_path: medret.serve.deployment:app_builder``; ``args`` are :class:`ServiceConfig` fields.

    This is the path of ``serve run`` / ``serve deploy`` and KubeRay's RayService, which bind
    all interfaces: without a token in the environment (``MEDRET_TOKEN``, ``MEDRET_TOKEN_FILE``)
    or ``token_file`` it refuses to build unless ``allow_anonymous: true``.
    """
    from pydantic import ValidationError

    args = dict(args or {})
    if "token" in args:
        raise ConfigError(
            "serve application args must not hold the token (they are stored and shown by Serve); "
            f"set {TOKEN_ENV} in the replicas' environment or token_file"
        )
    given, pacs = args.get("s3"), args.get("dicomweb")
    s3: dict[str, Any] = given if isinstance(given, dict) else {}
    dicomweb: dict[str, Any] = pacs if isinstance(pacs, dict) else {}
    keys = sorted(k for k in ("access_key_id", "secret_access_key") if s3.get(k))
    keys += sorted(f"dicomweb.{k}" for k in ("password", "token") if dicomweb.get(k))
    if keys:
        raise ConfigError(
            f"serve application args must not hold secrets ({', '.join(keys)}): they are stored and shown by "
            "Serve; give the replicas AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and MEDRET_DICOMWEB_PASSWORD / "
            "MEDRET_DICOMWEB_TOKEN in their environment"
        )
    try:
        cfg = ServiceConfig.model_validate(args)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "serve application args")) from err
    require_auth(cfg, "a Serve application")
    return build(cfg)
