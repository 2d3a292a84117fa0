"""Deployment files parse against the schemas that ship inside the installed Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_serve_config_validates_and_builds_the_application() -> None:
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc)
    (app,) = schema.applications
    assert app.import_path == "medret.serve.deployment:app_builder"
    from medret.serve.deployment import QueryDeployment, app_builder

    assert [d.name for d in app.deployments] == [QueryDeployment.name]  # type: ignore[attr-defined]
    built = app_builder(app.args)
    assert type(built).__name__ == "Application"


def test_serve_app_builder_names_a_bad_field() -> None:
    from medret.errors import ConfigError
    from medret.serve.deployment import app_builder

    with pytest.raises(ConfigError, match="max_upload_bytes"):
        app_builder({"index": "x", "max_upload_bytes": "lots"})
    with pytest.raises(ConfigError, match="colour"):
        app_builder({"colour": "blue"})
