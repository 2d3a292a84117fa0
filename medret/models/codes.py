"""Binary codes: binarise continuous features, pack bits to bytes, and back.

Bit ``i`` of a code is bit ``7 - i % 8`` of byte ``i // 8`` (``numpy.packbits``'s
big-endian order). Hamming distance is invariant to the packing order as long as
both sides use the same one.

>>> pack_bits(np.array([[0.3, -1.0, 2.0, -0.1, 1, 1, 1, 1]]))
array([[175]], dtype=uint8)
>>> unpack_bits(np.array([[175]], dtype=np.uint8), 8)
array([[1, 0, 1, 0, 1, 1, 1, 1]], dtype=uint8)
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from medret.errors import SchemaError


def code_bytes(bits: int) -> int:
    if bits <= 0 or bits % 8:
        raise SchemaError(f"bits must be a positive multiple of 8, got {bits}")
    return bits // 8


def pack_bits(features: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """Sign-binarise ``features`` (n, bits) (``> 0`` -> 1) and pack to (n, bits/8) uint8."""
    f = np.asarray(features)
    if f.ndim != 2:
        raise SchemaError(f"features must be 2-D (n, bits), got shape {f.shape}")
    code_bytes(f.shape[1])
    return np.packbits(f > 0, axis=1)


def unpack_bits(codes: npt.NDArray[np.uint8], bits: int) -> npt.NDArray[np.uint8]:
    return np.unpackbits(as_codes(codes, bits), axis=1, count=bits)


def as_codes(codes: npt.ArrayLike, bits: int) -> npt.NDArray[np.uint8]:
    """Validate packed codes: uint8, shape (n, bits/8); a single code (bits/8,) becomes (1, bits/8)."""
    c = np.asarray(codes)
    if c.ndim == 1:
        c = c[None, :]
    nbytes = code_bytes(bits)
    if c.dtype != np.uint8 or c.ndim != 2 or c.shape[1] != nbytes:
        raise SchemaError(f"codes must be uint8 of shape (n, {nbytes}) for {bits} bits, got {c.dtype} {c.shape}")
    return np.ascontiguousarray(c)


def to_words(codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """(n, nbytes) uint8 -> (n, ceil(nbytes/8)) uint64, zero-padded (padding adds no distance)."""
    n, nbytes = codes.shape
    w = -(-nbytes // 8)
    if nbytes == w * 8:
        return np.ascontiguousarray(codes).view(np.uint64).reshape(n, w)
    padded = np.zeros((n, w * 8), dtype=np.uint8)
    padded[:, :nbytes] = codes
    return padded.view(np.uint64).reshape(n, w)


def hamming_matrix(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    """All pairwise Hamming distances (small inputs: tests and references)."""
    x = np.bitwise_xor(a[:, None, :], b[None, :, :])
    return np.bitwise_count(x).sum(axis=2, dtype=np.int64)
