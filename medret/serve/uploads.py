"""Query preparation: an uploaded file -> the image the table's encoder takes, through the kind registry.

The kind (:mod:`medret.kinds`) is chosen from the asked-for query mode, the file name and
its first bytes; it decodes and preprocesses the upload with the recipe the indexing job
recorded for that kind (:func:`medret.serve.tables.read_context`), so a query takes the
same path as the items it is compared with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medret import kinds
from medret.errors import MedretError, UploadTooLarge
from medret.kinds import ReadContext


@dataclass
class Query:
    """One uploaded image, preprocessed for a table's encoder."""

    image: npt.NDArray[np.float32]  # (H, W) grey, or (H, W, 3) for a colour encoder
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: "prepare" (decode + preprocess)


def upload_name(filename: str | None) -> str:
    """The upload's base name, at most 200 characters, as errors and answers name it.

    >>> upload_name("../../etc/x.png"), upload_name(""), upload_name(None)
    ('x.png', 'upload', 'upload')
    """
    return Path(filename or "upload").name[:200] or "upload"


def kind_of(data: bytes, filename: str, *, max_bytes: int, kind: str = kinds.AUTO_QUERY) -> kinds.Kind:
    """The kind that reads this upload (asked for as ``kind``), from its name and first bytes; the size checked."""
    name = upload_name(filename)
    if len(data) > max_bytes:
        raise UploadTooLarge(f"{name}: {len(data)} bytes is over the upload limit of {max_bytes}")
    return kinds.for_upload(kind, name, data[: kinds.HEAD_BYTES])


def prepare(
    ctx: ReadContext,
    data: bytes,
    filename: str,
    *,
    max_bytes: int,
    kind: str = kinds.AUTO_QUERY,
    slice: int | None = None,
    mpp: float | None = None,
) -> Query:
    """Decode an upload and preprocess it exactly as the indexing job preprocessed its kind."""
    name = upload_name(filename)
    if len(data) > max_bytes:
        raise UploadTooLarge(f"{name}: {len(data)} bytes is over the upload limit of {max_bytes}")
    t0 = time.perf_counter()
    chosen = kinds.for_upload(kind, name, data[: kinds.HEAD_BYTES])
    image, meta = chosen.upload(ctx, data, name, choice=slice, mpp=mpp)
    t1 = time.perf_counter()
    mode = chosen.query_mode or kind
    return Query(image, mode, meta, {"prepare": t1 - t0})  # decode + preprocess, one step of the kind


def is_heavy(data: bytes, filename: str, kind: str) -> bool:
    """Whether preparing this upload is expensive (a volume: registration to the template)."""
    try:
        return kinds.for_upload(kind, filename or "upload", data[: kinds.HEAD_BYTES]).heavy
    except MedretError:
        return False  # prepare() will refuse it, cheaply
