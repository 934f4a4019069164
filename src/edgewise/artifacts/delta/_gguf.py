"""GGUF (v2/v3) tensor-data spans, and a minimal writer for tests and the benchmark.

Invariant: the reader needs only the header, key-values and tensor infos; a tensor's span runs
from its offset to the next tensor's offset (or to the end of the file), so quantized types of
any block layout are handled without a ggml type table (padding rides along in the span).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

import numpy as np

from ._layout import Span

__all__ = ["GGML_TYPES", "read_gguf_spans", "write_gguf"]

# ggml type id -> (element size for byte planes, is float); quantized types are byte streams.
GGML_TYPES = {0: (4, True), 1: (2, True), 24: (1, False), 25: (2, False), 26: (4, False),
              27: (8, False), 28: (8, True), 30: (2, True)}
GGML_MANTISSA = {0: 23, 1: 10, 30: 7}  # F32, F16, BF16
_NUMPY_TO_GGML = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.int8): 24,
                  np.dtype(np.int16): 25, np.dtype(np.int32): 26, np.dtype(np.int64): 27,
                  np.dtype(np.float64): 28}
# Scalar value types: id -> struct format.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_COUNT = 1 << 24


class _Cursor:
    def __init__(self, buf) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.take("Q")
        if n > _MAX_COUNT or self.pos + n > len(self.buf):
            raise ValueError("bad string length")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.take("IQ")
            if count > _MAX_COUNT:
                raise ValueError("array too long")
            if itype in _SCALAR:  # skip without building a list
                size = struct.calcsize("<" + _SCALAR[itype]) * count
                self.pos += size
                return None
            return [self.value(itype) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_spans(buf) -> list[Span] | None:
    if bytes(buf[:4]) != b"GGUF":
        return None
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.take("I")
    if version not in (2, 3):
        return None
    n_tensors, n_kv = cur.take("QQ")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        return None
    alignment = 32
    for _ in range(n_kv):
        key = cur.string()
        value = cur.value(cur.take("I"))
        if key == "general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("I")
        if n_dims > 8:
            return None
        cur.pos += 8 * n_dims
        ggml_type, offset = cur.take("IQ")
        infos.append((offset, name, ggml_type))
    data_start = -(-cur.pos // alignment) * alignment
    infos.sort()
    spans = []
    for i, (offset, name, ggml_type) in enumerate(infos):
        start = data_start + offset
        end = data_start + infos[i + 1][0] if i + 1 < len(infos) else len(buf)
        elem, is_float = GGML_TYPES.get(ggml_type, (1, False))
        if (end - start) % elem:  # padding that is not whole elements: keep it in the gap
            end -= (end - start) % elem
        spans.append(Span(name, start, end, elem, is_float, GGML_MANTISSA.get(ggml_type, 0)))
    return spans


def _pack_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _pack_value(value) -> bytes:
    if isinstance(value, bool):
        return struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return struct.pack("<Iq", 11, value) if value < 0 else struct.pack("<IQ", 10, value)
    if isinstance(value, float):
        return struct.pack("<Id", 12, value)
    if isinstance(value, str):
        return struct.pack("<I", _STRING) + _pack_string(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return (struct.pack("<IIQ", _ARRAY, _STRING, len(value))
                + b"".join(_pack_string(v) for v in value))
    raise TypeError(f"unsupported GGUF metadata value {value!r}")


def write_gguf(path, tensors: Mapping[str, np.ndarray] | Sequence[tuple[str, np.ndarray]],
               metadata: Mapping[str, object] | None = None, *, alignment: int = 32,
               raw_types: Mapping[str, int] | None = None) -> None:
    """Write a GGUF v3 file (`raw_types` marks uint8 arrays as blocks of a quantized type)."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    meta = dict(metadata or {})
    meta.setdefault("general.architecture", "edgewise-test")
    meta["general.alignment"] = alignment
    head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(items), len(meta)))
    for key, value in meta.items():
        if key == "general.alignment":
            head += _pack_string(key) + struct.pack("<II", 4, alignment)
        else:
            head += _pack_string(key) + _pack_value(value)
    offset = 0
    blobs = []
    for name, array in items:
        array = np.ascontiguousarray(array)
        ggml_type = (raw_types or {}).get(name, _NUMPY_TO_GGML.get(array.dtype))
        if ggml_type is None:
            raise TypeError(f"{name}: no GGML type for {array.dtype}")
        dims = list(reversed(array.shape)) or [1]  # GGUF lists the fastest dimension first
        head += _pack_string(name) + struct.pack("<I", len(dims))
        head += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ggml_type, offset)
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        pad = -len(data) % alignment
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    head += b"\0" * (-len(head) % alignment)
    with open(path, "wb") as f:
        f.write(head)
        for blob in blobs:
            f.write(blob)
