"""Joining Ray: the cluster a job was submitted to, a running local one, or a new local one."""

from __future__ import annotations

import os
from typing import Any


def ensure_ray(**init_kwargs: Any) -> None:
    """``ray.init`` once: ``RAY_ADDRESS`` (set by ``ray job submit``) if given, else auto-detect or start.

    The dashboard stays on: Ray Train's placement-group cleaner queries the state API it serves.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, **init_kwargs)
