"""Residuals of floats coded by bit length: an entropy-coded length symbol plus raw low bits.

After a dense fine-tune every weight moves by about the same amount, so the residual between
the old and new bit patterns (`_planes` T_FSUB: a difference in units of the old value's last
place) is a number whose *length* in bits is predictable: the step between neighbouring floats
doubles with the old value's exponent, so length + exponent is about constant across a tensor.
The bits below the leading one are noise and are stored as they are.

For each element, with z the (zigzag) residual, L = bit_length(z) and e the exponent field of
the old value:

    symbol = 0                                 if z == 0
             2 + 2 * (L + e - lo) + top        otherwise; top = the bit below the leading one
                                               (0 when L == 1), lo = min(L + e) over the piece
    raw    = the L - 2 bits below `top`        (when L >= 3)

Symbols are rANS-coded (`_rans`) with one static table per piece; raw bits are grouped by
their count k (k = 1..bits-2, in that order), each group stored as k // 8 whole byte planes
(low byte first) then its k % 8 remaining bits packed MSB-first.

Invariant: `decode_bits(encode_bits(z, old, ...), old, ...) == z` bit for bit, for any residual
and old bit patterns (NaNs and infinities included: nothing here reads a float value).
"""

from __future__ import annotations

import numpy as np

from .._errors import DeltaFormatError
from ._format import BodyReader, put_varint
from ._rans import SCALE_BITS, choose_lanes, quantize_freqs, rans_decode, rans_encode

__all__ = ["BitsCode", "decode_bits", "encode_bits", "exponents"]

_UINT = {2: np.uint16, 4: np.uint32}
_MAX_SYMBOL = 255


def exponents(old: bytes, elem: int, mantissa: int) -> np.ndarray:
    """The exponent field of each old element (as int32)."""
    u = np.frombuffer(old, dtype=np.dtype(_UINT[elem]).newbyteorder("<"))
    return ((u >> mantissa) & ((1 << (elem * 8 - 1 - mantissa)) - 1)).astype(np.int32)


def _bit_length(z: np.ndarray) -> np.ndarray:
    # float64 holds every uint32 exactly and frexp's exponent is the bit length (0 for 0).
    return np.frexp(z.astype(np.float64))[1].astype(np.int64)


class BitsCode:
    """The coded form of one piece: `lo`, the frequency table, lanes and the two streams."""

    def __init__(self, lo: int, freqs: np.ndarray, lanes: int, symbols: bytes, raw: bytes
                 ) -> None:
        self.lo, self.freqs, self.lanes = lo, freqs, lanes
        self.symbols, self.raw = symbols, raw

    def pack(self, rec: bytearray) -> None:
        put_varint(rec, self.lo)
        put_varint(rec, len(self.freqs))
        for f in self.freqs:
            put_varint(rec, int(f))
        put_varint(rec, self.lanes)
        put_varint(rec, len(self.symbols))
        rec += self.symbols
        put_varint(rec, len(self.raw))
        rec += self.raw

    @classmethod
    def read(cls, body: BodyReader, count: int, elem: int, mantissa: int) -> BitsCode:
        """The fields `pack` wrote, for `count` elements, each checked against what an encoder
        can write (DeltaFormatError otherwise), so that no record is large or slow to decode."""
        lo = body.varint()
        if lo > elem * 8 + (1 << (elem * 8 - 1 - mantissa)):
            raise DeltaFormatError(f"bit-length record offset {lo} is out of range")
        n_freqs = body.varint()
        if n_freqs > 256:
            raise DeltaFormatError("bit-length record has too many symbols")
        freqs = []
        for _ in range(n_freqs):
            freqs.append(body.varint())
            if freqs[-1] > 1 << SCALE_BITS:
                raise DeltaFormatError("bit-length record has a frequency out of range")
        lanes = body.varint()
        if lanes != choose_lanes(count):
            raise DeltaFormatError(f"bit-length record has {lanes} lanes, expected "
                                   f"{choose_lanes(count)}")
        # At most one 16-bit word per symbol plus the lanes' states; at most bits - 2 raw
        # bits per element (plus a padding byte per group).
        streams = []
        for limit in (4 * lanes + 2 * count, count * (elem * 8 - 2) // 8 + elem * 8):
            size = body.varint()
            if size > limit:
                raise DeltaFormatError("bit-length record payload exceeds the limit")
            streams.append(body.read_exact(size))
        return cls(lo, np.array(freqs, dtype=np.int64), lanes, *streams)


def encode_bits(z: np.ndarray, old: bytes, elem: int, mantissa: int) -> BitsCode | None:
    """Code residual z (one unsigned int per element); None when a piece does not fit the
    symbol alphabet (a residual range this coding is not made for)."""
    z = z.astype(np.uint32, copy=False)
    lengths = _bit_length(z)
    exp = exponents(old, elem, mantissa)
    nz = lengths > 0
    lo = int((lengths + exp)[nz].min()) if nz.any() else 0
    s = np.where(nz, lengths + exp - lo, 0)
    top = np.where(lengths >= 2, (z >> np.maximum(lengths - 2, 0).astype(np.uint32)) & 1, 0)
    sym = np.where(nz, 2 + 2 * s + top, 0)
    if sym.max(initial=0) > _MAX_SYMBOL:
        return None
    sym = sym.astype(np.uint8)
    freqs = quantize_freqs(np.bincount(sym))
    lanes = choose_lanes(len(sym))
    raw = bytearray()
    k_all = np.maximum(lengths - 2, 0)
    for k in range(1, elem * 8 - 1):
        idx = np.flatnonzero(k_all == k)
        if len(idx):
            raw += _pack_group(z[idx], k)
    return BitsCode(lo, freqs, lanes, rans_encode(sym, freqs, lanes), bytes(raw))


def _pack_group(v: np.ndarray, k: int) -> bytes:
    out = bytearray()
    for j in range(k // 8):
        out += ((v >> np.uint32(8 * j)) & np.uint32(0xFF)).astype(np.uint8).tobytes()
    b = k % 8
    if b:
        rem = ((v >> np.uint32(8 * (k // 8))) & np.uint32((1 << b) - 1)).astype(np.uint8)
        out += np.packbits(np.unpackbits(rem[:, None], axis=1)[:, 8 - b:]).tobytes()
    return bytes(out)


def _unpack_group(raw: memoryview, pos: int, m: int, k: int) -> tuple[np.ndarray, int]:
    v = np.zeros(m, dtype=np.uint32)
    for j in range(k // 8):
        if pos + m > len(raw):
            raise DeltaFormatError("raw bits of a bit-length record run short (corrupt patch)")
        v |= np.frombuffer(raw, dtype=np.uint8, count=m, offset=pos).astype(np.uint32) \
            << np.uint32(8 * j)
        pos += m
    b = k % 8
    if b:
        nbytes = -(-m * b // 8)
        if pos + nbytes > len(raw):
            raise DeltaFormatError("raw bits of a bit-length record run short (corrupt patch)")
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8, count=nbytes, offset=pos),
                             count=m * b).reshape(m, b)
        rem = np.packbits(np.concatenate([np.zeros((m, 8 - b), np.uint8), bits], axis=1),
                          axis=1).reshape(m)
        v |= rem.astype(np.uint32) << np.uint32(8 * (k // 8))
        pos += nbytes
    return v, pos


def decode_bits(code: BitsCode, old: bytes, elem: int, mantissa: int) -> np.ndarray:
    """The residual (uint32 per element) of a piece whose old bytes are `old`."""
    n = len(old) // elem
    sym = rans_decode(code.symbols, n, code.freqs, code.lanes)
    nz = sym > 0
    # int32 / uint32 throughout: a piece of MAX_PIECE bytes must decode in a few tens of MB.
    lengths = ((sym.astype(np.int32) - 2) >> 1) + np.int32(code.lo) - exponents(old, elem,
                                                                                 mantissa)
    lengths[~nz] = 0
    top = (sym & 1).astype(np.uint32)
    bits = elem * 8
    if (sym == 1).any() or (lengths[nz] < 1).any() or (lengths > bits).any() \
            or ((lengths == 1) & (top == 1)).any():
        raise DeltaFormatError("bit-length record decodes to impossible lengths (corrupt patch)")
    z = np.left_shift(np.uint32(1), np.maximum(lengths - 1, 0).astype(np.uint32))
    z |= top << np.maximum(lengths - 2, 0).astype(np.uint32)
    z[~nz] = 0
    k_all = np.maximum(lengths - 2, 0)
    raw = memoryview(code.raw)
    pos = 0
    for k in range(1, bits - 1):
        idx = np.flatnonzero(k_all == k)
        if len(idx):
            v, pos = _unpack_group(raw, pos, len(idx), k)
            z[idx] |= v
    if pos != len(raw):
        raise DeltaFormatError("bit-length record has unused raw bits (corrupt patch)")
    return z
