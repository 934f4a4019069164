"""Delta format v1/v2: the fixed header, record opcodes and the limits a decoder enforces.

Layout of a patch file::

    header (HEADER_SIZE bytes, little-endian)
        magic            8   b"\\x89EWDLT\\r\\n"
        version          u16 (1, or 2 when the patch holds BITS records)
        flags            u16 (0)
        base_size        u64   base_sha256    32
        result_size      u64   result_sha256  32
        body_size        u64   body_sha256    32   <- the container checksum
        header_crc32     u32   over every header byte before it
    body (body_size bytes)
        preamble: varint n_ranges, then n_ranges x (varint skip, varint length): the regions of
                  the old file that form the gap dictionary (at most MAX_GAP_DICT bytes)
        varint gap_frame_size, gap frame: one zstd frame holding all small non-tensor bytes of
                  the new file, compressed against the gap dictionary
        records, each producing the next bytes of the new file, then END

Records (opcode u8, then varints unless noted):

    COPY   old_offset, length                      bytes of the old file
    GAP    length                                  next bytes of the gap frame
    PLANES transform u8 (| T_GROUPED), elem u8, [old_offset if transform], out_len,
           elem x (codec u8, payload_len, payload), tail bytes (out_len % elem, stored)
    ZREF   ref_offset, ref_len, out_len, payload_len, payload
           one zstd frame whose raw-content dictionary is old[ref_offset:ref_offset+ref_len]
    BITS   (version 2) transform u8 (T_FSUB), elem u8 (2 or 4), mantissa u8, old_offset,
           out_len, lo, n_freqs, n_freqs x freq, lanes, symbols_len, symbols, raw_len, raw,
           tail bytes (out_len % elem, stored): the residual coded by bit length (`_bits`)

Invariant: the magic and version occupy the same first 10 bytes in every version, so any
decoder can tell "not a patch" from "a patch of another version"; every record produces at
most MAX_PIECE bytes from at most MAX_PIECE + MAX_REF bytes of input, so decoding needs memory
independent of the file size.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

from .._errors import DeltaFormatError, DeltaTruncatedError, DeltaVersionError

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "READABLE_VERSIONS",
    "MAGIC",
    "DeltaInfo",
    "Header",
]

MAGIC = b"\x89EWDLT\r\n"
FORMAT_VERSION = 2  # the newest version this code writes and reads
READABLE_VERSIONS = (1, 2)  # a patch without BITS records is written as version 1
_HEADER = struct.Struct("<8sHHQ32sQ32sQ32s")
HEADER_SIZE = _HEADER.size + 4

# Record opcodes.
OP_END = 0
OP_COPY = 1
OP_GAP = 2
OP_PLANES = 3
OP_ZREF = 4
OP_BITS = 5  # version 2 and later

# PLANES transforms: how the new bit patterns relate to the old ones before the byte split.
T_NONE = 0  # raw byte planes (no old bytes)
T_XOR = 1  # new ^ old
T_SUB = 2  # zigzag(new - old), bit patterns as integers
T_FSUB = 3  # zigzag(ord(new) - ord(old)), ord() makes IEEE floats order like integers
T_GROUPED = 0x80  # flag on a transform: elements permuted by the old value's exponent bits

PLANE_STORED = 0
PLANE_ZSTD = 1

# Decoder limits (the encoder stays below them).
MAX_PIECE = 8 << 20
MAX_REF = 16 << 20
MAX_GAP_DICT = 8 << 20
MAX_RANGES = 1 << 20
MAX_WINDOW_LOG = 25
ELEM_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Header:
    version: int
    base_size: int
    base_sha256: str
    result_size: int
    result_sha256: str
    body_size: int
    body_sha256: str

    def pack(self) -> bytes:
        head = _HEADER.pack(MAGIC, self.version, 0, self.base_size,
                            bytes.fromhex(self.base_sha256), self.result_size,
                            bytes.fromhex(self.result_sha256), self.body_size,
                            bytes.fromhex(self.body_sha256))
        return head + struct.pack("<I", zlib.crc32(head))

    @classmethod
    def read(cls, f: BinaryIO) -> Header:
        raw = f.read(HEADER_SIZE)
        if len(raw) < 10 or raw[:8] != MAGIC:
            if len(raw) < 10 and MAGIC.startswith(raw[:8]) and raw:
                raise DeltaTruncatedError("patch is truncated inside its header")
            raise DeltaFormatError("not an edgewise delta patch (bad magic)")
        (version,) = struct.unpack_from("<H", raw, 8)
        if version not in READABLE_VERSIONS:
            raise DeltaVersionError(f"unknown delta format version {version} (this decoder "
                                    f"reads versions {', '.join(map(str, READABLE_VERSIONS))})")
        if len(raw) < HEADER_SIZE:
            raise DeltaTruncatedError("patch is truncated inside its header")
        (crc,) = struct.unpack_from("<I", raw, _HEADER.size)
        if zlib.crc32(raw[:_HEADER.size]) != crc:
            raise DeltaFormatError("delta header checksum mismatch (corrupt patch)")
        (_, version, flags, base_size, base_sha, result_size, result_sha, body_size,
         body_sha) = _HEADER.unpack_from(raw)
        if flags != 0:
            raise DeltaFormatError(f"unknown delta header flags {flags:#x}")
        return cls(version, base_size, base_sha.hex(), result_size, result_sha.hex(),
                   body_size, body_sha.hex())


@dataclass(frozen=True)
class DeltaInfo:
    """What a patch turns into what: sizes and hashes, plus the encoder's per-method stats.

    `methods` maps a method name ("copy", "planes-fsub", "zref", ...) to
    {"pieces": n, "in_bytes": new-file bytes covered, "out_bytes": patch bytes spent}; it is
    only filled by `encode_delta` (the header does not carry it).
    """

    version: int
    base_size: int
    base_sha256: str
    result_size: int
    result_sha256: str
    patch_size: int
    layout: str = "unknown"
    methods: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Patch bytes per byte of the result."""
        return self.patch_size / self.result_size if self.result_size else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version, "base_size": self.base_size,
            "base_sha256": self.base_sha256, "result_size": self.result_size,
            "result_sha256": self.result_sha256, "patch_size": self.patch_size,
            "layout": self.layout, "methods": self.methods,
        }


def put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError("varint must be non-negative")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def varint(value: int) -> bytes:
    out = bytearray()
    put_varint(out, value)
    return bytes(out)


class BodyReader:
    """Reads the body of a patch with bounds: every short read is a truncation error."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self.remaining = size

    def read_exact(self, n: int) -> bytes:
        if n > self.remaining:
            raise DeltaFormatError("record runs past the end of the patch body")
        data = self._f.read(n)
        if len(data) != n:
            raise DeltaTruncatedError("patch is truncated")
        self.remaining -= n
        return data

    def u8(self) -> int:
        return self.read_exact(1)[0]

    def varint(self) -> int:
        shift = 0
        value = 0
        while True:
            b = self.u8()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise DeltaFormatError("varint too long (corrupt patch)")

    def skip(self, n: int) -> None:
        if n > self.remaining:
            raise DeltaFormatError("record runs past the end of the patch body")
        self._f.seek(n, 1)
        self.remaining -= n


def sha256_of(f: BinaryIO, size: int | None = None, chunk: int = 1 << 20) -> tuple[str, int]:
    """(hex digest, bytes read) of the rest of `f`, or of its next `size` bytes."""
    digest = hashlib.sha256()
    done = 0
    while size is None or done < size:
        want = chunk if size is None else min(chunk, size - done)
        data = f.read(want)
        if not data:
            break
        digest.update(data)
        done += len(data)
    return digest.hexdigest(), done
