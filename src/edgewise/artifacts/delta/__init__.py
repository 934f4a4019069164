"""Delta patches for model files: tensor-aware, streaming, verified (format v2).

    info = encode_delta(old_path, new_path, patch_path)      # server / operator side
    apply_delta(old_path, patch_path, out_path, expected_sha256=signed_hash)   # device side
    read_delta_header(patch_path)                             # hashes and sizes only

The encoder understands safetensors, ONNX (initializers stored as raw_data) and GGUF, matches
tensors by name (then by content), and codes each tensor, or each piece of a large one, as the
smallest of: copy, XOR / arithmetic difference of the bit patterns split into byte planes then
zstd, the float difference coded by bit length (rANS-coded lengths plus raw low bits; format
v2), raw byte planes then zstd, plain zstd. Bytes between tensors (and whole files of any
other format) are zstd-compressed against the old file's bytes. The decoder needs no parser;
it streams record by record with memory independent of the file size, and it refuses a wrong
base, a corrupt or truncated patch and an unknown version with a `DeltaError` subclass,
writing nothing.
"""

from .._errors import (
    DeltaBaseError,
    DeltaError,
    DeltaFormatError,
    DeltaResultError,
    DeltaTruncatedError,
    DeltaVersionError,
)
from ._decode import apply_delta, read_delta_header
from ._encode import encode_delta
from ._format import FORMAT_VERSION, READABLE_VERSIONS, DeltaInfo
from ._gguf import write_gguf
from ._layout import parse_layout

__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "DeltaBaseError",
    "DeltaError",
    "DeltaFormatError",
    "DeltaInfo",
    "DeltaResultError",
    "DeltaTruncatedError",
    "DeltaVersionError",
    "apply_delta",
    "encode_delta",
    "parse_layout",
    "read_delta_header",
    "write_gguf",
]
