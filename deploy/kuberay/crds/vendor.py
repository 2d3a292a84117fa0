"""Vendor the openAPIV3Schema of KubeRay's RayJob and RayService CRDs (ray.io/v1) for tests/deploy/test_deploy.py.

    git clone https://github.com/ray-project/kuberay && git -C kuberay checkout v1.7.0
    python deploy/kuberay/crds/vendor.py kuberay v1.7.0

Only the ``v1`` schema is kept, with its ``description`` texts dropped (they are most of the
size); every type, enum, required list and Kubernetes extension stays as KubeRay ships it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
KINDS = ("rayjobs", "rayservices")


def strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description" or not isinstance(v, str)}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(checkout: str, tag: str) -> None:
    commit = subprocess.run(
        ["git", "-C", checkout, "rev-parse", f"{tag}^{{commit}}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    for kind in KINDS:
        path = f"ray-operator/config/crd/bases/ray.io_{kind}.yaml"
        text = subprocess.run(
            ["git", "-C", checkout, "show", f"{tag}:{path}"], capture_output=True, text=True, check=True
        ).stdout
        crd = yaml.safe_load(text)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out = {
            "source": f"https://github.com/ray-project/kuberay/blob/{tag}/{path}",
            "kuberay": tag,
            "commit": commit,
            "kind": crd["spec"]["names"]["kind"],
            "openAPIV3Schema": strip(v1["schema"]["openAPIV3Schema"]),
        }
        (HERE / f"{kind}.json").write_text(json.dumps(out, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
