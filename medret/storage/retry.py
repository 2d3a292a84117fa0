"""Ride out a store that is down for a while: retry infrastructure faults within one time budget.

The client's own retries (boto3's standard mode, Lance's object store) cover a blip of a
second or two. :class:`RetryingStore` covers an outage: a call that fails with
:class:`~medret.errors.StorageUnavailableError` is tried again with backoff until the store
has been failing for ``budget_s`` seconds, counted from the first failure any call in this
process saw (so a thousand reads of a dead store give up together, not a thousand budgets
one after another), and the first success clears it. Only infrastructure faults are
retried; a missing or undecodable object fails at once.

>>> import tempfile
>>> store = RetryingStore(open_store(tempfile.mkdtemp()), budget_s=1)
>>> _ = store.write_bytes("k", b"v")
>>> store.read_bytes("k")
b'v'
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from medret.errors import StorageUnavailableError
from medret.storage.objects import ObjectInfo, ObjectStore, T, open_store

log = logging.getLogger(__name__)

#: store name -> monotonic times of the first and the latest failure of the outage under way (per process)
_DOWN_SINCE: dict[str, tuple[float, float]] = {}
_LOCK = threading.Lock()


def retry_unavailable(
    fn: Callable[[], T],
    *,
    store: str,
    budget_s: float,
    sleep: Callable[[float], None] = time.sleep,
    first_delay_s: float = 0.25,
    max_delay_s: float = 5.0,
) -> T:
    """``fn()``, retried on :class:`StorageUnavailableError` while ``store`` has been down < ``budget_s``."""
    delay = first_delay_s
    while True:
        try:
            out = fn()
        except StorageUnavailableError as err:
            now = time.monotonic()
            with _LOCK:
                since, last = _DOWN_SINCE.get(store, (now, now))
                if now - last > max(budget_s, 2 * max_delay_s):  # an old outage nobody saw end: a new one
                    since = now
                _DOWN_SINCE[store] = (since, now)
            down = now - since
            if down >= budget_s:
                raise StorageUnavailableError(
                    f"{err} (failing for {down:.0f} s, storage_retry_s={budget_s:g})"
                ) from err
            log.info("%s unavailable for %.1f s, retrying: %s", store, down, err)
            sleep(min(delay * (0.5 + random.random()), max(0.0, budget_s - down)))
            delay = min(delay * 2, max_delay_s)
            continue
        if _DOWN_SINCE:
            with _LOCK:
                _DOWN_SINCE.pop(store, None)
        return out


class RetryingStore(ObjectStore):
    """Any store, with every call retried through an outage of up to ``budget_s`` seconds."""

    def __init__(self, inner: ObjectStore, *, budget_s: float) -> None:
        self.inner, self.budget_s, self.root = inner, budget_s, inner.root
        self.default_kind = inner.default_kind

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (a few store calls that belong together, e.g. a whole download) under the budget."""
        return retry_unavailable(fn, store=self.inner.name, budget_s=self.budget_s)

    @property
    def name(self) -> str:
        return self.inner.name

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # a listing is paginated: restart it whole rather than resume half a page sequence
        return iter(self.call(lambda: list(self.inner.list(prefix))))

    def info(self, key: str) -> ObjectInfo:
        return self.call(lambda: self.inner.info(key))

    def read_bytes(self, key: str) -> bytes:
        return self.call(lambda: self.inner.read_bytes(key))

    def read_range(self, key: str, start: int, length: int) -> bytes:
        return self.call(lambda: self.inner.read_range(key, start, length))

    def open(self, key: str) -> IO[bytes]:
        return self.call(lambda: self.inner.open(key))

    def write_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self.call(lambda: self.inner.write_bytes(key, data))

    def upload(self, key: str, stream: IO[bytes]) -> ObjectInfo:
        return self.inner.upload(key, stream)  # a stream cannot be replayed

    def delete(self, key: str) -> None:
        self.call(lambda: self.inner.delete(key))

    def local_path(self, key: str) -> Path | None:
        return self.inner.local_path(key)

    def uri_of(self, key: str) -> str:
        return self.inner.uri_of(key)


__all__ = ["RetryingStore", "open_store", "retry_unavailable"]
