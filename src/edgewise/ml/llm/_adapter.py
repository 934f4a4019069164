"""GGUF LoRA adapters in llama.cpp's format (what `convert_lora_to_gguf.py` writes).

Invariant: a file written here loads in llama.cpp beside its base: `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha`, the base's architecture, and for each adapted
tensor `<base tensor>.lora_a` with ggml shape ne=[n_in, rank] and `.lora_b` with
ne=[rank, n_out] (numpy shapes (rank, n_in) and (n_out, rank)); llama.cpp applies
W + (alpha / rank) B A. `merge_lora_gguf` writes that sum into the base's own tensors (a dense
change of every adapted weight, the way a full fine-tune is published). Files are written
beside their destination and renamed into place.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..errors import MLError

__all__ = ["merge_lora_gguf", "read_lora_gguf", "write_lora_gguf"]


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


def merge_lora_gguf(base: Path, adapter: Path, out: Path) -> list[str]:
    """Write `out`: the GGUF `base` with the adapter merged into its weights, W + (alpha /
    rank) B A, each merged tensor dequantized, summed in float32 and re-encoded in its own
    type (gguf-py: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, F16, BF16, F32), every other tensor and every
    metadata key byte-for-byte the base's. Returns the merged tensors' names."""
    import gguf

    base, out = Path(base), Path(out)
    lora, meta = read_lora_gguf(adapter)
    alpha = float(meta.get(gguf.Keys.Adapter.LORA_ALPHA, 0) or 0)
    pairs = {k.removesuffix(".lora_a") for k in lora if k.endswith(".lora_a")}
    tmp = out.with_name(f".{out.name}.part")
    try:
        reader = gguf.GGUFReader(base, "r")
        names = {t.name for t in reader.tensors}
        missing = sorted(pairs - names)
        if not pairs or missing:
            raise MLError(f"{Path(adapter).name} does not fit {base.name}: "
                          + (f"no base tensor {missing[0]}" if missing else "no LoRA tensors"))
        writer = gguf.GGUFWriter(str(tmp), arch=str(reader.fields[
            gguf.Keys.General.ARCHITECTURE].contents()), endianess=reader.endianess)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # the writer adds these itself
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        data = {}
        for t in reader.tensors:
            data[t.name] = t.data
            if t.name in pairs:
                data[t.name] = _merged(t, lora[f"{t.name}.lora_a"], lora[f"{t.name}.lora_b"],
                                       alpha)
            writer.add_tensor_info(t.name, data[t.name].shape, data[t.name].dtype,
                                   data[t.name].nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(data[t.name], tensor_endianess=reader.endianess)
        writer.close()
    except (ValueError, OSError, KeyError) as exc:
        tmp.unlink(missing_ok=True)
        raise MLError(f"cannot merge {Path(adapter).name} into {base.name}: {exc}") from exc
    except MLError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return sorted(pairs)


def _merged(tensor, a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    import gguf

    qtype = tensor.tensor_type
    try:
        weight = np.array(gguf.quants.dequantize(tensor.data, qtype), dtype=np.float32)
    except NotImplementedError as exc:
        raise MLError(f"gguf-py cannot decode {tensor.name} ({qtype.name})") from exc
    rank = a.shape[0]
    if a.shape != (rank, weight.shape[1]) or b.shape != (weight.shape[0], rank):
        raise MLError(f"{tensor.name}: LoRA shapes {b.shape} x {a.shape} do not fit the "
                      f"weight's {weight.shape}")
    scale = alpha / rank if alpha else 1.0  # llama.cpp: no alpha means scale 1
    weight += scale * (b.astype(np.float32) @ a.astype(np.float32))
    if qtype == gguf.GGMLQuantizationType.F32:
        return weight
    if qtype == gguf.GGMLQuantizationType.F16:
        return weight.astype(np.float16)
    try:
        return gguf.quants.quantize(weight, qtype)
    except NotImplementedError as exc:
        raise MLError(f"gguf-py cannot encode {tensor.name} as {qtype.name}: merge into an "
                      "F16 or Q8_0 copy of the base instead") from exc
