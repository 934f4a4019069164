"""What a GGUF file says about the model in it, read without loading the model.

Invariant: `read_gguf_info` returns only for a file whose header parses and whose tensor data
lies entirely inside the file (a truncated download or copy is refused here, not halfway
through a load on the device); every failure is a `GgufError` that says what is wrong.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import GgufError

__all__ = ["GgufInfo", "read_gguf_info"]

# Metadata keys that make up the tokenizer (hashed together: a changed vocabulary or merge
# list changes what every prompt means, even when the weights are the same).
_TOKENIZER_PREFIX = "tokenizer.ggml."


@dataclass(frozen=True)
class GgufInfo:
    architecture: str
    name: str
    n_params: int
    file_type: str  # llama.cpp's name for the whole file's recipe, e.g. "Q4_K_M"
    tensor_types: dict[str, int]  # ggml type -> number of tensors stored in it
    tensor_bytes: dict[str, int]  # ggml type -> bytes of tensor data in it
    context_length: int
    chat_template: str | None
    tokenizer_sha256: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    file_bytes: int
    metadata: dict[str, Any] = field(default_factory=dict)  # the other scalar keys

    @property
    def chat_template_sha256(self) -> str | None:
        if self.chat_template is None:
            return None
        return hashlib.sha256(self.chat_template.encode()).hexdigest()


def _file_type_name(value: int | None) -> str:
    import gguf

    if value is None:
        return "unknown"
    try:
        name = gguf.LlamaFileType(value).name
    except ValueError:
        return f"type-{value}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def read_gguf_info(path: Path | str) -> GgufInfo:
    """Parse a GGUF file's header, key-values and tensor table (gguf-py, numpy only)."""
    import gguf
    import numpy as np

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise GgufError(f"{path}: cannot read: {exc}") from exc
    if magic != b"GGUF":
        raise GgufError(f"{path.name}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # gguf-py raises ValueError, struct.error, IndexError, ...
        raise GgufError(f"{path.name}: unreadable GGUF header or tensor table "
                        f"(truncated or corrupt?): {exc}") from exc

    scalars: dict[str, Any] = {}
    tokenizer = hashlib.sha256()
    for key, fld in reader.fields.items():
        if key.startswith(_TOKENIZER_PREFIX):
            tokenizer.update(key.encode())
            for part in fld.parts:
                tokenizer.update(np.ascontiguousarray(part).tobytes())
            continue
        if len(fld.types) == 1 and fld.types[0] != gguf.GGUFValueType.ARRAY:
            try:
                scalars[key] = fld.contents()
            except Exception:  # noqa: S112 - an odd key never decides anything here
                continue
    arch = scalars.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GgufError(f"{path.name}: no general.architecture in the GGUF metadata")

    types: Counter[str] = Counter()
    type_bytes: Counter[str] = Counter()
    n_params = 0
    data_end = 0
    for t in reader.tensors:
        n = int(np.prod(t.shape, dtype=np.int64))
        n_params += n
        types[t.tensor_type.name] += 1
        type_bytes[t.tensor_type.name] += int(t.n_bytes)
        data_end = max(data_end, int(t.data_offset) + int(t.n_bytes))
    if not reader.tensors:
        raise GgufError(f"{path.name}: holds no tensors (an adapter or vocabulary-only file?)")
    if data_end > size:
        raise GgufError(f"{path.name}: truncated: its tensor data runs to byte {data_end:,}, "
                        f"but the file has {size:,} bytes")

    def key(suffix: str, default: int = 0) -> int:
        value = scalars.get(f"{arch}.{suffix}", default)
        return int(value) if isinstance(value, int | float) else default

    vocab = key("vocab_size")
    if not vocab and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    template = scalars.pop("tokenizer.chat_template", None)
    if template is None and "tokenizer.chat_template" in reader.fields:
        template = reader.fields["tokenizer.chat_template"].contents()
    return GgufInfo(
        architecture=arch,
        name=str(scalars.get("general.name", path.stem)),
        n_params=n_params,
        file_type=_file_type_name(scalars.get("general.file_type")),
        tensor_types=dict(sorted(types.items())),
        tensor_bytes=dict(sorted(type_bytes.items())),
        context_length=key("context_length"),
        chat_template=template if isinstance(template, str) and template.strip() else None,
        tokenizer_sha256=tokenizer.hexdigest(),
        n_layers=key("block_count"),
        d_model=key("embedding_length"),
        n_heads=key("attention.head_count"),
        n_kv_heads=key("attention.head_count_kv") or key("attention.head_count"),
        vocab=vocab,
        file_bytes=size,
        metadata={k: v for k, v in scalars.items() if isinstance(v, int | float | str | bool)},
    )
