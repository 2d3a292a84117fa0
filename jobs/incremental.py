"""Incremental: index what is new or changed since the last run and drop what was deleted.

    python jobs/incremental.py --config job.yaml [dotted.key=value ...]
    ray job submit --working-dir . -- python jobs/incremental.py --config job.yaml source=s3://bucket/prefix

Thin entrypoint over medret.pipelines.backfill (the same pipeline as `medret index`). On a
cluster it attaches to the cluster Ray gives it (RAY_ADDRESS); alone it starts a local one.
Prints the JSON summary last; exits non-zero if the job failed.
"""

from __future__ import annotations

import argparse
import json

import yaml

from medret.config import load_config
from medret.pipelines.backfill import run_index
from medret.pipelines.config import IndexJobConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value (YAML values), e.g. index.uri=s3://b/index")
    args = ap.parse_args()
    overrides = {"incremental": True}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"overrides are dotted.key=value, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    summary = run_index(load_config(IndexJobConfig, args.config, overrides=overrides))
    print(json.dumps(summary.to_dict(), indent=1))


if __name__ == "__main__":
    main()
