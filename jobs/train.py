"""Train a hashing encoder with Ray Train (the same run as `medret train`), resumable by name.

    python jobs/train.py --config train.yaml [dotted.key=value ...]
    ray job submit --working-dir . -- python jobs/train.py method=default bits=48 epochs=30 \
        num_workers=4 use_gpu=true storage_path=s3://bucket/train name=default-48b

Fields are those of medret.train.config.TrainConfig. On a cluster it attaches to the cluster
Ray gives it (RAY_ADDRESS); alone it starts a local one. Prints the JSON summary last (the
encoder.npz path, best epoch, per-epoch history); exits non-zero if training failed.
"""

from __future__ import annotations

import json
import sys

from medret.config import job_args, load_config
from medret.errors import MedretError
from medret.train.config import TrainConfig
from medret.train.trainer import fit

if __name__ == "__main__":
    config, overrides = job_args(__doc__ or "")
    try:
        report = fit(load_config(TrainConfig, config, overrides=overrides))
    except MedretError as err:  # a bad config value or input: the message says which; no traceback
        sys.exit(f"jobs/train.py: {err}")
    print(json.dumps({**report.summary(), "history": report.history}, indent=1))
