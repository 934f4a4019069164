"""The LLM memory calculator against hand-computed GGUF arithmetic and real file sizes."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from edgewise.cli import _app
from edgewise.ml.compress import (
    GGML_TYPES,
    PRESETS,
    LLMShape,
    estimate_memory,
    gguf_weight_bytes,
    shape_from_params,
)


@pytest.mark.parametrize(("name", "bpw"), [
    # bits per weight = 8 * block bytes / block size, from ggml-common.h's block structs
    ("F16", 16.0), ("Q8_0", 8.5), ("Q4_0", 4.5), ("Q4_1", 5.0), ("Q5_0", 5.5), ("Q5_1", 6.0),
    ("Q2_K", 2.625), ("Q3_K", 3.4375), ("Q4_K", 4.5), ("Q5_K", 5.5), ("Q6_K", 6.5625),
    ("IQ4_XS", 4.25),
])
def test_block_arithmetic(name: str, bpw: float) -> None:
    assert GGML_TYPES[name].bits_per_weight == bpw


def test_llama2_7b_param_count() -> None:
    # 32000 x 4096 embeddings and LM head, 32 layers of 4 x 4096^2 + 3 x 4096 x 11008, norms.
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008
    assert PRESETS["llama-2-7b"].n_params == 2 * 32000 * 4096 + 32 * per_layer + 65 * 4096


def test_q8_0_by_hand() -> None:
    shape = LLMShape(n_layers=2, d_model=64, d_ff=128, n_heads=2, n_kv_heads=2, vocab=96)
    matrices = 2 * 96 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128)
    # every 32 weights -> 34 bytes; 5 norm vectors of 64 stay F32
    assert gguf_weight_bytes(shape, "Q8_0") == matrices // 32 * 34 + 5 * 64 * 4


# File sizes of TheBloke/Llama-2-7B-GGUF as listed on its model page (GB = 1e9 bytes); the
# files also hold ~1 MB of metadata and vocabulary, well inside the 0.5 % tolerance.
PUBLISHED_LLAMA2_7B_GB = {"Q3_K_S": 2.95, "Q3_K_M": 3.30, "Q4_0": 3.83, "Q4_K_S": 3.86,
                          "Q4_K_M": 4.08, "Q5_0": 4.65, "Q5_K_S": 4.65, "Q5_K_M": 4.78,
                          "Q6_K": 5.53, "Q8_0": 7.16}


@pytest.mark.parametrize(("ftype", "gb"), sorted(PUBLISHED_LLAMA2_7B_GB.items()))
def test_matches_published_gguf_sizes(ftype: str, gb: float) -> None:
    got = gguf_weight_bytes(PRESETS["llama-2-7b"], ftype) / 1e9
    assert got == pytest.approx(gb, rel=0.005)


def test_kv_cache_by_hand() -> None:
    # Llama-2-7B, no GQA: 2 (K and V) x 32 layers x 4096 tokens x 4096 dims x 2 bytes = 2 GiB
    est = estimate_memory(ftype="Q4_K_M", shape=PRESETS["llama-2-7b"], context=4096)
    assert est.kv_cache_bytes == 2 * 2**30
    # Llama-3-8B has 8 KV heads of 128: a quarter of that per token
    est = estimate_memory(ftype="Q4_K_M", shape=PRESETS["llama-3-8b"], context=4096)
    assert est.kv_cache_bytes == 2 * 32 * 4096 * 1024 * 2
    q8 = estimate_memory(ftype="Q4_K_M", shape=PRESETS["llama-3-8b"], context=4096,
                         kv_type="Q8_0")
    assert q8.kv_cache_bytes == est.kv_cache_bytes * 34 // 64
    assert est.total_bytes == est.weights_bytes + est.kv_cache_bytes + est.overhead_bytes


def test_shape_from_params_is_close() -> None:
    for n in (1e9, 7e9, 13e9, 70e9):
        assert shape_from_params(n).n_params == pytest.approx(n, rel=0.1)


def test_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown GGUF type"):
        gguf_weight_bytes(PRESETS["llama-2-7b"], "Q4_K_X")


def test_cli_llm_size() -> None:
    runner = CliRunner()
    result = runner.invoke(_app.app, ["llm", "size", "--preset", "llama-2-7b", "--bits", "4",
                                      "--context", "4096", "--json"])
    assert result.exit_code == 0, result.output
    import json

    data = json.loads(result.stdout)
    assert data["ftype"] == "Q4_K_M"
    assert data["weights_bytes"] == gguf_weight_bytes(PRESETS["llama-2-7b"], "Q4_K_M")
    bad = runner.invoke(_app.app, ["llm", "size", "--params", "7e9", "--bits", "7"])
    assert bad.exit_code != 0
