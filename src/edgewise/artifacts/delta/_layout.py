"""Where the tensors are: parsers for safetensors, ONNX and GGUF, used by the encoder only.

Invariant: a parser either returns spans that are sorted, non-overlapping and inside the file,
or None (the file is then treated as opaque bytes). A parser never raises on malformed input:
the encoder must work on any file, and the decoder never needs a parser at all, because a
patch only says "copy / transform these old bytes", never "find tensor X".
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass

__all__ = ["Layout", "Span", "parse_layout"]

_MAX_HEADER = 256 << 20


@dataclass(frozen=True)
class Span:
    name: str
    start: int
    end: int
    elem: int  # element size in bytes (1 for quantized blocks and unknown types)
    is_float: bool
    mantissa: int = 0  # mantissa bits of a 16/32-bit float type (exponent above them); else 0

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Layout:
    kind: str  # "safetensors" | "onnx" | "gguf" | "opaque"
    spans: tuple[Span, ...]


_ST_DTYPES = {
    "F64": (8, True), "F32": (4, True), "F16": (2, True), "BF16": (2, True),
    "I64": (8, False), "I32": (4, False), "I16": (2, False), "I8": (1, False),
    "U64": (8, False), "U32": (4, False), "U16": (2, False), "U8": (1, False),
    "BOOL": (1, False), "F8_E4M3": (1, True), "F8_E5M2": (1, True),
}
_ST_MANTISSA = {"F32": 23, "F16": 10, "BF16": 7}


def _safetensors(buf: mmap.mmap | bytes) -> list[Span] | None:
    if len(buf) < 8:
        return None
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n < 2 or n > _MAX_HEADER or 8 + n > len(buf) or buf[8:9] != b"{":
        return None
    header = json.loads(bytes(buf[8:8 + n]))
    if not isinstance(header, dict):
        return None
    base = 8 + n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        elem, is_float = _ST_DTYPES.get(entry["dtype"], (1, False))
        spans.append(Span(name, base + int(begin), base + int(end), elem, is_float,
                          _ST_MANTISSA.get(entry["dtype"], 0)))
    return spans


# --- ONNX: just enough protobuf wire format to find TensorProto.raw_data ---------------------

_ONNX_TYPES = {
    1: (4, True), 2: (1, False), 3: (1, False), 4: (2, False), 5: (2, False), 6: (4, False),
    7: (8, False), 9: (1, False), 10: (2, True), 11: (8, True), 12: (4, False),
    13: (8, False), 16: (2, True),
}
_ONNX_MANTISSA = {1: 23, 10: 10, 16: 7}  # FLOAT, FLOAT16, BFLOAT16


def _pb_varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("bad varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _pb_fields(buf, pos: int, end: int):
    """Yield (field number, wire type, value or (start, end) for length-delimited)."""
    while pos < end:
        key, pos = _pb_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _pb_varint(buf, pos, end)
            yield number, wire, value
        elif wire == 1:
            pos += 8
            yield number, wire, None
        elif wire == 2:
            length, pos = _pb_varint(buf, pos, end)
            if pos + length > end:
                raise ValueError("field past end")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire == 5:
            pos += 4
            yield number, wire, None
        else:
            raise ValueError(f"wire type {wire}")
    if pos != end:
        raise ValueError("message overruns")


def _onnx_tensor(buf, start: int, end: int) -> Span | None:
    name = ""
    dtype = 0
    raw = None
    for number, _wire, value in _pb_fields(buf, start, end):
        if number == 8 and isinstance(value, tuple):
            name = bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")
        elif number == 2 and isinstance(value, int):
            dtype = value
        elif number == 9 and isinstance(value, tuple):
            raw = value
    if raw is None or raw[1] == raw[0]:
        return None
    elem, is_float = _ONNX_TYPES.get(dtype, (1, False))
    if (raw[1] - raw[0]) % elem:
        return Span(name, raw[0], raw[1], 1, False)
    return Span(name, raw[0], raw[1], elem, is_float, _ONNX_MANTISSA.get(dtype, 0))


def _onnx(buf) -> list[Span] | None:
    end = len(buf)
    # ModelProto starts with ir_version (field 1, varint): key byte 0x08.
    if end < 2 or buf[0] != 0x08:
        return None
    spans: list[Span] = []
    seen_graph = False
    for number, _wire, value in _pb_fields(buf, 0, end):
        if number != 7 or not isinstance(value, tuple):  # ModelProto.graph
            continue
        seen_graph = True
        for gnum, _gw, gval in _pb_fields(buf, value[0], value[1]):
            if gnum == 5 and isinstance(gval, tuple):  # GraphProto.initializer
                span = _onnx_tensor(buf, *gval)
                if span is not None:
                    spans.append(span)
    return spans if seen_graph else None


def _gguf(buf) -> list[Span] | None:
    from ._gguf import read_gguf_spans

    return read_gguf_spans(buf)


def _checked(spans: list[Span] | None, size: int) -> tuple[Span, ...] | None:
    if spans is None:
        return None
    spans = sorted((s for s in spans if s.size > 0), key=lambda s: s.start)
    pos = 0
    for s in spans:
        if s.start < pos or s.end > size or s.end < s.start:
            return None
        pos = s.end
    return tuple(spans)


def parse_layout(buf: mmap.mmap | bytes) -> Layout:
    """The tensor spans of a safetensors, ONNX or GGUF file; opaque for anything else."""
    head = bytes(buf[:4])
    candidates = [("gguf", _gguf)] if head == b"GGUF" else [("safetensors", _safetensors),
                                                            ("onnx", _onnx)]
    for kind, parser in candidates:
        try:
            spans = _checked(parser(buf), len(buf))
        except (ValueError, KeyError, TypeError, IndexError, struct.error,
                UnicodeDecodeError, RecursionError):
            spans = None
        if spans:
            return Layout(kind, spans)
    return Layout("opaque", ())
