"""The Ray Serve application: one deployment whose ingress is :func:`medret.serve.app.create_app`.

``medret serve`` runs it locally; ``deploy/serve.yaml`` names :func:`app_builder` for
``serve run`` / ``serve deploy`` and KubeRay's RayService.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from medret.config import format_validation_error
from medret.errors import ConfigError
from medret.serve.config import ServiceConfig
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
        from medret.serve.service import Service

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


def start(cfg: object, *, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Start Serve on the local (or ``RAY_ADDRESS``) Ray and deploy the query app; returns its URL.

    A non-loopback ``host`` needs a token (or ``allow_anonymous``). The token and S3 keys
    reach the replicas through a private file, never through their init arguments.
    """
    from medret.runtime import ensure_ray
    from medret.serve.secrets import is_loopback, write_secrets_file

    assert isinstance(cfg, ServiceConfig)
    cfg = resolve(cfg)
    if not is_loopback(host):
        require_auth(cfg, f"on {host}:{port}")
    cfg, secrets = write_secrets_file(cfg)
    if secrets is not None:
        _SECRET_FILES.append(secrets)
    ensure_ray(log_to_driver=False)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": cfg.request_timeout_s})
    serve.run(build(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}/"


#: secret files written for this process's replicas, removed by :func:`stop`
_SECRET_FILES: list[object] = []


def stop() -> None:
    """Shut Serve down and remove the secret files :func:`start` wrote."""
    from pathlib import Path

    serve.shutdown()
    while _SECRET_FILES:
        Path(str(_SECRET_FILES.pop())).unlink(missing_ok=True)
