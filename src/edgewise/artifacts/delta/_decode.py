"""The streaming delta decoder.

Invariant: `apply_delta` either leaves `out_path` untouched and raises a `DeltaError`, or
atomically replaces it with bytes whose sha256 is the patch's (and the caller's) expected
result. Before the first output byte is written, the patch's header checksum, length, body
checksum and the base file's hash are verified; while decoding, every record is
bounds-checked (a checksum is not a signature: a crafted patch must fail cleanly too).
Memory stays bounded by the per-record limits in `_format`, whatever the file sizes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import zstandard

from .._errors import (
    DeltaBaseError,
    DeltaError,
    DeltaFormatError,
    DeltaResultError,
    DeltaTruncatedError,
)
from ._bits import BitsCode, decode_bits
from ._format import (
    ELEM_SIZES,
    HEADER_SIZE,
    MAX_GAP_DICT,
    MAX_PIECE,
    MAX_RANGES,
    MAX_REF,
    MAX_WINDOW_LOG,
    OP_BITS,
    OP_COPY,
    OP_END,
    OP_GAP,
    OP_PLANES,
    OP_ZREF,
    PLANE_STORED,
    PLANE_ZSTD,
    T_FSUB,
    T_GROUPED,
    T_NONE,
    BodyReader,
    DeltaInfo,
    Header,
    sha256_of,
)
from ._planes import group_order, join_planes, unapply_transform

__all__ = ["apply_delta", "read_delta_header"]

_COPY_CHUNK = 1 << 20
_MAX_PAYLOAD = 2 * MAX_PIECE  # generous bound on a compressed piece (zstd expands ~0.4%)


def _info(header: Header) -> DeltaInfo:
    return DeltaInfo(header.version, header.base_size, header.base_sha256, header.result_size,
                     header.result_sha256, HEADER_SIZE + header.body_size)


def read_delta_header(patch_path: str | os.PathLike[str]) -> DeltaInfo:
    """Base and result hashes and sizes of a patch, without decoding (or checking) its body."""
    with open(patch_path, "rb") as f:
        return _info(Header.read(f))


def _decompress(payload: bytes, size: int, dict_data: zstandard.ZstdCompressionDict | None = None
                ) -> bytes:
    # Check the size the frame claims before zstd allocates for it.
    try:
        claimed = zstandard.frame_content_size(payload)
        if claimed not in (size, -1):
            raise DeltaFormatError(f"compressed piece claims {claimed} bytes, expected {size}")
        dctx = zstandard.ZstdDecompressor(dict_data=dict_data,
                                          max_window_size=1 << MAX_WINDOW_LOG)
        data = dctx.decompress(payload, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"corrupt compressed piece: {exc}") from exc
    if len(data) != size:
        raise DeltaFormatError(f"compressed piece holds {len(data)} bytes, expected {size}")
    return data


class _Limited:
    """A read-only view of `size` bytes of a file starting at `offset` (for zstd streams)."""

    def __init__(self, f: BinaryIO, offset: int, size: int) -> None:
        self._f = f
        self._f.seek(offset)
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        data = self._f.read(n)
        self._left -= len(data)
        return data


class _Decoder:
    def __init__(self, old: BinaryIO, old_size: int, body: BodyReader, out: BinaryIO,
                 result_size: int, version: int) -> None:
        self.version = version
        self.old = old
        self.old_size = old_size
        self.body = body
        self.out = out
        self.result_size = result_size
        self.written = 0
        self.digest = hashlib.sha256()

    def read_old(self, offset: int, length: int) -> bytes:
        if offset + length > self.old_size:
            raise DeltaFormatError("record reads past the end of the base file")
        self.old.seek(offset)
        data = self.old.read(length)
        if len(data) != length:
            raise DeltaError("base file changed while the patch was applied")
        return data

    def emit(self, data: bytes) -> None:
        if self.written + len(data) > self.result_size:
            raise DeltaFormatError("patch produces more bytes than its header says")
        self.out.write(data)
        self.digest.update(data)
        self.written += len(data)

    def piece_len(self) -> int:
        n = self.body.varint()
        if n > MAX_PIECE:
            raise DeltaFormatError(f"record of {n} bytes exceeds the limit of {MAX_PIECE}")
        return n

    def copy(self) -> None:
        offset, length = self.body.varint(), self.body.varint()
        if offset + length > self.old_size:
            raise DeltaFormatError("copy record reads past the end of the base file")
        for pos in range(offset, offset + length, _COPY_CHUNK):
            self.emit(self.read_old(pos, min(_COPY_CHUNK, offset + length - pos)))

    def planes(self) -> None:
        transform, elem = self.body.u8(), self.body.u8()
        base = transform & ~T_GROUPED
        if base > T_FSUB or elem not in ELEM_SIZES or transform == T_GROUPED:
            raise DeltaFormatError(f"unknown planes record (transform {transform}, "
                                   f"element {elem})")
        old_offset = self.body.varint() if base != T_NONE else 0
        out_len = self.piece_len()
        body_len = out_len - out_len % elem
        count = body_len // elem
        planes = []
        for _ in range(elem):
            codec, size = self.body.u8(), self.body.varint()
            if size > _MAX_PAYLOAD:
                raise DeltaFormatError("plane payload exceeds the limit")
            payload = self.body.read_exact(size)
            if codec == PLANE_ZSTD:
                planes.append(_decompress(payload, count))
            elif codec == PLANE_STORED and size == count:
                planes.append(payload)
            else:
                raise DeltaFormatError(f"bad plane (codec {codec}, {size} bytes)")
        old = self.read_old(old_offset, body_len) if base != T_NONE else None
        residual = join_planes(planes, elem)
        if transform & T_GROUPED:
            ungrouped = np.empty_like(residual.reshape(-1, elem))
            ungrouped[group_order(old, elem)] = residual.reshape(-1, elem)
            residual = ungrouped.reshape(-1)
        self.emit(unapply_transform(base, old, residual, elem))
        self.emit(self.body.read_exact(out_len - body_len))

    def bits(self) -> None:
        transform, elem, mantissa = self.body.u8(), self.body.u8(), self.body.u8()
        if transform != T_FSUB or elem not in (2, 4) or not 1 <= mantissa <= elem * 8 - 2:
            raise DeltaFormatError(f"unknown bit-length record (transform {transform}, "
                                   f"element {elem}, mantissa {mantissa})")
        old_offset = self.body.varint()
        out_len = self.piece_len()
        body_len = out_len - out_len % elem
        count = body_len // elem
        if count == 0:
            raise DeltaFormatError("bit-length record without whole elements")
        code = BitsCode.read(self.body, count, elem, mantissa)
        old = self.read_old(old_offset, body_len)
        z = decode_bits(code, old, elem, mantissa)
        residual = (z.astype(np.uint16) if elem == 2 else z).view(np.uint8)
        self.emit(unapply_transform(transform, old, residual, elem))
        self.emit(self.body.read_exact(out_len - body_len))

    def zref(self) -> None:
        ref_offset, ref_len = self.body.varint(), self.body.varint()
        if ref_len > MAX_REF or ref_len == 0:
            raise DeltaFormatError(f"reference window of {ref_len} bytes is out of bounds")
        out_len = self.piece_len()
        size = self.body.varint()
        if size > _MAX_PAYLOAD:
            raise DeltaFormatError("payload exceeds the limit")
        payload = self.body.read_exact(size)
        ref = zstandard.ZstdCompressionDict(self.read_old(ref_offset, ref_len),
                                            dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        self.emit(_decompress(payload, out_len, ref))

    def run(self, gap_stream) -> None:
        while True:
            op = self.body.u8()
            if op == OP_END:
                break
            if op == OP_COPY:
                self.copy()
            elif op == OP_GAP:
                n = self.body.varint()
                while n:
                    try:
                        data = gap_stream.read(min(n, _COPY_CHUNK)) if gap_stream else b""
                    except zstandard.ZstdError as exc:
                        raise DeltaFormatError(f"corrupt gap frame: {exc}") from exc
                    if not data:
                        raise DeltaFormatError("gap record runs past the gap frame")
                    self.emit(data)
                    n -= len(data)
            elif op == OP_PLANES:
                self.planes()
            elif op == OP_ZREF:
                self.zref()
            elif op == OP_BITS and self.version >= 2:
                self.bits()
            else:
                raise DeltaFormatError(f"unknown record type {op}")
        if self.body.remaining:
            raise DeltaFormatError("bytes after the end record")
        if self.written != self.result_size:
            raise DeltaFormatError(f"patch produced {self.written} bytes, header says "
                                   f"{self.result_size}")


def _check_base(old: BinaryIO, header: Header) -> None:
    size = os.fstat(old.fileno()).st_size
    if size == header.base_size:
        digest, _ = sha256_of(old)
        if digest == header.base_sha256:
            return
    else:
        digest = "?"
    raise DeltaBaseError(
        f"wrong base: the patch applies to a file of {header.base_size} bytes with sha256 "
        f"{header.base_sha256}, but the old file has {size} bytes"
        + (f" and sha256 {digest}" if digest != "?" else ""))


def apply_delta(old_path: str | os.PathLike[str], patch_path: str | os.PathLike[str],
                out_path: str | os.PathLike[str], *, expected_sha256: str | None = None
                ) -> DeltaInfo:
    """Rebuild the new file from `old_path` and `patch_path` into `out_path`, atomically.

    Raises DeltaBaseError (wrong base), DeltaFormatError / DeltaTruncatedError (corrupt or
    cut-off patch), DeltaVersionError (unknown format version), DeltaResultError (result hash
    is not `expected_sha256` or not the patch's own); OSError for unreadable inputs. On any
    error nothing is written at `out_path`.
    """
    out_path = Path(out_path)
    with open(patch_path, "rb") as pf, open(old_path, "rb") as old:
        header = Header.read(pf)
        actual = os.fstat(pf.fileno()).st_size
        if actual < HEADER_SIZE + header.body_size:
            raise DeltaTruncatedError(f"patch is truncated: {actual} bytes, header says "
                                      f"{HEADER_SIZE + header.body_size}")
        if actual > HEADER_SIZE + header.body_size:
            raise DeltaFormatError("patch has trailing bytes after its body")
        if expected_sha256 is not None and expected_sha256.lower() != header.result_sha256:
            raise DeltaResultError(f"patch produces sha256 {header.result_sha256}, "
                                   f"expected {expected_sha256}")
        _check_base(old, header)
        pf.seek(HEADER_SIZE)
        digest, _ = sha256_of(pf, header.body_size)
        if digest != header.body_sha256:
            raise DeltaFormatError("patch checksum mismatch (corrupt patch)")

        pf.seek(HEADER_SIZE)
        body = BodyReader(pf, header.body_size)
        decoder_old_size = header.base_size
        n_ranges = body.varint()
        if n_ranges > MAX_RANGES:
            raise DeltaFormatError("too many dictionary ranges")
        ranges, pos, total = [], 0, 0
        for _ in range(n_ranges):
            start = pos + body.varint()
            end = start + body.varint()
            total += end - start
            if end > decoder_old_size or total > MAX_GAP_DICT:
                raise DeltaFormatError("gap dictionary out of bounds")
            ranges.append((start, end))
            pos = end
        gap_size = body.varint()
        gap_offset = HEADER_SIZE + header.body_size - body.remaining
        body.skip(gap_size)

        fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.",
                                        suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, open(patch_path, "rb") as gap_file:
                decoder = _Decoder(old, decoder_old_size, body, out, header.result_size,
                                   header.version)
                gap_stream = None
                if gap_size:
                    gap_dict = b"".join(decoder.read_old(a, b - a) for a, b in ranges)
                    dctx = zstandard.ZstdDecompressor(
                        dict_data=(zstandard.ZstdCompressionDict(
                            gap_dict, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
                            if gap_dict else None),
                        max_window_size=1 << MAX_WINDOW_LOG)
                    gap_stream = dctx.stream_reader(_Limited(gap_file, gap_offset, gap_size),
                                                    read_across_frames=False)
                decoder.run(gap_stream)
                result = decoder.digest.hexdigest()
                if result != header.result_sha256:
                    raise DeltaResultError(f"decoded file has sha256 {result}, patch promised "
                                           f"{header.result_sha256}")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, out_path)
        except zstandard.ZstdError as exc:
            tmp.unlink(missing_ok=True)
            raise DeltaFormatError(f"corrupt patch: {exc}") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return _info(header)
