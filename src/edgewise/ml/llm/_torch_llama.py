"""A compact Llama forward pass in torch, built from a GGUF file's own weights, with LoRA
adapters on its projections: what `edgewise llm finetune` trains.

Invariant: the model computes what llama.cpp computes for the same GGUF (checked by a test
against llama.cpp's logits): every shape and constant comes from the GGUF metadata, and the
weights stay in GGUF layout. llama.cpp's converter permutes the rows of `attn_q`/`attn_k` so
that RoPE rotates adjacent pairs (GPT-J style) instead of HF's two halves; this model rotates
adjacent pairs on the permuted rows, so a LoRA delta trained here applies to the GGUF tensors
as they are, without the inverse permutation `convert_lora_to_gguf.py` does for HF adapters.
Only the LoRA matrices are trainable; the base weights are dequantized once and frozen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MLError

__all__ = ["LORA_TARGETS", "LlamaConfig", "LoraLinear", "TorchLlama", "load_gguf_llama"]

# GGUF tensor names of the projections LoRA can adapt (llama.cpp's names, per block).
LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class LlamaConfig:
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    rms_eps: float
    rope_theta: float
    rope_dims: int
    context_length: int
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class LoraLinear(nn.Module):
    """A frozen weight W (out, in) plus a trainable low-rank delta: y = x W^T + s x A^T B^T,
    s = alpha / rank, as llama.cpp applies a GGUF LoRA adapter. B starts at zero, so an
    untrained adapter changes nothing."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.lora_a: nn.Parameter | None = None
        self.lora_b: nn.Parameter | None = None
        self.scale = 0.0

    def add_lora(self, rank: int, alpha: float, generator: torch.Generator) -> None:
        n_out, n_in = self.weight.shape
        a = torch.empty(rank, n_in)
        # PEFT's default: kaiming-uniform A (a=sqrt(5)), zero B.
        bound = 1 / math.sqrt(n_in)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.lora_a is not None and self.lora_b is not None:
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale
        return y


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class _Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, w: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("attn_norm", w["attn_norm"], persistent=False)
        self.register_buffer("ffn_norm", w["ffn_norm"], persistent=False)
        self.proj = nn.ModuleDict({name: LoraLinear(w[name]) for name in LORA_TARGETS})

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg, p = self.cfg, self.proj
        b, t, _ = x.shape
        h = _rms_norm(x, self.attn_norm, cfg.rms_eps)
        q = p["attn_q"](h).view(b, t, cfg.n_heads, cfg.head_dim)
        k = p["attn_k"](h).view(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = p["attn_v"](h).view(b, t, cfg.n_kv_heads, cfg.head_dim)
        q, k = _rope(q, cos, sin, cfg.rope_dims), _rope(k, cos, sin, cfg.rope_dims)
        group = cfg.n_heads // cfg.n_kv_heads  # head i reads kv head i // group, as llama.cpp
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + p["attn_output"](att.transpose(1, 2).reshape(b, t, cfg.d_model))
        h = _rms_norm(x, self.ffn_norm, cfg.rms_eps)
        return x + p["ffn_down"](F.silu(p["ffn_gate"](h)) * p["ffn_up"](h))


def _rope_tables(cfg: LlamaConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = cfg.rope_theta ** (-torch.arange(0, cfg.rope_dims, 2, dtype=torch.float64)
                             / cfg.rope_dims)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    return angles.cos().float(), angles.sin().float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims: int) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the first `dims` features (llama.cpp's
    LLAMA_ROPE_TYPE_NORM) by position x theta^(-2i/dims)."""
    rot, rest = x[..., :dims], x[..., dims:]
    pairs = rot.unflatten(-1, (dims // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


class TorchLlama(nn.Module):
    def __init__(self, cfg: LlamaConfig, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("token_embd", weights["token_embd"], persistent=False)
        self.register_buffer("output_norm", weights["output_norm"], persistent=False)
        self.register_buffer("output", weights.get("output", weights["token_embd"]),
                             persistent=False)
        self.blocks = nn.ModuleList(
            _Block(cfg, {k.split(".", 1)[1]: v for k, v in weights.items()
                         if k.startswith(f"{i}.")})
            for i in range(cfg.n_layers))
        self.rank = 0
        self.alpha = 0.0
        self.targets: tuple[str, ...] = ()

    def add_lora(self, *, rank: int, alpha: float, targets: Sequence[str],
                 seed: int = 0) -> None:
        unknown = sorted(set(targets) - set(LORA_TARGETS))
        if unknown or not targets:
            raise MLError(f"unknown LoRA target(s) {', '.join(unknown) or '(none)'}; choose "
                          f"from {', '.join(LORA_TARGETS)}")
        gen = torch.Generator().manual_seed(seed)
        for block in self.blocks:
            for name in targets:
                block.proj[name].add_lora(rank, alpha, gen)
        self.rank, self.alpha, self.targets = rank, alpha, tuple(targets)

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The adapter as llama.cpp names it: `blk.N.<proj>.weight.lora_a` (rank, n_in) and
        `.lora_b` (n_out, rank)."""
        state = {}
        for i, block in enumerate(self.blocks):
            for name in self.targets:
                lin = block.proj[name]
                assert lin.lora_a is not None and lin.lora_b is not None
                state[f"blk.{i}.{name}.weight.lora_a"] = lin.lora_a.detach().clone()
                state[f"blk.{i}.{name}.weight.lora_b"] = lin.lora_b.detach().clone()
        return state

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                for name in self.targets:
                    lin = block.proj[name]
                    assert lin.lora_a is not None and lin.lora_b is not None
                    lin.lora_a.copy_(state[f"blk.{i}.{name}.weight.lora_a"])
                    lin.lora_b.copy_(state[f"blk.{i}.{name}.weight.lora_b"])

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [B, T, d] for token ids [B, T] (causal, positions 0..T-1;
        right padding never affects the positions before it)."""
        x = F.embedding(tokens, self.token_embd)
        cos, sin = _rope_tables(self.cfg, tokens.shape[1])
        for block in self.blocks:
            x = block(x, cos, sin)
        return _rms_norm(x, self.output_norm, self.cfg.rms_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.output)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(tokens))


def _config(meta: dict, tensors: dict[str, object], path: Path) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise MLError(f"{path.name}: fine-tuning supports the llama architecture, not {arch!r}")

    def need(key: str):
        value = meta.get(f"llama.{key}")
        if value is None:
            raise MLError(f"{path.name}: no llama.{key} in the GGUF metadata")
        return value

    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise MLError(f"{path.name}: RoPE scaling {scaling!r} is not supported for fine-tuning")
    d_model, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    n_kv = int(meta.get("llama.attention.head_count_kv", n_heads))
    if d_model % n_heads or n_heads % n_kv:
        raise MLError(f"{path.name}: inconsistent head counts ({d_model=}, {n_heads=}, {n_kv=})")
    return LlamaConfig(
        n_layers=int(need("block_count")), d_model=d_model,
        d_ff=int(need("feed_forward_length")), n_heads=n_heads, n_kv_heads=n_kv,
        # gguf-py lists a tensor's shape in ggml order: [d_model, vocab].
        vocab=int(tensors["token_embd.weight"].shape[-1]),  # type: ignore[attr-defined]
        rms_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rope_dims=int(meta.get("llama.rope.dimension_count", d_model // n_heads)),
        context_length=int(meta.get("llama.context_length", 0)),
        tied_embeddings="output.weight" not in tensors)


def load_gguf_llama(path: Path | str) -> TorchLlama:
    """Dequantize every tensor of a llama GGUF (gguf-py, any type it decodes) into a frozen
    float32 `TorchLlama`."""
    import gguf
    import numpy as np

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # gguf-py raises ValueError, struct.error, ...
        raise MLError(f"{path.name}: unreadable GGUF: {exc}") from exc
    meta = {}
    for key, fld in reader.fields.items():
        if len(fld.types) == 1 and fld.types[0] != gguf.GGUFValueType.ARRAY:
            meta[key] = fld.contents()
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise MLError(f"{path.name}: no token_embd.weight tensor")
    cfg = _config(meta, by_name, path)
    weights: dict[str, torch.Tensor] = {}

    def load(name: str) -> torch.Tensor:
        t = by_name.get(name)
        if t is None:
            raise MLError(f"{path.name}: tensor {name} is missing")
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise MLError(f"{path.name}: gguf-py cannot decode {name} "
                          f"({t.tensor_type.name}): {exc}") from exc
        # gguf-py gives numpy order: [n_out, n_in] for a matrix, as torch's Linear wants.
        # A copy: F32 tensors come back as read-only views of the memory-mapped file.
        return torch.from_numpy(np.array(arr, dtype=np.float32))

    weights["token_embd"] = load("token_embd.weight")
    weights["output_norm"] = load("output_norm.weight")
    if not cfg.tied_embeddings:
        weights["output"] = load("output.weight")
    for i in range(cfg.n_layers):
        for name in ("attn_norm", "ffn_norm", *LORA_TARGETS):
            weights[f"{i}.{name}"] = load(f"blk.{i}.{name}.weight")
    expected = {"attn_q": (cfg.d_model, cfg.d_model),
                "attn_k": (cfg.n_kv_heads * cfg.head_dim, cfg.d_model),
                "ffn_down": (cfg.d_model, cfg.d_ff)}
    for name, shape in expected.items():
        if tuple(weights[f"0.{name}"].shape) != shape:
            raise MLError(f"{path.name}: blk.0.{name} has shape "
                          f"{tuple(weights[f'0.{name}'].shape)}, the metadata implies {shape}")
    model = TorchLlama(cfg, weights)
    model.requires_grad_(False)
    return model
