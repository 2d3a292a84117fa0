"""Index the medmnist-4 gallery and evaluate retrieval on its query split.

    python jobs/medmnist_index.py [--config job.yaml] [dotted.key=value ...]

Thin entrypoint over medret.pipelines.medmnist_index, suitable for `ray job submit`.
"""

from __future__ import annotations

import json
import sys

from medret.config import job_args, load_config
from medret.errors import MedretError
from medret.pipelines.medmnist_index import MedmnistIndexConfig, run

if __name__ == "__main__":
    config, overrides = job_args(__doc__ or "")
    try:
        summary = run(load_config(MedmnistIndexConfig, config, overrides=overrides), progress=False)
    except MedretError as err:
        sys.exit(f"jobs/medmnist_index.py: {err}")
    print(json.dumps(summary, indent=1))
