"""The delta encoder: match tensors by name (then content), pick the smallest coding per piece.

Invariant: the patch is written to a temporary file beside `patch_path` and moved into place
only once complete, and every record it holds stays within the decoder's limits (`_format`),
so whatever the encoder decides, the decoder reproduces the new file byte for byte with
memory bounded by those limits. Encoding may use more memory (it maps both files).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from ._bits import encode_bits
from ._format import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAX_GAP_DICT,
    MAX_PIECE,
    MAX_REF,
    OP_BITS,
    OP_COPY,
    OP_END,
    OP_GAP,
    OP_PLANES,
    OP_ZREF,
    PLANE_STORED,
    PLANE_ZSTD,
    READABLE_VERSIONS,
    T_FSUB,
    T_GROUPED,
    T_NONE,
    T_SUB,
    T_XOR,
    DeltaInfo,
    Header,
    put_varint,
)
from ._layout import Layout, Span, parse_layout
from ._planes import apply_transform, group_order, split_planes

__all__ = ["encode_delta"]

_SMALL_GAP = 64 << 10  # non-tensor runs up to this size go to the gap frame
_GENERIC_CHUNK = 4 << 20
_REF_MARGIN = 1 << 20
_PROBE_LEVEL = 3  # candidates are ranked at this level, the winner is redone at `level`
_WINDOW_LOG = 24
_TRANSFORM_NAMES = {T_NONE: "planes", T_XOR: "planes-xor", T_SUB: "planes-sub",
                    T_FSUB: "planes-fsub"}


@contextmanager
def _mapped(path: Path) -> Iterator[mmap.mmap | bytes]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            yield b""
            return
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            yield mm
        finally:
            mm.close()


def _sha256(buf) -> str:
    digest = hashlib.sha256()
    view = memoryview(buf)
    for pos in range(0, len(view), 8 << 20):
        digest.update(view[pos:pos + (8 << 20)])
    return digest.hexdigest()


def _zstd(data: bytes, level: int, dict_data: zstandard.ZstdCompressionDict | None = None
          ) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        level, window_log=_WINDOW_LOG, write_content_size=True)
    return zstandard.ZstdCompressor(compression_params=params, dict_data=dict_data).compress(data)


def _raw_dict(data: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


@dataclass
class _Stats:
    methods: dict[str, dict[str, int]]

    def add(self, method: str, in_bytes: int, out_bytes: int) -> None:
        entry = self.methods.setdefault(method, {"pieces": 0, "in_bytes": 0, "out_bytes": 0})
        entry["pieces"] += 1
        entry["in_bytes"] += in_bytes
        entry["out_bytes"] += out_bytes


class _BodyWriter:
    """Appends records to the body, merging adjacent copies, hashing as it goes."""

    def __init__(self, f, stats: _Stats) -> None:
        self._f = f
        self._digest = hashlib.sha256()
        self.size = 0
        self._copy: tuple[int, int] | None = None
        self.stats = stats

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self._digest.update(data)
        self.size += len(data)

    def copy(self, old_offset: int, length: int) -> None:
        if self._copy and self._copy[0] + self._copy[1] == old_offset:
            self._copy = (self._copy[0], self._copy[1] + length)
        else:
            self._flush_copy()
            self._copy = (old_offset, length)
        self.stats.add("copy", length, 0)

    def _flush_copy(self) -> None:
        if self._copy:
            rec = bytearray([OP_COPY])
            put_varint(rec, self._copy[0])
            put_varint(rec, self._copy[1])
            self.write(bytes(rec))
            self._copy = None

    def record(self, data: bytes, method: str, in_bytes: int) -> None:
        self._flush_copy()
        self.write(data)
        self.stats.add(method, in_bytes, len(data))

    def finish(self) -> str:
        self._flush_copy()
        self.write(bytes([OP_END]))
        return self._digest.hexdigest()


def _planes_record(transform: int, elem: int, old_offset: int, new: bytes, old: bytes | None,
                   level: int) -> bytes:
    body_len = len(new) - len(new) % elem
    base = transform & ~T_GROUPED
    old_body = old[:body_len] if old is not None else None
    residual = apply_transform(base, old_body, new[:body_len], elem)
    if transform & T_GROUPED:
        residual = residual.reshape(-1, elem)[group_order(old_body, elem)].reshape(-1)
    rec = bytearray([OP_PLANES, transform, elem])
    if base != T_NONE:
        put_varint(rec, old_offset)
    put_varint(rec, len(new))
    for plane in split_planes(residual, elem):
        packed = _zstd(plane, level) if plane else b""
        if packed and len(packed) < len(plane):
            rec.append(PLANE_ZSTD)
            put_varint(rec, len(packed))
            rec += packed
        else:
            rec.append(PLANE_STORED)
            put_varint(rec, len(plane))
            rec += plane
    rec += new[body_len:]
    return bytes(rec)


def _bits_record(transform: int, elem: int, mantissa: int, old_offset: int, new: bytes,
                 old: bytes) -> bytes | None:
    body_len = len(new) - len(new) % elem
    if body_len == 0:
        return None
    residual = apply_transform(transform, old[:body_len], new[:body_len], elem)
    z = residual.view(np.uint16 if elem == 2 else np.uint32)
    code = encode_bits(z, old[:body_len], elem, mantissa)
    if code is None:
        return None
    rec = bytearray([OP_BITS, transform, elem, mantissa])
    put_varint(rec, old_offset)
    put_varint(rec, len(new))
    code.pack(rec)
    rec += new[body_len:]
    return bytes(rec)


def _zref_record(ref_offset: int, ref: bytes, new: bytes, level: int) -> bytes:
    packed = _zstd(new, level, _raw_dict(ref))
    rec = bytearray([OP_ZREF])
    for value in (ref_offset, len(ref), len(new), len(packed)):
        put_varint(rec, value)
    return bytes(rec) + packed


@dataclass(frozen=True)
class _Candidate:
    method: str
    transform: int = T_NONE
    elem: int = 1
    ref_offset: int = 0  # old offset of the aligned bytes (planes) or of the window (zref)
    ref_len: int = 0
    mantissa: int = 0  # bits: the float type's mantissa width

    def build(self, new: bytes, old_buf, level: int) -> bytes | None:
        """The record, or None where this coding does not apply to these bytes."""
        if self.method == "zref":
            ref = bytes(old_buf[self.ref_offset:self.ref_offset + self.ref_len])
            return _zref_record(self.ref_offset, ref, new, level)
        old = (bytes(old_buf[self.ref_offset:self.ref_offset + len(new)])
               if self.transform != T_NONE else None)
        if self.method.startswith("bits"):
            assert old is not None
            return _bits_record(self.transform, self.elem, self.mantissa, self.ref_offset, new,
                                old)
        return _planes_record(self.transform, self.elem, self.ref_offset, new, old, level)


class _AnchorIndex:
    """Content-defined anchors (8-byte windows whose hash is 0 mod 4096) of the old file.

    They let the generic codec find, for a chunk of the new file, where similar bytes sit in
    the old one, so a bounded window of the old file can serve as its zstd dictionary.
    """

    _MUL = np.uint64(0x9E3779B97F4A7C15)
    _BLOCK = 4 << 20

    def __init__(self, buf) -> None:
        hashes, offsets = [], []
        for pos in range(0, len(buf), self._BLOCK):
            h, o = self.anchors(buf[pos:pos + self._BLOCK + 7], pos)
            hashes.append(h)
            offsets.append(o)
        h = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
        o = np.concatenate(offsets) if offsets else np.empty(0, np.int64)
        self.hashes, first = np.unique(h, return_index=True)
        self.offsets = o[first]

    @classmethod
    def anchors(cls, data, base: int) -> tuple[np.ndarray, np.ndarray]:
        a = np.frombuffer(data, dtype=np.uint8)
        n = len(a) - 7
        if n <= 0:
            return np.empty(0, np.uint64), np.empty(0, np.int64)
        h = a[:n].astype(np.uint64)
        for k in range(1, 8):
            h |= a[k:k + n].astype(np.uint64) << np.uint64(8 * k)
        with np.errstate(over="ignore"):
            mixed = h * cls._MUL
        pos = np.nonzero(((mixed >> np.uint64(52)) == 0) & (h != 0))[0]
        hashes, first = np.unique(h[pos], return_index=True)
        return hashes, pos[first].astype(np.int64) + base

    def shift_for(self, data, base: int) -> int | None:
        """The most common (old offset - new offset) among the chunk's anchors, if any."""
        h, o = self.anchors(data, base)
        if not len(h) or not len(self.hashes):
            return None
        idx = np.searchsorted(self.hashes, h)
        idx = np.minimum(idx, len(self.hashes) - 1)
        hit = self.hashes[idx] == h
        if not hit.any():
            return None
        shifts = self.offsets[idx[hit]] - o[hit]
        values, counts = np.unique(shifts, return_counts=True)
        return int(values[np.argmax(counts)])


class _Encoder:
    def __init__(self, old, new, level: int, piece_bytes: int, writer: _BodyWriter,
                 max_version: int) -> None:
        self.old = old
        self.new = new
        self.level = level
        self.piece_bytes = piece_bytes
        self.max_version = max_version
        self.out = writer
        self._anchor_index: _AnchorIndex | None = None

    # -- choosing ---------------------------------------------------------------------------

    def _best(self, new: bytes, candidates: list[_Candidate]) -> tuple[bytes, str]:
        if len(candidates) == 1:
            cand = candidates[0]
        else:
            built = [(c.build(new, self.old, _PROBE_LEVEL), i, c)
                     for i, c in enumerate(candidates)]
            data, _, cand = min((b for b in built if b[0] is not None),
                                key=lambda b: (len(b[0]), b[1]))
            if cand.method.startswith("bits"):  # no zstd inside: the probe is the record
                return data, cand.method
        data = cand.build(new, self.old, self.level)
        assert data is not None  # the last candidate (plain zstd) always applies
        return data, cand.method

    def tensor(self, span: Span, old_span: Span | None) -> None:
        step = max(span.elem, self.piece_bytes - self.piece_bytes % span.elem)
        for pos in range(span.start, span.end, step):
            end = min(pos + step, span.end)
            new = bytes(self.new[pos:end])
            cands = []
            if old_span is not None:
                old_pos = old_span.start + (pos - span.start)
                if bytes(self.old[old_pos:old_pos + len(new)]) == new:
                    self.out.copy(old_pos, len(new))
                    continue
                sub = T_FSUB if span.is_float else T_SUB
                for t in (T_XOR, sub):
                    cands.append(_Candidate(_TRANSFORM_NAMES[t], t, span.elem, old_pos))
                if span.is_float and span.elem > 1:
                    cands.append(_Candidate("planes-fsub-grouped", T_FSUB | T_GROUPED,
                                            span.elem, old_pos))
                if span.is_float and span.elem in (2, 4) and span.mantissa \
                        and self.max_version >= 2:
                    cands.append(_Candidate("bits-fsub", T_FSUB, span.elem, old_pos,
                                            mantissa=span.mantissa))
            if span.elem > 1:
                cands.append(_Candidate("planes", T_NONE, span.elem))
            cands.append(_Candidate("zstd", T_NONE, 1))
            data, method = self._best(new, cands)
            self.out.record(data, method, len(new))

    def generic(self, start: int, end: int) -> None:
        """Opaque bytes: zstd against a window of the old file found by anchors."""
        old_size = len(self.old)
        for pos in range(start, end, _GENERIC_CHUNK):
            stop = min(pos + _GENERIC_CHUNK, end)
            new = bytes(self.new[pos:stop])
            cands = [_Candidate("zstd", T_NONE, 1)]
            if old_size:
                if self._anchor_index is None:
                    self._anchor_index = _AnchorIndex(self.old)
                shift = self._anchor_index.shift_for(new, pos)
                aligned = pos + (shift if shift is not None else 0)
                if aligned >= 0 and aligned + len(new) <= old_size:
                    if bytes(self.old[aligned:aligned + len(new)]) == new:
                        self.out.copy(aligned, len(new))
                        continue
                    if len(new) >= 4096 and aligned % 4 == pos % 4:
                        cands.append(_Candidate("planes-fsub", T_FSUB, 4, aligned))
                lo = max(0, min(aligned, old_size) - _REF_MARGIN)
                hi = min(old_size, max(aligned, 0) + len(new) + _REF_MARGIN)
                if hi - lo > MAX_REF:
                    hi = lo + MAX_REF
                if hi > lo:
                    cands.append(_Candidate("zref", ref_offset=lo, ref_len=hi - lo))
            data, method = self._best(new, cands)
            self.out.record(data, method, len(new))


def _gaps(spans: tuple[Span, ...], size: int) -> list[tuple[int, int]]:
    gaps, pos = [], 0
    for s in spans:
        if s.start > pos:
            gaps.append((pos, s.start))
        pos = s.end
    if pos < size:
        gaps.append((pos, size))
    return gaps


def encode_delta(old_path: str | os.PathLike[str], new_path: str | os.PathLike[str],
                 patch_path: str | os.PathLike[str], *, level: int = 19,
                 piece_bytes: int = 2 << 20, max_version: int = FORMAT_VERSION) -> DeltaInfo:
    """Write a patch that turns `old_path` into `new_path`; return what it holds.

    `level` is the zstd level of the final coding (candidates are ranked at level 3);
    `piece_bytes` (1-8 MiB) is how large tensors are cut so that each piece picks its own
    coding and the decoder's memory stays bounded; `max_version` is the newest format the
    patch may use (1: no bit-length records, for decoders that read only version 1).
    Raises OSError for unreadable inputs.
    """
    if not (1 << 16) <= piece_bytes <= MAX_PIECE:
        raise ValueError(f"piece_bytes must be within 64 KiB..{MAX_PIECE} bytes")
    if max_version not in READABLE_VERSIONS:
        raise ValueError(f"max_version must be one of {READABLE_VERSIONS}")
    old_path, new_path, patch_path = Path(old_path), Path(new_path), Path(patch_path)
    stats = _Stats({})
    with _mapped(old_path) as old, _mapped(new_path) as new:
        base_sha, result_sha = _sha256(old), _sha256(new)
        old_layout, new_layout = parse_layout(old), parse_layout(new)
        matches = _match_spans(new_layout, old_layout, old, new)

        new_gaps = _gaps(new_layout.spans, len(new))
        small = [(a, b) for a, b in new_gaps if b - a <= _SMALL_GAP]
        gap_data = b"".join(bytes(new[a:b]) for a, b in small)
        dict_ranges = _gap_dict_ranges(old_layout, len(old))
        gap_dict = b"".join(bytes(old[a:b]) for a, b in dict_ranges)

        fd, tmp_name = tempfile.mkstemp(dir=patch_path.parent or Path("."),
                                        prefix=f".{patch_path.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "w+b") as f:
                f.write(b"\0" * HEADER_SIZE)
                out = _BodyWriter(f, stats)
                pre = bytearray()
                put_varint(pre, len(dict_ranges))
                last = 0
                for a, b in dict_ranges:
                    put_varint(pre, a - last)
                    put_varint(pre, b - a)
                    last = b
                gap_frame = (_zstd(gap_data, level, _raw_dict(gap_dict) if gap_dict else None)
                             if gap_data else b"")
                put_varint(pre, len(gap_frame))
                out.write(bytes(pre) + gap_frame)
                stats.add("gap", len(gap_data), len(pre) + len(gap_frame))

                enc = _Encoder(old, new, level, piece_bytes, out, max_version)
                events = [(s.start, 1, s, m)
                          for s, m in zip(new_layout.spans, matches, strict=True)]
                events += [(a, 0, (a, b), None) for a, b in new_gaps]
                for _start, is_tensor, item, old_span in sorted(events, key=lambda e: e[0]):
                    if is_tensor:
                        enc.tensor(item, old_span)
                    elif item[1] - item[0] <= _SMALL_GAP:
                        rec = bytearray([OP_GAP])
                        put_varint(rec, item[1] - item[0])
                        out.record(bytes(rec), "gap-ref", 0)
                    else:
                        enc.generic(*item)
                body_sha = out.finish()
                # The oldest version that can read it: decoders from before BITS records
                # still apply patches that do not use them.
                version = 2 if any(m.startswith("bits") for m in stats.methods) else 1
                header = Header(version, len(old), base_sha, len(new), result_sha,
                                out.size, body_sha)
                f.seek(0)
                f.write(header.pack())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, patch_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        old_size, new_size = len(old), len(new)
    return DeltaInfo(version, old_size, base_sha, new_size, result_sha,
                     HEADER_SIZE + out.size, layout=new_layout.kind, methods=stats.methods)


def _match_spans(new_layout: Layout, old_layout: Layout, old, new) -> list[Span | None]:
    """For each new tensor, the old tensor to diff against: same name and size, else same bytes.

    Storage offsets never decide a match: a tensor that moved, or whose neighbours changed
    size, still finds its old self.
    """
    by_name = {s.name: s for s in old_layout.spans}
    by_hash: dict[tuple[int, bytes], Span] | None = None
    matched: list[Span | None] = []
    for span in new_layout.spans:
        old_span = by_name.get(span.name)
        if old_span is not None and old_span.size == span.size:
            matched.append(old_span)
            continue
        if by_hash is None:
            by_hash = {(s.size, hashlib.sha256(old[s.start:s.end]).digest()): s
                       for s in old_layout.spans}
        key = (span.size, hashlib.sha256(new[span.start:span.end]).digest())
        matched.append(by_hash.get(key))
    return matched


def _gap_dict_ranges(old_layout: Layout, old_size: int) -> list[tuple[int, int]]:
    """Old non-tensor bytes (headers, graph, metadata): the dictionary of the gap frame."""
    ranges, total = [], 0
    source = _gaps(old_layout.spans, old_size) if old_layout.spans else [(0, old_size)]
    for a, b in source:
        take = min(b - a, MAX_GAP_DICT - total)
        if take <= 0:
            break
        ranges.append((a, a + take))
        total += take
    return ranges
