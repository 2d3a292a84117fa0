"""Summaries of decoded pixels that several kinds' :meth:`~medret.kinds.base.Kind.describe` share."""

from __future__ import annotations

from typing import Any

from medret.io.base import Decoded
from medret.kinds.base import stats


def decoded_summary(d: Decoded) -> dict[str, Any]:
    """What ``medret inspect`` shows of a decoded 2-D image."""
    return {
        "reader": d.reader,
        **stats(d.pixels),
        "frames": d.frames,
        "spacing_mm": list(d.spacing) if d.spacing else None,
        "photometric": d.display.photometric,
        "bits_stored": d.display.bits_stored,
        "window": {"center": list(d.display.window_center), "width": list(d.display.window_width)}
        if d.display.window_center
        else None,
        "voi_lut": d.display.voi_lut is not None,
        "meta": d.meta,
    }
