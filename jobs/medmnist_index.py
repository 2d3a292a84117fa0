"""Index the medmnist-4 gallery and evaluate retrieval (the demo's main job).

    python jobs/medmnist_index.py [--config job.yaml] [dotted.key=value ...]

Thin entrypoint over medret.pipelines.medmnist_index, suitable for `ray job submit`.
"""

from __future__ import annotations

import argparse
import json

import yaml

from medret.config import load_config
from medret.pipelines.medmnist_index import MedmnistIndexConfig, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value (YAML values)")
    args = ap.parse_args()
    overrides = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    summary = run(load_config(MedmnistIndexConfig, args.config, overrides=overrides))
    print(json.dumps({"index": summary["index"], "micro": summary["metrics"]["micro"]}, indent=2))


if __name__ == "__main__":
    main()
