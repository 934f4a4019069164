"""Interleaved rANS with a static model, vectorised over lanes with numpy.

A byte-oriented compressor (zstd) spends about half a bit per symbol more than the entropy on
the short, skewed alphabets of `_bits`; an arithmetic coder does not. Plain rANS codes one
symbol at a time, which Python cannot afford for millions of symbols, so the symbols are dealt
round-robin to `lanes` independent coders (symbol i to lane i % lanes) and every numpy
operation advances all lanes by one symbol.

Stream layout: the lanes' final states (u32 each), then the 16-bit renormalisation words in
the order the decoder reads them (step by step, lanes in order within a step).

Invariant: `decode(encode(sym, freqs, lanes), len(sym), freqs, lanes) == sym` for symbols whose
frequency is non-zero; a decoder that consumes every word and ends with every lane back at the
initial state has read exactly the stream the encoder wrote (a strong check against
corruption, on top of the patch checksum).
"""

from __future__ import annotations

import numpy as np

from .._errors import DeltaFormatError

__all__ = ["SCALE_BITS", "choose_lanes", "quantize_freqs", "rans_decode", "rans_encode"]

SCALE_BITS = 14  # frequencies sum to 2**SCALE_BITS
_TOTAL = 1 << SCALE_BITS
_LOW = 1 << 16  # states live in [_LOW, 2**32); renormalisation moves 16 bits at a time
_MAX_LANES = 512


def choose_lanes(n: int) -> int:
    """Lanes for n symbols: enough for numpy to pay off, few enough that the final states
    (4 bytes a lane) stay a small fraction of the stream."""
    return max(1, min(_MAX_LANES, n // 256))


def quantize_freqs(counts: np.ndarray) -> np.ndarray:
    """Counts -> frequencies summing to 2**SCALE_BITS, every seen symbol at least 1."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total <= 0 or int(np.count_nonzero(counts)) > _TOTAL:
        raise ValueError("cannot model an empty or too large alphabet")
    freqs = np.where(counts > 0, np.maximum(1, (counts * _TOTAL + total // 2) // total), 0)
    # Rounding leaves the sum off by at most the alphabet size: settle the difference on the
    # most frequent symbols (where it costs the fewest bits). One pass always suffices, as
    # the seen symbols are at most _TOTAL.
    diff = _TOTAL - int(freqs.sum())
    for i in np.argsort(-freqs, kind="stable"):
        change = diff if diff > 0 else -min(-diff, int(freqs[i]) - 1)
        freqs[i] += change
        diff -= change
        if diff == 0:
            break
    return freqs.astype(np.int64)


def rans_encode(sym: np.ndarray, freqs: np.ndarray, lanes: int) -> bytes:
    n = len(sym)
    if n == 0:
        return b""
    freqs = np.asarray(freqs, dtype=np.uint64)
    cum = np.concatenate([[0], np.cumsum(freqs)[:-1]]).astype(np.uint64)
    x = np.full(lanes, _LOW, dtype=np.uint64)
    chunks = []
    steps = -(-n // lanes)
    for t in range(steps - 1, -1, -1):
        s = sym[t * lanes:(t + 1) * lanes]
        k = len(s)
        xs = x[:k]
        f = freqs[s]
        emit = xs >= (f << np.uint64(32 - SCALE_BITS))
        chunks.append((xs[emit] & np.uint64(0xFFFF)).astype("<u2"))
        xs = np.where(emit, xs >> np.uint64(16), xs)
        x[:k] = ((xs // f) << np.uint64(SCALE_BITS)) + (xs % f) + cum[s]
    words = np.concatenate(chunks[::-1]) if chunks else np.empty(0, "<u2")
    return x.astype("<u4").tobytes() + words.tobytes()


def rans_decode(data: bytes, n: int, freqs: np.ndarray, lanes: int) -> np.ndarray:
    """The n symbols of `data`; DeltaFormatError if the stream is not one `rans_encode` wrote
    with these frequencies and lanes."""
    if n == 0:
        if data:
            raise DeltaFormatError("entropy-coded stream holds bytes but no symbols")
        return np.empty(0, dtype=np.uint8)
    if not 1 <= lanes <= min(n, _MAX_LANES):
        raise DeltaFormatError(f"bad entropy coder lane count {lanes}")
    freqs = np.asarray(freqs, dtype=np.int64)
    if len(freqs) > 256 or freqs.min(initial=0) < 0 or freqs.max(initial=0) > _TOTAL \
            or int(freqs.sum()) != _TOTAL:
        raise DeltaFormatError("bad entropy coder frequency table")
    if len(data) < 4 * lanes or (len(data) - 4 * lanes) % 2:
        raise DeltaFormatError("entropy-coded stream has a bad length")
    x = np.frombuffer(data, dtype="<u4", count=lanes).astype(np.uint64)
    if (x < _LOW).any():
        raise DeltaFormatError("entropy coder state out of range (corrupt patch)")
    words = np.frombuffer(data, dtype="<u2", offset=4 * lanes)  # widened a slice at a time
    f64 = freqs.astype(np.uint64)
    cum = np.concatenate([[0], np.cumsum(freqs)[:-1]]).astype(np.uint64)
    slot_sym = np.repeat(np.arange(len(freqs), dtype=np.uint8), freqs)
    out = np.empty(n, dtype=np.uint8)
    mask = np.uint64(_TOTAL - 1)
    pos = 0
    for t in range(-(-n // lanes)):
        xs = x[:min(lanes, n - t * lanes)]
        slot = xs & mask
        s = slot_sym[slot]
        out[t * lanes:t * lanes + len(xs)] = s
        xs = f64[s] * (xs >> np.uint64(SCALE_BITS)) + slot - cum[s]
        need = np.flatnonzero(xs < _LOW)
        if pos + len(need) > len(words):
            raise DeltaFormatError("entropy-coded stream ends early (corrupt patch)")
        xs[need] = (xs[need] << np.uint64(16)) | words[pos:pos + len(need)].astype(np.uint64)
        pos += len(need)
        x[:len(xs)] = xs
    if pos != len(words) or (x != _LOW).any():
        raise DeltaFormatError("entropy-coded stream does not decode cleanly (corrupt patch)")
    return out
