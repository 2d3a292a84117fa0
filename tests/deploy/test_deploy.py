"""Deployment files work when applied, not only when parsed.

They validate against the schemas an operator's tools use (Ray's launcher schema and Serve
schema from the installed Ray, KubeRay's CRD schemas vendored in ``deploy/kuberay/crds/``), and
against the facts they depend on: the base image's users and paths, the commands KubeRay runs in
the pods, what idle GPU pods and dead fields cost, what the autoscaler's IAM role must allow.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


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


GPU_OPTIONS = re.compile(r"--gpus\b|--runtime[ =]nvidia|--device[ =]nvidia")


@pytest.mark.parametrize("name", ["aws.yaml", "local.yaml"])
def test_gpu_options_are_per_node_type_never_shared(name: str) -> None:
    """``--gpus all`` in the shared run options makes ``docker run`` fail on every CPU-only node."""
    config = load(f"cluster/{name}")
    docker = config["docker"]
    for key in ("run_options", "head_run_options", "worker_run_options"):
        assert not [o for o in docker.get(key, []) if GPU_OPTIONS.search(o)], (key, docker[key])
    # GPUs reach containers through the NVIDIA runtime Ray's docker runner detects on GPU hosts
    assert not docker.get("disable_automatic_runtime_detection")
    for node_type, node in launcher_validate(config)["available_node_types"].items():
        options = node.get("docker", {}).get("worker_run_options", [])
        if any(GPU_OPTIONS.search(o) for o in options):
            assert node.get("resources", {}).get("GPU"), f"{node_type} asks Docker for GPUs it does not have"


def effective(config: dict[str, Any], node_type: str, key: str) -> list[str]:
    """A node type's own list replaces the global one (ray/autoscaler/_private/autoscaler.py)."""
    node = config["available_node_types"][node_type]
    return list(node[key] if key in node else config.get(key, []))


def test_aws_nodes_fail_fast_on_an_ami_without_docker_or_nvidia() -> None:
    config = load("cluster/aws.yaml")
    for node_type, node in config["available_node_types"].items():
        commands = " ".join(effective(config, node_type, "initialization_commands"))
        assert "command -v docker" in commands, node_type
        if node["resources"].get("GPU"):
            # what Ray's docker runner checks before it adds --runtime=nvidia (command_runner.py)
            assert "nvidia-smi" in commands and "docker info" in commands, node_type
            assert "nvidia-container-runtime" in commands, node_type
    assert "Deep Learning Base OSS Nvidia Driver GPU AMI" in (ROOT / "cluster" / "aws.yaml").read_text()


#: each EC2 call in Ray's AWS node provider (what the head's autoscaler does) and the IAM action it needs
RAY_EC2_CALLS = {
    "describe_instance_types": "ec2:DescribeInstanceTypes",
    "instances.filter": "ec2:DescribeInstances",
    "create_tags": "ec2:CreateTags",
    "create_instances": "ec2:RunInstances",
    "start_instances": "ec2:StartInstances",
    "stop_instances": "ec2:StopInstances",
    "terminate_instances": "ec2:TerminateInstances",
    "node.terminate": "ec2:TerminateInstances",
    "node.stop": "ec2:StopInstances",
    "describe_images": "ec2:DescribeImages",
}


def ray_ec2_calls() -> set[str]:
    import ray.autoscaler._private.aws.node_provider as provider

    text = Path(provider.__file__).read_text()
    calls = set(re.findall(r"\.(describe_\w+|create_\w+|start_instances|stop_instances|terminate_instances)\(", text))
    calls |= {"instances.filter"} if ".instances.filter(" in text else set()
    calls |= {f"node.{m}" for m in re.findall(r"\bnode\.(terminate|stop)\(", text)}
    return calls


def allowed(policy: dict[str, Any]) -> dict[str, set[str]]:
    """IAM action -> the resources the policy allows it on."""
    out: dict[str, set[str]] = {}
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        for a in actions:
            out.setdefault(a, set()).update(resources)
    return out


def test_the_heads_role_lets_the_autoscaler_run_the_workers() -> None:
    config = load("cluster/aws.yaml")
    nodes = config["available_node_types"]
    profile = {t: n["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1] for t, n in nodes.items()}
    head = allowed(json.loads((ROOT / "cluster" / "iam" / f"{profile[config['head_node_type']]}.json").read_text()))
    calls = ray_ec2_calls()
    unknown = calls - set(RAY_EC2_CALLS)
    assert not unknown, f"Ray's AWS node provider makes EC2 calls this test does not map to IAM actions: {unknown}"
    for call in calls:
        assert RAY_EC2_CALLS[call] in head, f"the head's role cannot {RAY_EC2_CALLS[call]} (Ray calls {call})"
    account = re.search(r"arn:aws:iam::(\d+):", nodes["cpu_worker"]["node_config"]["IamInstanceProfile"]["Arn"])
    assert account
    for node_type, name in profile.items():
        policy = allowed(json.loads((ROOT / "cluster" / "iam" / f"{name}.json").read_text()))
        assert {"s3:GetObject", "s3:ListBucket", "s3:PutObject"} <= set(policy), node_type
        if node_type != config["head_node_type"]:  # it is launched by the head with its own role
            assert f"arn:aws:iam::{account.group(1)}:role/{name}" in head["iam:PassRole"], node_type
            assert not any(a.startswith(("ec2:Run", "ec2:Terminate", "iam:")) for a in policy), node_type


# -- Prometheus -----------------------------------------------------------------------------------


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    """``promtool check config --lint=all``; Debian's promtool lacks Kubernetes discovery, so the
    Kubernetes jobs are then checked with static targets in place of discovery, and the rest as is."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool (apt-get install prometheus; .ci/run installs it)")
    path = ROOT / "deploy" / "prometheus.yml"
    r = subprocess.run([promtool, "check", "config", "--lint=all", str(path)], capture_output=True, text=True)
    if r.returncode == 0:
        return
    out = r.stdout + r.stderr
    assert "field kubernetes_sd_configs not found" in out, out  # anything else is a real error
    assert "kubernetes_sd_configs" in (ROOT / "deploy" / "README.md").read_text()  # the docs say which promtool
    doc = load("deploy/prometheus.yml")
    for job in doc["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["127.0.0.1:8080"]}]
    copy_path = tmp_path / "prometheus.yml"
    copy_path.write_text(yaml.safe_dump(doc))
    r = subprocess.run([promtool, "check", "config", "--lint=all", str(copy_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# -- container and KubeRay -------------------------------------------------------------------


class Image:
    """What deploy/Dockerfile makes of its base image (deploy/base-image.json): users, files, PATH.

    A model of the instructions the Dockerfile uses, run over the base image's recorded facts,
    for machines with no container builder; ``test_the_image_builds`` builds it for real where
    one is available.
    """

    def __init__(self, text: str, facts: dict[str, Any]) -> None:
        self.text, self.facts = text, facts
        self.base = re.search(r"^FROM (\S+)", text, re.M).group(1)  # type: ignore[union-attr]
        self.users, self.groups = dict(facts["users"]), dict(facts["groups"])
        self.files = set(facts["executables"])
        self.env_path = facts["env_path"]
        self.workdir = self.user = self.venv = ""
        self.copies: list[tuple[str, str]] = []
        self.links: dict[str, str] = {}  # symlink -> target
        self.wrappers: dict[str, str] = {}  # shell script -> what it execs
        self.owners: dict[str, str] = {}  # folders made in the image -> user
        for kind, arg in re.findall(r"^(RUN|ENV|USER|WORKDIR|COPY)\s+((?:.*\\\n)*.*)$", text, re.M):
            arg = arg.replace("\\\n", " ")
            getattr(self, "_" + kind.lower())(arg)

    def _run(self, arg: str) -> None:
        lex = shlex.shlex(arg, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lex:
            if token in ("&&", ";", "||", "|"):
                commands.append([])
            else:
                commands[-1].append(token)
        loop: list[str] = []
        for words in commands:
            if not words:
                continue
            if words[0] == "for":  # for c in a b c; do ln -s SRC/$c DST/$c; done
                loop = words[words.index("in") + 1 :]
                continue
            if words[0] == "do":
                words = words[1:]
            if ">" in words:  # printf '#!/bin/sh\nexec TARGET "$@"\n' > PATH
                dst = words[words.index(">") + 1]
                m = re.search(r"exec (\S+)", " ".join(words[: words.index(">")]))
                if m:
                    self.wrappers[dst] = m.group(1)
                continue
            if words[0] == "apt-get" and "install" in words:
                for pkg in (w for w in words[words.index("install") + 1 :] if not w.startswith("-")):
                    self.files |= set(self.facts["apt_provides"][pkg])  # KeyError: record the package's facts
            elif words[0] == "userdel":
                name = words[-1]
                assert name in self.users, f"userdel {name}: no such user in {self.base}"
                del self.users[name]
                self.groups.pop(name, None)  # its user private group goes with it
            elif words[0] == "groupadd":
                gid, name = int(words[words.index("--gid") + 1]), words[-1]
                assert gid not in self.groups.values(), f"groupadd: GID {gid} is not unique in {self.base}"
                self.groups[name] = gid
            elif words[0] == "useradd":
                uid, name = int(words[words.index("--uid") + 1]), words[-1]
                assert uid not in self.users.values(), f"useradd: UID {uid} is not unique in {self.base}"
                assert name not in self.users, f"useradd: user {name} exists in {self.base}"
                if "--gid" in words:
                    assert int(words[words.index("--gid") + 1]) in self.groups.values()
                self.users[name] = uid
            elif words[:3] == ["python3", "-m", "venv"]:
                assert "/usr/bin/python3" in self.files, "python3 -m venv with no python3"
                self.venv = words[3]
                self.files |= {f"{self.venv}/bin/python", f"{self.venv}/bin/python3", f"{self.venv}/bin/pip"}
            elif words[:2] == ["pip", "install"] and "." in words:
                owner = self.owners.get(self.workdir, "root")  # WORKDIR makes a missing folder as root
                assert owner == self.user, f"pip install . writes into {self.workdir}, owned by {owner}, as {self.user}"
                self.files |= {f"{self.venv}/bin/{c}" for c in ("ray", "serve", "medret")}
            elif words[:2] == ["ln", "-s"]:
                src, dst = words[2:4]
                self.links.update({dst.replace("$c", n): src.replace("$c", n) for n in loop or [""]})
            elif words[:2] == ["mkdir", "-p"]:
                self.owners.update({d: "root" for d in words[2:]})
            elif words[:2] == ["chown", "-R"]:
                self.owners.update({d: words[2].split(":")[0] for d in words[3:]})

    def _env(self, arg: str) -> None:
        m = re.search(r"(?<![A-Z_])PATH=(\S+)", arg)
        if m:
            self.env_path = m.group(1).replace("$PATH", self.env_path)

    def _user(self, arg: str) -> None:
        assert arg in self.users, f"USER {arg}: no such user"
        self.user = arg

    def _workdir(self, arg: str) -> None:
        self.workdir = arg

    def _copy(self, arg: str) -> None:
        *src, dst = [w for w in arg.split() if not w.startswith("--")]
        self.copies += [(s, dst) for s in src]

    def copied(self, path: str) -> bool:
        """Whether the repository's ``path`` is in the image at ``workdir/path``."""
        for src, dst in self.copies:
            inside = path == src or path.startswith(src + "/")
            if inside and (dst.rstrip("/") == f"./{src}" or (dst in (".", "./") and "/" not in src)):
                return True
        return False

    def which(self, command: str, path: str) -> str | None:
        """What ``command`` runs on ``path``, through the links and wrappers made in the image.

        A symlink to a venv's interpreter runs the base interpreter: Python looks for
        ``pyvenv.cfg`` beside the path it was started by, so the venv's packages are not seen.
        """
        for d in path.split(":"):
            f = f"{d}/{command}"
            if f in self.wrappers:
                return self.wrappers[f] if self.wrappers[f] in self.files else None
            if f in self.links:
                target = self.links[f]
                if target.startswith(f"{self.venv}/bin/python") and target in self.files:
                    return "/usr/bin/python3"
                f = target
            if f in self.files:
                return f
        return None


def dockerfile() -> Image:
    return Image(
        (ROOT / "deploy" / "Dockerfile").read_text(), json.loads((ROOT / "deploy" / "base-image.json").read_text())
    )


def test_dockerfile_is_cuda_with_the_pinned_torch_and_the_jobs() -> None:
    image = dockerfile()
    assert re.match(r"nvidia/cuda:\S+-cudnn-runtime-", image.base) and image.base == image.facts["image"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (torch_pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    assert f'"{torch_pin}" --index-url' in image.text  # the CUDA wheel of exactly the version medret pins
    assert IMAGE.split(":")[1].startswith(pyproject["project"]["version"])
    for path in ("medret", "jobs/backfill.py", "jobs/train.py", "deploy/serve.yaml", "pyproject.toml"):
        assert image.copied(path) and (ROOT / path).exists(), path
    assert image.workdir == "/home/ray/app"


def test_the_image_has_the_user_and_commands_kuberay_expects() -> None:
    """The base image's facts, through the Dockerfile's steps: the user is creatable, commands resolve."""
    image = dockerfile()  # a UID or GID clash fails here, as `useradd` would in the build
    assert image.user == "ray" and image.users["ray"] == 1000  # as in Ray's own images (GID 100, users)
    # KubeRay's submitter wait loop runs `python -c ...`; pods run `ray start`; jobs run medret's CLI.
    # Each must resolve on the image's PATH and on a PATH that does not inherit it (login shells, sshd).
    for command in ("python", "ray", "serve", "medret"):
        for path in (image.env_path, image.facts["reset_path"]):
            assert image.which(command, path) == f"{image.venv}/bin/{command}", (command, path)
    assert image.which("python", image.facts["reset_path"].replace("/usr/local/bin", "/nowhere")) is None  # can fail
    assert image.which("wget", image.env_path)  # KubeRay's readiness probes


def test_the_image_model_catches_the_clash_the_real_build_hit() -> None:
    facts = json.loads((ROOT / "deploy" / "base-image.json").read_text())
    old = (
        "FROM "
        + facts["image"]
        + "\nRUN apt-get install -y python3 && useradd --create-home --uid 1000 --shell /bin/bash ray\n"
    )
    with pytest.raises(AssertionError, match="UID 1000 is not unique"):
        Image(old, facts)


def test_the_image_builds() -> None:
    """Built for real where a container builder with a daemon is available (needs the registry)."""
    builder = next((b for b in ("docker", "podman", "buildah") if shutil.which(b)), None)
    if builder is None:
        pytest.skip("no docker, podman or buildah on this machine: the image model above stands in")
    info = subprocess.run([builder, "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"{builder} is installed but cannot build here ({info.stderr.strip()[:120]})")
    tag = "medret-test:" + IMAGE.split(":")[1]
    cmd = [builder, "build", "-f", "deploy/Dockerfile", "-t", tag, "."] if builder != "buildah" else None
    cmd = cmd or ["buildah", "bud", "-f", "deploy/Dockerfile", "-t", tag, "."]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    reset = json.loads((ROOT / "deploy" / "base-image.json").read_text())["reset_path"]
    check = f"id -u ray && env -i PATH={reset} python -c 'import medret' && env -i PATH={reset} ray --version"
    run = [builder, "run", "--rm", tag, "bash", "-lc", check]
    r = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "1000", r.stderr[-2000:]


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

    python, script, *overrides = shlex.split(entrypoint)  # KubeRay runs it through a shell
    image = dockerfile()
    # absolute paths: a RayJob's driver runs in no particular working directory
    assert python == f"{image.venv}/bin/python", python
    assert script.startswith(image.workdir + "/"), script
    script = script[len(image.workdir) + 1 :]
    assert (ROOT / script).is_file() and image.copied(script), script
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
    # no word a shell would glob or split (zsh refuses an unmatched [1,8]; bash may match a file)
    assert all("[" not in w or w.startswith("'") for w in spec["entrypoint"].split()), spec["entrypoint"]
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


# -- KubeRay: the CRD schemas, and what the schemas do not say ---------------------------------------

CRDS = ROOT / "deploy" / "kuberay" / "crds"
#: the KubeRay release whose CRDs are vendored, and that deploy/README.md names
KUBERAY = "v1.7.0"
MANIFESTS = {"rayjob-backfill.yaml": "rayjobs", "rayjob-train.yaml": "rayjobs", "rayservice.yaml": "rayservices"}


def strict_schema(node: Any) -> Any:
    """A CRD's openAPIV3Schema as JSON Schema, as strict as ``kubectl apply`` (server-side field
    validation, strict by default since Kubernetes 1.27): an unknown field is an error, where a
    structural schema would otherwise prune it silently."""
    if isinstance(node, list):
        return [strict_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd(name: str) -> tuple[dict[str, Any], Any]:
    import jsonschema

    doc = json.loads((CRDS / f"{name}.json").read_text())
    assert doc["kuberay"] == KUBERAY and doc["source"].startswith("https://github.com/ray-project/kuberay/")
    return doc, jsonschema.Draft7Validator(strict_schema(doc["openAPIV3Schema"]))


def schema_errors(validator: Any, manifest: Any) -> list[str]:
    return sorted(
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(manifest)
    )


@pytest.mark.parametrize("path", sorted(MANIFESTS))
def test_manifests_validate_against_the_kuberay_crds(path: str) -> None:
    doc, validator = crd(MANIFESTS[path])
    manifest = load(f"deploy/kuberay/{path}")
    assert manifest["kind"] == doc["kind"]
    assert schema_errors(validator, manifest) == []
    # the check can fail: a misspelt field anywhere (here deep in a pod template) and a wrong type
    bad = copy.deepcopy(manifest)
    cluster = bad["spec"].get("rayClusterSpec") or bad["spec"]["rayClusterConfig"]
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    cluster["workerGroupSpecs"][0]["replicas"] = "two"
    errors = schema_errors(validator, bad)
    assert any("imagePullPolicyy" in e for e in errors) and any("'two' is not of type 'integer'" in e for e in errors)


#: fields KubeRay's CRDs still accept but its controller ignores (dead) or will drop (deprecated):
#: the schema check cannot see either
DEPRECATED = {
    "RayService": {
        ("spec", "serviceUnhealthySecondThreshold"): "dead: ignored since KubeRay 1.1 (ray-project/kuberay#1685)",
        ("spec", "deploymentUnhealthySecondThreshold"): "dead: ignored since KubeRay 1.1 (ray-project/kuberay#1685)",
    },
    "RayJob": {
        ("spec", "deletionStrategy", "onSuccess"): "deprecated in KubeRay 1.5 for deletionRules, to be removed",
        ("spec", "deletionStrategy", "onFailure"): "deprecated in KubeRay 1.5 for deletionRules, to be removed",
    },
}


def _has(node: Any, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


@pytest.mark.parametrize("path", sorted(MANIFESTS))
def test_no_field_the_operator_ignores(path: str) -> None:
    manifest = load(f"deploy/kuberay/{path}")
    doc, _ = crd(MANIFESTS[path])
    for field, why in DEPRECATED[manifest["kind"]].items():
        assert not _has(manifest, field), f"{'.'.join(field)}: {why}"
        schema = doc["openAPIV3Schema"]  # still in KubeRay's schema: else this entry is stale, drop it
        for key in field:
            schema = schema["properties"][key]


#: longest a finished job's cluster may idle before KubeRay deletes it (its GPU nodes bill meanwhile)
MAX_TTL_S = 300


@pytest.mark.parametrize("path", ["rayjob-backfill.yaml", "rayjob-train.yaml"])
def test_rayjobs_free_their_nodes_and_say_how_to_rerun(path: str) -> None:
    import ray

    text = (ROOT / "deploy" / "kuberay" / path).read_text()
    spec = yaml.safe_load(text)["spec"]
    name = yaml.safe_load(text)["metadata"]["name"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] <= MAX_TTL_S
    # `kubectl apply` of a finished RayJob changes nothing: the header must say delete, then apply
    assert f"kubectl delete rayjob {name} --ignore-not-found && kubectl apply -f deploy/kuberay/{path}" in text
    # the submitter only runs `ray job submit`: a small Ray image of the cluster's version, not the CUDA one
    pod = spec["submitterPodTemplate"]["spec"]
    (submitter,) = pod["containers"]
    assert pod["restartPolicy"] == "Never"
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-cpu", submitter["image"])
    assert submitter["image"] != IMAGE and submitter["resources"]["limits"]["memory"]


def test_rayservice_upgrades_times_out_and_can_reach_its_replica_bounds() -> None:
    doc = load("deploy/kuberay/rayservice.yaml")
    spec = doc["spec"]
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    timeout = doc["metadata"]["annotations"]["ray.io/initializing-timeout"]
    m = re.fullmatch(r"(\d+)([smh])", timeout)
    assert m and 5 * 60 <= int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)] <= 3600, timeout
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    ((query,),) = [[g for g in cluster["workerGroupSpecs"] if g["groupName"] == "query"]]
    (app,) = yaml.safe_load(spec["serveConfigV2"])["applications"]
    (deployment,) = app["deployments"]
    scaling = deployment["autoscaling_config"]
    assert deployment["num_replicas"] == "auto" and scaling["min_replicas"] >= 2  # one node may go down
    node_cpus = float(query["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    per_node = math.floor(node_cpus / deployment["ray_actor_options"]["num_cpus"])
    assert per_node >= 1
    assert query["minReplicas"] >= math.ceil(scaling["min_replicas"] / per_node)
    # as many query nodes as max_replicas needs: fewer and it is never reached, more are never used
    assert query["maxReplicas"] == math.ceil(scaling["max_replicas"] / per_node)


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
