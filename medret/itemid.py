"""The item-id grammar: ``<object URI>#key=value&key=value``, one owner for building and parsing it.

An item id is the URI of the object it came from, plus a suffix naming the item inside
it when the object holds more than one: ``#frame=3`` (a multi-frame DICOM), ``#level=40``
(a brain MRI slice), ``#x=1024&y=2048`` (a slide tile), ``#split=test&i=7`` (an image of a
MedMNIST set), ``#series=1.2.3&level=40`` (a slice of one series of a DICOM folder).

>>> suffix(x=1024, y=2048)
'#x=1024&y=2048'
>>> parse("#series=1.2.3&level=40")
{'series': '1.2.3', 'level': '40'}
>>> nest("#level=40", series="1.2.3")
'#series=1.2.3&level=40'
>>> parse(""), suffix()
({}, '')
"""

from __future__ import annotations

from typing import Any


def suffix(**parts: Any) -> str:
    """``#k=v&k=v`` in the order given ('' without parts); values must not hold ``&``, ``=`` or ``#``."""
    for k, v in parts.items():
        if any(c in str(v) for c in "&=#"):
            raise ValueError(f"item-id part {k}={v!r} holds a reserved character")
    return "#" + "&".join(f"{k}={v}" for k, v in parts.items()) if parts else ""


def parse(text: str) -> dict[str, str]:
    """The parts of a suffix (``{}`` for none); anything not starting with ``#`` has none."""
    if not text.startswith("#") or len(text) == 1:
        return {}
    out = {}
    for part in text[1:].split("&"):
        k, _, v = part.partition("=")
        out[k] = v
    return out


def nest(inner: str, **outer: Any) -> str:
    """``outer`` parts put before an item's own suffix (a series UID before a slice level)."""
    return suffix(**outer, **parse(inner))


def split(item_id: str, source_uri: str) -> str:
    """The suffix of ``item_id`` below ``source_uri`` (what the job appended)."""
    return item_id[len(source_uri) :] if item_id.startswith(source_uri) else ""
