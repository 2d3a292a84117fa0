from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medret.config import IndexConfig, S3Config, load_config, save_resolved
from medret.errors import ConfigError, UnknownNameError
from medret.pipelines.medmnist_index import MedmnistIndexConfig
from medret.registry import Registry


def test_precedence_defaults_yaml_env_cli(tmp_path: Path) -> None:
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump({"bits": 32, "k": 5, "index": {"uri": "from-yaml"}}))
    env = {"MEDRET_K": "7", "MEDRET_INDEX__TABLE": "fromenv", "MEDRET_UNRELATED": "x", "HOME": "/root"}
    cfg = load_config(MedmnistIndexConfig, cfg_file, overrides={"bits": 64, "s3.region": "eu-west-1"}, env=env)
    assert cfg.bits == 64  # CLI beats YAML
    assert cfg.k == 7  # env beats YAML
    assert cfg.index.uri == "from-yaml" and cfg.index.table == "fromenv"
    assert cfg.s3.region == "eu-west-1"
    assert cfg.sample_queries == 4  # default


def test_partial_section_keeps_section_defaults() -> None:
    cfg = load_config(MedmnistIndexConfig, overrides={"index.uri": "/tmp/x"}, env={})
    assert cfg.index.table == "medmnist4"


@pytest.mark.parametrize(
    ("overrides", "field", "value"),
    [
        ({"bits": 50}, "bits", "50"),
        ({"k": 0}, "k", "0"),
        ({"index.table": "bad name!"}, "index.table", "bad name!"),
        ({"s3.endpoint_url": "localhost:9000"}, "s3.endpoint_url", "localhost:9000"),
        ({"s3.max_attempts": 99}, "s3.max_attempts", "99"),
        ({"colour": "red"}, "colour", "red"),
    ],
)
def test_invalid_values_name_field_value_and_rule(overrides: dict[str, object], field: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(MedmnistIndexConfig, overrides=overrides, env={})
    msg = str(err.value)
    assert field in msg and value in msg
    assert isinstance(err.value, ValueError)


def test_env_values_are_validated_too() -> None:
    with pytest.raises(ConfigError, match="bits"):
        load_config(MedmnistIndexConfig, env={"MEDRET_BITS": "many"})


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(IndexConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("index: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(IndexConfig, bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(IndexConfig, bad)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(MedmnistIndexConfig, overrides={"bits": 16}, env={})
    path = save_resolved(cfg, tmp_path / "out")
    again = load_config(MedmnistIndexConfig, path, env={})
    assert again == cfg


def test_secrets_not_in_repr() -> None:
    assert "hunter2" not in repr(S3Config(access_key_id="a", secret_access_key="hunter2"))


def test_registry_lists_known_names() -> None:
    reg: Registry[int] = Registry("reader")
    reg.register("dicom")(lambda: 1)
    with pytest.raises(UnknownNameError, match="unknown reader 'nifti'; known: dicom"):
        reg.get("nifti")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("dicom")(lambda: 2)
    assert list(reg) == ["dicom"] and "dicom" in reg
