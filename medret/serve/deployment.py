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

APP_NAME = "medret"


@serve.deployment(name="medret-query", ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class QueryDeployment:
    """A replica: the engine (tables, encoder, snapshot of the codes) plus the HTTP app."""

    def __init__(self, config_json: str) -> None:
        from medret.serve.app import Service

        self.service = Service(ServiceConfig.model_validate_json(config_json))
        self.service.engine.warm()

    def __serve_build_asgi_app__(self) -> Any:
        from medret.serve.app import create_app

        return create_app(self.service)


def build(cfg: ServiceConfig) -> Any:
    """The bound application for ``serve.run``."""
    return QueryDeployment.options(  # type: ignore[attr-defined]
        num_replicas=cfg.replicas, max_ongoing_requests=cfg.max_ongoing_requests
    ).bind(cfg.model_dump_json())


def app_builder(args: dict[str, Any]) -> Any:
    """``import_path: medret.serve.deployment:app_builder``; ``args`` are :class:`ServiceConfig` fields."""
    from pydantic import ValidationError

    try:
        cfg = ServiceConfig.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "serve application args")) from err
    return build(cfg)
