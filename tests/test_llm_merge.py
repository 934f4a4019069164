"""`merge_lora_gguf`: a LoRA adapter written into its base's weights (the dense change that
bench/llm_adapters.py sends through `edgewise delta`), on a small GGUF made here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgewise.ml.errors import MLError
from edgewise.ml.llm import merge_lora_gguf, read_lora_gguf, write_lora_gguf

RANK, ALPHA = 4, 8.0


def small_base(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    import gguf

    weights = {"blk.0.attn_q.weight": rng.normal(0, 0.05, (64, 96)).astype(np.float32),
               "blk.0.attn_k.weight": rng.normal(0, 0.05, (32, 96)).astype(np.float32),
               "blk.0.attn_norm.weight": rng.normal(1, 0.1, (96,)).astype(np.float32)}
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("small")
    writer.add_uint32("llama.block_count", 1)
    writer.add_tensor("blk.0.attn_q.weight",
                      gguf.quants.quantize(weights["blk.0.attn_q.weight"],
                                           gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_k.weight", weights["blk.0.attn_k.weight"].astype(np.float16))
    writer.add_tensor("blk.0.attn_norm.weight", weights["blk.0.attn_norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def tensors(path: Path):
    import gguf

    reader = gguf.GGUFReader(path, "r")
    return reader, {t.name: t for t in reader.tensors}


def test_the_adapter_is_merged_into_its_tensors_in_their_own_types(tmp_path: Path) -> None:
    import gguf

    rng = np.random.default_rng(0)
    small_base(tmp_path / "base.gguf", rng)
    state = {}
    for name, n_out in (("blk.0.attn_q.weight", 64), ("blk.0.attn_k.weight", 32)):
        state[f"{name}.lora_a"] = torch.from_numpy(rng.normal(0, 0.3, (RANK, 96)))
        state[f"{name}.lora_b"] = torch.from_numpy(rng.normal(0, 0.3, (n_out, RANK)))
    write_lora_gguf(tmp_path / "lora.gguf", state, alpha=ALPHA, architecture="llama",
                    name="small-lora")
    lora, _meta = read_lora_gguf(tmp_path / "lora.gguf")

    merged = merge_lora_gguf(tmp_path / "base.gguf", tmp_path / "lora.gguf",
                             tmp_path / "merged.gguf")
    assert merged == ["blk.0.attn_k.weight", "blk.0.attn_q.weight"]
    base_reader, old = tensors(tmp_path / "base.gguf")
    new_reader, new = tensors(tmp_path / "merged.gguf")
    for name in merged:
        assert new[name].tensor_type == old[name].tensor_type
        assert new[name].data.nbytes == old[name].data.nbytes
        before = gguf.quants.dequantize(old[name].data, old[name].tensor_type)
        after = gguf.quants.dequantize(new[name].data, new[name].tensor_type)
        change = (ALPHA / RANK) * (lora[f"{name}.lora_b"].astype(np.float32)
                                   @ lora[f"{name}.lora_a"].astype(np.float32))
        # Exact up to re-encoding: Q8_0 rounds to 1/254 of a block's range, F16 to 2^-11.
        step = np.abs(before + change).max() / 100
        assert np.abs(after - (before + change)).max() < step
        assert np.abs(change).max() > 10 * step  # the check above would see a missed merge
    norm = "blk.0.attn_norm.weight"
    assert bytes(new[norm].data) == bytes(old[norm].data)
    assert new_reader.fields["general.name"].contents() == "small"
    assert new_reader.fields["llama.block_count"].contents() == 1


def test_an_adapter_for_other_tensors_is_refused_and_nothing_is_written(
        tmp_path: Path) -> None:
    small_base(tmp_path / "base.gguf", np.random.default_rng(1))
    write_lora_gguf(tmp_path / "lora.gguf", {
        "blk.7.attn_q.weight.lora_a": torch.zeros(RANK, 96),
        "blk.7.attn_q.weight.lora_b": torch.zeros(64, RANK)},
        alpha=ALPHA, architecture="llama", name="other")
    with pytest.raises(MLError, match="no base tensor blk.7.attn_q.weight"):
        merge_lora_gguf(tmp_path / "base.gguf", tmp_path / "lora.gguf",
                        tmp_path / "merged.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf", "lora.gguf"]
