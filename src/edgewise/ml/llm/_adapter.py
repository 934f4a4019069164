"""GGUF LoRA adapters in llama.cpp's format (what `convert_lora_to_gguf.py` writes).

Invariant: a file written here loads in llama.cpp beside its base: `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha`, the base's architecture, and for each adapted
tensor `<base tensor>.lora_a` with ggml shape ne=[n_in, rank] and `.lora_b` with
ne=[rank, n_out] (numpy shapes (rank, n_in) and (n_out, rank)); llama.cpp applies
W + (alpha / rank) B A. The file is written beside its destination and renamed into place.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..errors import MLError

__all__ = ["read_lora_gguf", "write_lora_gguf"]


def write_lora_gguf(path: Path, state: Mapping[str, torch.Tensor], *, alpha: float,
                    architecture: str, name: str) -> int:
    """Write the adapter tensors (names as `TorchLlama.lora_state` gives them) as F16; returns
    the file's size in bytes."""
    import gguf

    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch=architecture)
        writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(name)
        for key, tensor in state.items():
            writer.add_tensor(key, tensor.detach().float().numpy().astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except (ValueError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise MLError(f"cannot write the adapter {path.name}: {exc}") from exc
    tmp.replace(path)
    return path.stat().st_size


def read_lora_gguf(path: Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """The adapter's tensors (numpy shapes) and scalar metadata, read back with gguf-py."""
    import gguf

    reader = gguf.GGUFReader(path, "r")
    meta = {k: f.contents() for k, f in reader.fields.items()
            if len(f.types) == 1 and f.types[0] != gguf.GGUFValueType.ARRAY}
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    return tensors, meta
