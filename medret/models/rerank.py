"""Compact continuous features kept beside each code, for re-ranking a Hamming shortlist.

A well-trained 48-bit encoder puts many items of a class on the same code, so a page of results is
often a run of equal distances. Its continuous features still tell those items apart. Each row keeps
a compact copy of them: the encoder's features times a fixed random Gaussian projection to
:data:`DIMS` values (seeded by the feature width alone, so the indexing job and the query service
project alike with nothing stored), L2-normalised and rounded to int8 (x127). That is 64 bytes a row.
Cosine similarity between two such rows is their integer dot product over 127^2.

A random projection keeps cosines within a few percent at this width (Johnson-Lindenstrauss), and
int8 adds about 1/127 per value; ``docs/results.md`` measures what the compact copy keeps of the full
features' re-ranking gain.

>>> f = np.array([[3.0, 4.0, 0.0], [3.0, 4.0, 0.0], [-3.0, -4.0, 0.0]], np.float32)
>>> c = compact(f)
>>> c.shape, c.dtype
((3, 64), dtype('int8'))
>>> s = similarity(c[0], c)
>>> bool(s[0] == s[1] and s[1] > 0 > s[2])
True
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

DIMS = 64
SCALE = 127
SPEC = {"dims": DIMS, "projection": "gaussian, numpy default_rng(width)", "quantisation": "l2-normalised, int8 x127"}


@lru_cache(maxsize=16)
def projection(width: int) -> npt.NDArray[np.float32]:
    """The fixed (width, DIMS) projection for features ``width`` wide."""
    if width < 1:
        raise ValueError(f"feature width must be positive, got {width}")
    rng = np.random.default_rng(width)
    return (rng.standard_normal((width, DIMS)) / np.sqrt(DIMS)).astype(np.float32)


def compact(features: npt.NDArray[Any]) -> npt.NDArray[np.int8]:
    """Features (n, width) -> compact int8 rows (n, DIMS); an all-zero row stays zero."""
    f = np.asarray(features, np.float32)
    if f.ndim != 2:
        raise ValueError(f"features must be (n, width), got shape {f.shape}")
    p = f @ projection(f.shape[1])
    norm = np.linalg.norm(p, axis=1, keepdims=True)
    p = p / np.maximum(norm, 1e-12)
    return np.clip(np.rint(p * SCALE), -SCALE, SCALE).astype(np.int8)


def similarity(query: npt.NDArray[np.int8], rows: npt.NDArray[np.int8]) -> npt.NDArray[np.int32]:
    """Dot products of one compact query (DIMS,) with compact rows (n, DIMS): cosine x 127^2."""
    return rows.astype(np.int32) @ np.asarray(query, np.int32)


def codes_and_features(encoder: Any, images: npt.NDArray[Any]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int8]]:
    """Packed codes and compact features of ``images``: one model pass where the encoder offers both."""
    both = getattr(encoder, "encode_with_features", None)
    if both is not None:
        codes, features = both(images)
    else:
        codes, features = encoder.encode(images), encoder.forward_features(images)
    return codes, compact(features)


def rerank_order(
    positions: npt.NDArray[np.int64],
    distances: npt.NDArray[np.int32],
    similarities: npt.NDArray[np.int32],
) -> npt.NDArray[np.int64]:
    """The order of a shortlist re-ranked: most similar first; equal similarity by distance, then position.

    >>> rerank_order(np.array([5, 2, 9]), np.array([0, 1, 1]), np.array([10, 30, 30]))
    array([1, 2, 0])
    """
    return np.lexsort((positions, distances, -similarities.astype(np.int64)))
