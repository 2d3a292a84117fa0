"""Joining Ray: the cluster a job was submitted to, a running local one, or a new local one."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

#: notices printed on every start that tell a medret user nothing they can act on
_QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup",)
_QUIET_WARNINGS = (
    # lance and lancedb warn at every fork; ray.init forks only to exec Ray's own processes
    r"lance is not fork-safe",
    r"lancedb fork support is experimental",
)


@contextlib.contextmanager
def quiet_start() -> Iterator[None]:
    """Hold back Ray's token-auth notice and lance's fork notices while Ray starts (they repeat every run).

    Token authentication itself stays as Ray sets it; only its notice is held back. Anything of
    error level from these loggers still shows.
    """
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for pattern in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def ensure_ray(**init_kwargs: Any) -> None:
    """``ray.init`` once: ``RAY_ADDRESS`` (set by ``ray job submit``) if given, else auto-detect or start.

    The dashboard stays on: Ray Train's placement-group cleaner queries the state API it serves.
    """
    import ray

    if not ray.is_initialized():
        with quiet_start():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, **init_kwargs)
