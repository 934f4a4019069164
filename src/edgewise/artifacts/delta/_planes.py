"""Bit-pattern transforms and byte planes, shared by the encoder and the decoder.

Invariant: `unapply(transform, old, apply(transform, old, new)) == new` for every transform,
element size and pair of equal-length inputs, bit for bit (NaNs, infinities, signed zeros and
any byte pattern included): the transforms work on integers, never on float values.
"""

from __future__ import annotations

import numpy as np

from ._format import T_FSUB, T_NONE, T_SUB, T_XOR

__all__ = ["apply_transform", "group_order", "join_planes", "split_planes",
           "unapply_transform"]

_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _ints(data: bytes | np.ndarray, elem: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.dtype(_INT[elem]).newbyteorder("<"))


def _order(x: np.ndarray, elem: int) -> np.ndarray:
    # For sign-magnitude floats read as two's-complement integers: flip the magnitude bits of
    # negatives, so that integer order is float order and nearby floats are nearby integers
    # across zero too. It is its own inverse.
    bits = elem * 8
    mask = np.array((1 << (bits - 1)) - 1, dtype=x.dtype)
    return x ^ ((x >> (bits - 1)) & mask)


def _zigzag(d: np.ndarray, elem: int) -> np.ndarray:
    bits = elem * 8
    return ((d << 1) ^ (d >> (bits - 1))).view(_UINT[elem])


def _unzigzag(z: np.ndarray, elem: int) -> np.ndarray:
    u = z.view(_UINT[elem])
    return ((u >> 1).view(_INT[elem])) ^ (-(u & 1).view(_INT[elem]))


def apply_transform(transform: int, old: bytes | None, new: bytes, elem: int) -> np.ndarray:
    """The residual of `new` given `old`, as a uint8 array of len(new) (len % elem == 0)."""
    if transform == T_NONE:
        return np.frombuffer(new, dtype=np.uint8)
    assert old is not None and len(old) == len(new)
    n = _ints(new, elem)
    o = _ints(old, elem)
    with np.errstate(over="ignore"):
        if transform == T_XOR:
            r = (n ^ o).view(_UINT[elem])
        elif transform == T_SUB:
            r = _zigzag(n - o, elem)
        elif transform == T_FSUB:
            r = _zigzag(_order(n, elem) - _order(o, elem), elem)
        else:
            raise ValueError(f"unknown transform {transform}")
    return r.view(np.uint8)


def unapply_transform(transform: int, old: bytes | None, residual: np.ndarray,
                      elem: int) -> bytes:
    """Inverse of `apply_transform`: the new bytes from the old bytes and the residual."""
    if transform == T_NONE:
        return residual.tobytes()
    assert old is not None
    o = _ints(old, elem)
    r = residual.view(_UINT[elem])
    with np.errstate(over="ignore"):
        if transform == T_XOR:
            n = (o.view(_UINT[elem]) ^ r).view(_INT[elem])
        elif transform == T_SUB:
            n = o + _unzigzag(r, elem)
        elif transform == T_FSUB:
            n = _order(_order(o, elem) + _unzigzag(r, elem), elem)
        else:
            raise ValueError(f"unknown transform {transform}")
    return n.astype(np.dtype(_INT[elem]).newbyteorder("<"), copy=False).tobytes()


def split_planes(residual: np.ndarray, elem: int) -> list[bytes]:
    """Byte k of every element into plane k: exponent bytes and mantissa bytes separate."""
    if elem == 1:
        return [residual.tobytes()]
    grid = residual.reshape(-1, elem)
    return [np.ascontiguousarray(grid[:, k]).tobytes() for k in range(elem)]


def join_planes(planes: list[bytes], elem: int) -> np.ndarray:
    if elem == 1:
        return np.frombuffer(planes[0], dtype=np.uint8)
    n = len(planes[0])
    grid = np.empty((n, elem), dtype=np.uint8)
    for k, plane in enumerate(planes):
        grid[:, k] = np.frombuffer(plane, dtype=np.uint8)
    return grid.reshape(-1)


def group_order(old: bytes, elem: int) -> np.ndarray:
    """A stable permutation that sorts elements by the exponent bits of the old value.

    How many low bits of a residual are noise depends on the old value's exponent (the step
    between neighbouring floats doubles with it), so grouping elements by it makes each byte
    plane's statistics homogeneous, which zstd's per-block entropy tables can then exploit.
    The decoder knows the old bytes, so the order costs nothing to transmit.
    """
    u = _ints(old, elem).view(_UINT[elem])
    key = (u >> np.array(max(elem * 8 - 9, 0), dtype=u.dtype)) & np.array(0xFF, dtype=u.dtype)
    return np.argsort(key.astype(np.uint8), kind="stable")
