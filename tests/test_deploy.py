"""Deployment files parse against the schemas that ship inside the installed Ray."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_serve_config_validates_and_builds_the_application(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve.schema import ServeDeploySchema

    from medret.errors import ConfigError

    doc = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc)
    (app,) = schema.applications
    assert app.import_path == "medret.serve.deployment:app_builder"
    from medret.serve.deployment import QueryDeployment, app_builder

    assert [d.name for d in app.deployments] == [QueryDeployment.name]  # type: ignore[attr-defined]
    assert "token" not in app.args  # secrets never in the Serve config
    monkeypatch.delenv("MEDRET_TOKEN", raising=False)
    monkeypatch.delenv("MEDRET_TOKEN_FILE", raising=False)
    with pytest.raises(ConfigError, match="without a bearer token"):  # binds 0.0.0.0: no anonymous API
        app_builder(app.args)
    monkeypatch.setenv("MEDRET_TOKEN", "from-a-kubernetes-secret")
    built = app_builder(app.args)
    assert type(built).__name__ == "Application"
    assert "from-a-kubernetes-secret" not in str(built)


def test_serve_app_builder_names_a_bad_field() -> None:
    from medret.errors import ConfigError
    from medret.serve.deployment import app_builder

    with pytest.raises(ConfigError, match="max_upload_bytes"):
        app_builder({"index": "x", "max_upload_bytes": "lots", "allow_anonymous": True})
    with pytest.raises(ConfigError, match="colour"):
        app_builder({"colour": "blue"})


# -- cluster launcher ------------------------------------------------------------------------

IMAGE = "ghcr.io/medret/medret:0.1.0-cu128"


def load(path: str) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


def launcher_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` does with a config: merge the provider's defaults, then check Ray's JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return dict(prepared)


@pytest.mark.parametrize("name", ["aws.yaml", "local.yaml"])
def test_cluster_launcher_configs_validate_against_rays_schema(name: str) -> None:
    import jsonschema

    config = load(f"cluster/{name}")
    launcher_validate(config)
    assert config["docker"]["image"] == IMAGE
    assert any("import medret" in c for c in config["setup_commands"])
    assert any("--metrics-export-port=8080" in c for c in config["head_start_ray_commands"])
    # the check can fail: a misspelt field or a wrong type is refused by the same schema
    with pytest.raises(jsonschema.ValidationError):
        launcher_validate({**config, "max_worker": 3})
    with pytest.raises(jsonschema.ValidationError):
        launcher_validate({**config, "idle_timeout_minutes": "soon"})


def test_aws_cluster_has_cpu_readers_and_gpu_encoders() -> None:
    config = load("cluster/aws.yaml")
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    cpu, gpu = nodes["cpu_worker"], nodes["gpu_worker"]
    assert cpu["resources"]["CPU"] >= 8 and "GPU" not in cpu["resources"] and cpu["max_workers"] > cpu["min_workers"]
    assert gpu["resources"]["GPU"] == 1 and gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert config["max_workers"] >= cpu["max_workers"] + gpu["max_workers"]


# -- container and KubeRay -------------------------------------------------------------------


def test_dockerfile_is_cuda_with_the_pinned_torch_and_the_jobs() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+-cudnn-runtime-", text, re.M)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (torch_pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    assert f'"{torch_pin}" --index-url' in text  # the CUDA wheel of exactly the version medret pins
    assert IMAGE.split(":")[1].startswith(pyproject["project"]["version"])
    for path in ("medret", "jobs", "deploy/serve.yaml", "pyproject.toml"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M), path
        assert (ROOT / path).exists()
    assert "WORKDIR /home/ray/app" in text


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def check_ray_cluster(spec: dict[str, Any]) -> None:
    """What KubeRay requires of a RayCluster spec, and what medret's pods need."""
    import ray

    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for group in [head, *spec["workerGroupSpecs"]]:
        # KubeRay's rayStartParams is map[string]string: a bare number is rejected by the API server
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for c in containers(spec):
        assert c["image"] == IMAGE and c["name"] in ("ray-head", "ray-worker")
        assert c["resources"]["requests"] == c["resources"]["limits"]
        assert {"name": "metrics", "containerPort": 8080} in c["ports"]


def job_config_of(entrypoint: str) -> tuple[str, Any]:
    """The job script an entrypoint runs and its overrides, validated by the job's own config model."""
    from medret.config import load_config, parse_sets
    from medret.pipelines.config import IndexJobConfig
    from medret.train.config import TrainConfig

    python, script, *overrides = entrypoint.split()
    assert python == "python" and (ROOT / script).is_file(), script
    model = {"jobs/backfill.py": IndexJobConfig, "jobs/incremental.py": IndexJobConfig, "jobs/train.py": TrainConfig}
    return script, load_config(model[script], None, overrides=parse_sets(overrides))  # type: ignore[type-var]


def rayjob(path: str, script: str) -> tuple[dict[str, Any], Any]:
    """A RayJob manifest's spec, checked as a RayJob whose cluster KubeRay accepts and whose entrypoint
    runs ``script``, and the job config its overrides make."""
    doc = load(path)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    check_ray_cluster(spec["rayClusterSpec"])
    ran, cfg = job_config_of(spec["entrypoint"])
    assert ran == script
    return spec, cfg


def test_rayjob_backfill_runs_the_repos_backfill_with_gpu_encoders() -> None:
    spec, cfg = rayjob("deploy/kuberay/rayjob-backfill.yaml", "jobs/backfill.py")
    assert cfg.source.startswith("s3://") and cfg.index.uri.startswith("s3://")
    assert cfg.resources.encode_gpus == 1 and cfg.metrics_port == 9100
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = groups["gpu-encoders"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    assert cfg.resources.encode_actors[1] <= groups["gpu-encoders"]["maxReplicas"]  # one GPU per actor
    head_ports = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"containerPort": 9100, "name": "job-metrics"} in head_ports  # the driver runs on the head
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayjob_train_runs_the_repos_train_job_one_gpu_per_worker() -> None:
    spec, cfg = rayjob("deploy/kuberay/rayjob-train.yaml", "jobs/train.py")
    assert cfg.use_gpu and cfg.storage_path.startswith("s3://")
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == cfg.num_workers
    for c in containers(spec["rayClusterSpec"]):
        assert {"name": "MEDRET_DATA", "value": "/data"} in c["env"]  # every worker reads the training files
        assert {"name": "data", "mountPath": "/data", "readOnly": True} in c["volumeMounts"]


def test_rayservice_carries_the_serve_config_and_validates() -> None:
    from ray.serve.schema import ServeDeploySchema

    doc = load("deploy/kuberay/rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert serve_config == load("deploy/serve.yaml")  # one Serve config, two ways to run it
    ServeDeploySchema.model_validate(serve_config)
    check_ray_cluster(doc["spec"]["rayClusterConfig"])
    ports = [p["containerPort"] for c in containers(doc["spec"]["rayClusterConfig"]) for p in c["ports"]]
    assert ports.count(serve_config["http_options"]["port"]) == 2  # head and query workers serve HTTP
    for c in containers(doc["spec"]["rayClusterConfig"]):  # every node that may host a replica has the token
        token = [e for e in c["env"] if e["name"] == "MEDRET_TOKEN"]
        assert token and token[0]["valueFrom"]["secretKeyRef"]["name"] == "medret-query-token", c["name"]


def test_prometheus_scrapes_what_the_manifests_expose() -> None:
    from prometheus_client import REGISTRY

    import medret.observability  # noqa: F401  (registers medret's metrics)

    doc = load("deploy/prometheus.yml")
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert set(jobs) == {"ray", "medret-query", "medret-backfill", "ray-launcher"}
    port_names = {
        p["name"]
        for path in ("rayjob-backfill.yaml", "rayjob-train.yaml", "rayservice.yaml")
        for c in containers(
            load(f"deploy/kuberay/{path}")["spec"].get("rayClusterSpec")
            or load(f"deploy/kuberay/{path}")["spec"]["rayClusterConfig"]
        )
        for p in c["ports"]
    }
    for name in ("ray", "medret-query", "medret-backfill"):
        kept = [
            r["regex"]
            for r in jobs[name]["relabel_configs"]
            if r.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"]
        ]
        assert kept and kept[0] in port_names, (name, kept)
    # every medret metric the file names exists
    text = (ROOT / "deploy" / "prometheus.yml").read_text()
    registered = {m.name for m in REGISTRY.collect()} | {m.name + "_total" for m in REGISTRY.collect()}
    for name in set(re.findall(r"\bmedret_[a-z_]+", text)):
        assert name in registered, name
