"""Backfill: index everything under a source into a code table (resumes where a killed run stopped).

    python jobs/backfill.py --config job.yaml [dotted.key=value ...]
    ray job submit --working-dir . -- python jobs/backfill.py --config job.yaml source=s3://bucket/prefix

Thin entrypoint over medret.pipelines.backfill (the same pipeline as `medret index`). On a
cluster it attaches to the cluster Ray gives it (RAY_ADDRESS); alone it starts a local one.
Prints the JSON summary last; exits non-zero if the job failed.
"""

from __future__ import annotations

from medret.pipelines.backfill import job_main

if __name__ == "__main__":
    job_main(__doc__ or "", incremental=False)
