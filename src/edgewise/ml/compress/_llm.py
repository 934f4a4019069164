"""LLM memory calculator for GGUF quantization types: weights + KV cache + overhead.

Invariant: weight bytes are exact GGUF block arithmetic. Every ggml type stores blocks of
`block_size` weights in `block_bytes` bytes (layouts from ggml's `ggml-common.h`, e.g.
`block_q4_0 = {ggml_half d; uint8_t qs[16]}` = 18 bytes per 32 weights = 4.5 bits per weight),
and the llama.cpp "file types" (Q4_K_M, ...) are per-tensor mixtures reproduced from
`llama_tensor_get_type` for a Llama-layout model. Nothing here is an estimate except the
runtime overhead, which is labelled as such.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

__all__ = [
    "BITS_DEFAULT_FTYPE",
    "FILE_TYPES",
    "GGML_TYPES",
    "GGMLType",
    "LLMShape",
    "MemoryEstimate",
    "estimate_memory",
    "gguf_weight_bytes",
    "shape_from_params",
]


@dataclass(frozen=True)
class GGMLType:
    name: str
    block_size: int  # weights per block
    block_bytes: int  # bytes per block

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_size


_QK_K = 256  # super-block size of the k-quants and i-quants
# (name, block_size, block_bytes); the byte counts follow the struct layouts in ggml-common.h.
GGML_TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("F32", 1, 4),
    GGMLType("F16", 1, 2),
    GGMLType("BF16", 1, 2),
    GGMLType("Q8_0", 32, 2 + 32),            # d, qs[32]
    GGMLType("Q4_0", 32, 2 + 16),            # d, qs[16]
    GGMLType("Q4_1", 32, 2 + 2 + 16),        # d, m, qs[16]
    GGMLType("Q5_0", 32, 2 + 4 + 16),        # d, qh[4], qs[16]
    GGMLType("Q5_1", 32, 2 + 2 + 4 + 16),    # d, m, qh[4], qs[16]
    GGMLType("Q2_K", _QK_K, 16 + 64 + 2 + 2),          # scales[16], qs[64], d, dmin
    GGMLType("Q3_K", _QK_K, 32 + 64 + 12 + 2),         # hmask[32], qs[64], scales[12], d
    GGMLType("Q4_K", _QK_K, 2 + 2 + 12 + 128),         # d, dmin, scales[12], qs[128]
    GGMLType("Q5_K", _QK_K, 2 + 2 + 12 + 32 + 128),    # d, dmin, scales[12], qh[32], qs[128]
    GGMLType("Q6_K", _QK_K, 128 + 64 + 16 + 2),        # ql[128], qh[64], scales[16], d
    GGMLType("IQ4_NL", 32, 2 + 16),                    # d, qs[16]
    GGMLType("IQ4_XS", _QK_K, 2 + 2 + 4 + 128),        # d, scales_h, scales_l[4], qs[128]
)}


def _more_bits(layer: int, n: int) -> bool:
    # llama.cpp `use_more_bits`: first and last eighth of the layers, every third in between.
    return layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2


_Rule = Callable[[int, int], str]  # (layer, n_layers) -> ggml type name


@dataclass(frozen=True)
class _FileType:
    """A llama.cpp file type: the default tensor type, the LM head's, per-tensor overrides."""

    name: str
    base: str
    output: str  # output.weight (the LM head)
    rules: dict[str, _Rule] = field(default_factory=dict)  # tensor kind -> rule


def _when(test: Callable[[int, int], bool], yes: str, no: str) -> _Rule:
    return lambda layer, n: yes if test(layer, n) else no


# Reproduced from llama.cpp `llama_tensor_get_type` for a Llama-layout model without an
# importance matrix: output.weight is Q6_K for every type below 8 bits; the _M/_S recipes
# give some attn_v / ffn_down / attn_output tensors more bits.
FILE_TYPES: dict[str, _FileType] = {f.name: f for f in (
    _FileType("F32", "F32", "F32"),
    _FileType("F16", "F16", "F16"),
    _FileType("BF16", "BF16", "BF16"),
    _FileType("Q8_0", "Q8_0", "Q8_0"),
    _FileType("Q6_K", "Q6_K", "Q6_K"),
    _FileType("Q5_0", "Q5_0", "Q6_K"),
    _FileType("Q5_1", "Q5_1", "Q6_K"),
    _FileType("Q4_0", "Q4_0", "Q6_K"),
    _FileType("Q4_1", "Q4_1", "Q6_K"),
    _FileType("Q5_K_S", "Q5_K", "Q6_K"),
    _FileType("Q5_K_M", "Q5_K", "Q6_K", {"attn_v": _when(_more_bits, "Q6_K", "Q5_K"),
                                         "ffn_down": _when(_more_bits, "Q6_K", "Q5_K")}),
    _FileType("Q4_K_S", "Q4_K", "Q6_K", {"attn_v": _when(lambda i, n: i < 4, "Q5_K", "Q4_K"),
                                         "ffn_down": _when(lambda i, n: i < n // 8, "Q5_K",
                                                           "Q4_K")}),
    _FileType("Q4_K_M", "Q4_K", "Q6_K", {"attn_v": _when(_more_bits, "Q6_K", "Q4_K"),
                                         "ffn_down": _when(_more_bits, "Q6_K", "Q4_K")}),
    _FileType("Q3_K_S", "Q3_K", "Q6_K"),
    _FileType("Q3_K_M", "Q3_K", "Q6_K", {"attn_v": _when(lambda i, n: i < 2, "Q5_K", "Q4_K"),
                                         "ffn_down": _when(lambda i, n: i < n // 16, "Q5_K",
                                                           "Q4_K"),
                                         "attn_output": lambda i, n: "Q4_K"}),
    _FileType("IQ4_XS", "IQ4_XS", "Q6_K"),
    _FileType("IQ4_NL", "IQ4_NL", "Q6_K"),
)}

# What `--bits N` means when no type is named: the type people usually pick at that size.
BITS_DEFAULT_FTYPE = {3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0",
                      16: "F16", 32: "F32"}


@dataclass(frozen=True)
class LLMShape:
    """A Llama-layout decoder: the tensor shapes that decide weight and KV-cache sizes."""

    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def tensors(self) -> list[tuple[str, int, int, int]]:
        """(kind, layer, rows, cols) of every 2-D weight; norms (1-D, F32) come separately."""
        kv = self.n_kv_heads * self.head_dim
        out = [("token_embd", -1, self.vocab, self.d_model)]
        for i in range(self.n_layers):
            out += [("attn_q", i, self.d_model, self.d_model), ("attn_k", i, kv, self.d_model),
                    ("attn_v", i, kv, self.d_model), ("attn_output", i, self.d_model,
                                                      self.d_model),
                    ("ffn_gate", i, self.d_ff, self.d_model), ("ffn_up", i, self.d_ff,
                                                               self.d_model),
                    ("ffn_down", i, self.d_model, self.d_ff)]
        if not self.tied_embeddings:
            out.append(("output", -1, self.vocab, self.d_model))
        return out

    @property
    def norm_params(self) -> int:
        return (2 * self.n_layers + 1) * self.d_model

    @property
    def n_params(self) -> int:
        return sum(r * c for _, _, r, c in self.tensors()) + self.norm_params


# Shapes of well-known models (from their config.json), so the calculator can be checked
# against the sizes of GGUF files people actually download.
PRESETS: dict[str, LLMShape] = {
    "llama-2-7b": LLMShape(32, 4096, 11008, 32, 32, 32000),
    "llama-2-13b": LLMShape(40, 5120, 13824, 40, 40, 32000),
    "llama-3-8b": LLMShape(32, 4096, 14336, 32, 8, 128256),
    "mistral-7b": LLMShape(32, 4096, 14336, 32, 8, 32000),
    "llama-2-70b": LLMShape(80, 8192, 28672, 64, 8, 32000),
}


def shape_from_params(n_params: float) -> LLMShape:
    """A Llama-like shape of about `n_params` weights, when only the count is known.

    Assumes the Llama-2 proportions: head_dim 128, d_model = 128 x n_layers, d_ff = 2.6875 x
    d_model (12.06 d_model^2 weights per layer), a 32k vocabulary, untied embeddings, no GQA.
    """
    if n_params <= 0:
        raise ValueError("the parameter count must be positive")
    vocab, per_layer = 32000, 12.0625
    lo, hi = 1.0, 1e6  # solve per_layer * (d / 128) * d^2 + 2 * vocab * d = n_params for d
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if per_layer * mid ** 3 / 128 + 2 * vocab * mid > n_params else (mid,
                                                                                            hi)
    heads = max(1, round(lo / 128))
    d_model = heads * 128
    n_layers = max(1, round((n_params - 2 * vocab * d_model) / (per_layer * d_model ** 2)))
    return LLMShape(n_layers, d_model, round(2.6875 * d_model), heads, heads, vocab)


def _tensor_type(ftype: _FileType, kind: str, layer: int, n_layers: int) -> str:
    if kind == "output":
        return ftype.output
    rule = ftype.rules.get(kind)
    return rule(layer, n_layers) if rule else ftype.base


def _type_bytes(type_name: str, n: int) -> int:
    t = GGML_TYPES[type_name]
    if n % t.block_size:
        # A row that does not fill whole blocks cannot be stored in that type; llama.cpp falls
        # back to a wider type. F16 is the conservative stand-in.
        return 2 * n
    return n // t.block_size * t.block_bytes


def gguf_weight_bytes(shape: LLMShape, ftype_name: str) -> int:
    """Bytes of tensor data in a GGUF file of `shape` quantized as `ftype_name` (no header)."""
    ftype = _ftype(ftype_name)
    total = 4 * shape.norm_params  # 1-D norm weights stay F32 in every file type
    for kind, layer, rows, cols in shape.tensors():
        total += rows * _type_bytes(_tensor_type(ftype, kind, layer, shape.n_layers), cols)
    return total


def _ftype(name: str) -> _FileType:
    key = name.upper()
    if key not in FILE_TYPES:
        raise ValueError(f"unknown GGUF type {name!r} (known: {', '.join(FILE_TYPES)})")
    return FILE_TYPES[key]


_KV_BYTES = {"F32": 4.0, "F16": 2.0, "BF16": 2.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32}


@dataclass(frozen=True)
class MemoryEstimate:
    ftype: str
    n_params: int
    shape: dict
    bits_per_weight: float  # effective, over all weights of the file
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int  # estimate: compute buffers + runtime
    total_bytes: int
    context: int
    batch: int
    kv_type: str
    formula: str

    def as_dict(self) -> dict:
        return asdict(self)


def estimate_memory(*, ftype: str, shape: LLMShape, context: int, batch: int = 1,
                    kv_type: str = "F16", ubatch: int = 512,
                    runtime_overhead_mb: float = 150.0) -> MemoryEstimate:
    """Memory to run a GGUF model with llama.cpp-style inference at `context` tokens."""
    if context <= 0 or batch <= 0:
        raise ValueError("context and batch must be positive")
    kv_key = kv_type.upper()
    if kv_key not in _KV_BYTES:
        raise ValueError(f"unknown KV cache type {kv_type!r} (known: {', '.join(_KV_BYTES)})")
    weights = gguf_weight_bytes(shape, ftype)
    kv_dim = shape.n_kv_heads * shape.head_dim
    kv = math.ceil(2 * shape.n_layers * context * batch * kv_dim * _KV_BYTES[kv_key])
    # Compute buffer: the logits of one micro-batch (ubatch x vocab F32) plus the activations
    # of the widest layer for it (ubatch x (d_ff + attention scores over the context)), F32.
    compute = 4 * min(ubatch, context) * (shape.vocab + shape.d_ff + shape.n_heads * context)
    overhead = int(compute + runtime_overhead_mb * 2**20)
    n = shape.n_params
    return MemoryEstimate(
        ftype=_ftype(ftype).name, n_params=n, shape=asdict(shape),
        bits_per_weight=round(8 * weights / n, 4), weights_bytes=weights,
        kv_cache_bytes=kv, overhead_bytes=overhead, total_bytes=weights + kv + overhead,
        context=context, batch=batch, kv_type=kv_key,
        formula=("weights = sum over tensors of rows * cols / block_size * block_bytes; "
                 "kv = 2 * n_layers * context * batch * n_kv_heads * head_dim * bytes(kv_type); "
                 "overhead = 4 * min(ubatch, context) * (vocab + d_ff + n_heads * context) "
                 f"+ {runtime_overhead_mb:g} MiB runtime (estimate)"),
    )
