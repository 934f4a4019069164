"""`edgewise llm build`: a local GGUF file becomes an LLM bundle with a measured health contract.

Invariant: nothing is written unless every check passed (a whole GGUF, an architecture
llama.cpp loads, a chat template, and, unless told otherwise, its own golden prompts
answered); the bounds written into the bundle (RAM, tokens/s floor, perplexity) come from
measurements taken in this run on this machine.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ...artifacts import (
    BundleError,
    GenerationDefaults,
    GoldenPrompt,
    LlmManifest,
    LlmSpec,
    write_llm_bundle,
)
from ...llm import (
    GgufError,
    GgufInfo,
    LlmError,
    LlmMeasurement,
    free_cores,
    measure_llm,
    read_gguf_info,
)
from ..errors import MLError
from ._data import DEFAULT_EVAL_TEXT, DEFAULT_GOLDEN

__all__ = ["BuildConfig", "LlmBuildError", "build_llm_bundle", "inspect_gguf", "ram_needed_mb",
           "with_chat_template"]

MODEL_FILE = "model.gguf"
EVAL_FILE = "eval.txt"


class LlmBuildError(MLError):
    """A GGUF that cannot become a bundle (the message says why; nothing was written)."""


@dataclass(frozen=True)
class BuildConfig:
    name: str | None = None  # default: from the GGUF's file name
    version: str = "1.0.0"
    n_ctx: int = 512  # the context the device runs the model with
    golden: Sequence[GoldenPrompt] = DEFAULT_GOLDEN
    eval_text: str = DEFAULT_EVAL_TEXT
    threads: int | None = None  # default: the cores free now
    min_gen_tok_s: float | None = None  # default: a quarter of the rate measured here
    max_perplexity_ratio: float = 1.5  # the bound: perplexity measured here x this
    generation: GenerationDefaults = GenerationDefaults()
    # Quantization candidates are bundles too, whatever they answer: the report judges them,
    # and the device's health check refuses a broken one that gets shipped anyway.
    require_golden: bool = True


def inspect_gguf(gguf: Path) -> GgufInfo:
    try:
        info = read_gguf_info(gguf)
    except GgufError as exc:
        raise LlmBuildError(str(exc)) from exc
    if info.chat_template is None:
        raise LlmBuildError(f"{Path(gguf).name} has no chat template (tokenizer.chat_template): "
                            "the device's chat API needs one; use an instruct/chat model")
    return info


def ram_needed_mb(info: GgufInfo, *, n_ctx: int) -> float:
    """The existing GGUF memory arithmetic (`ml.compress._llm`), with the file's exact tensor
    bytes as the weights: weights + F16 KV cache at `n_ctx` + compute buffer + runtime."""
    from ..compress._llm import LLMShape, estimate_memory

    d_ff = int(info.metadata.get(f"{info.architecture}.feed_forward_length", 4 * info.d_model))
    shape = LLMShape(n_layers=max(1, info.n_layers), d_model=max(1, info.d_model), d_ff=d_ff,
                     n_heads=max(1, info.n_heads), n_kv_heads=max(1, info.n_kv_heads),
                     vocab=max(1, info.vocab))
    est = estimate_memory(ftype="F16", shape=shape, context=n_ctx)
    weights = sum(info.tensor_bytes.values())
    return round((weights + est.kv_cache_bytes + est.overhead_bytes) / 2**20, 1)


def _slug(path: Path) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-._")
    return slug[:64] or "llm"


def build_llm_bundle(gguf: Path, out_dir: Path, config: BuildConfig = BuildConfig(),
                     *, measurement: LlmMeasurement | None = None,
                     provenance: dict | None = None) -> tuple[LlmManifest, LlmMeasurement]:
    """Check and measure `gguf`, then write the bundle to `out_dir` (which must not exist)."""
    gguf, out_dir = Path(gguf), Path(out_dir)
    if out_dir.exists():
        raise LlmBuildError(f"{out_dir} already exists; choose a new output directory")
    info = inspect_gguf(gguf)
    if info.context_length and config.n_ctx > info.context_length:
        raise LlmBuildError(f"context {config.n_ctx} is longer than the model was trained for "
                            f"({info.context_length})")
    threads = config.threads or free_cores()
    if measurement is None:
        try:
            measurement = measure_llm(gguf, golden=config.golden, eval_text=config.eval_text,
                                      n_ctx=config.n_ctx, threads=threads)
        except LlmError as exc:  # llama.cpp cannot load it: an architecture it lacks, ...
            raise LlmBuildError(str(exc)) from exc
    failed = measurement.failed_prompts()
    if failed and config.require_golden:
        lines = "; ".join(f"{g.prompt!r} -> {g.answer[:80]!r}" for g in failed)
        raise LlmBuildError(f"the model fails {len(failed)} of its {len(measurement.golden)} "
                            f"golden prompts, so its health check could never pass: {lines}")
    if measurement.perplexity is None:
        raise LlmBuildError("no perplexity measured: give an evaluation text")

    estimate = ram_needed_mb(info, n_ctx=config.n_ctx)
    measured = measurement.peak_rss_mb or measurement.memory_mb or 0.0
    min_tok_s = (config.min_gen_tok_s if config.min_gen_tok_s is not None
                 else round(measurement.gen_tok_s / 4, 1))
    spec = LlmSpec(
        model=MODEL_FILE, architecture=info.architecture, n_params=info.n_params,
        file_type=info.file_type, tensor_types=info.tensor_types,
        context_length=info.context_length, n_ctx=config.n_ctx,
        chat_template=info.chat_template or "",
        chat_template_sha256=info.chat_template_sha256 or "",
        tokenizer_sha256=info.tokenizer_sha256, generation=config.generation,
        # The arithmetic, unless this run measured more (then what was measured, +10%).
        ram_mb=max(estimate, round(measured * 1.1, 1)),
        min_gen_tok_s=min_tok_s, golden=tuple(config.golden), eval_text=EVAL_FILE,
        max_perplexity=round(measurement.perplexity * config.max_perplexity_ratio, 3),
        reference={"ram_estimate_mb": estimate, "memory_mb": measurement.memory_mb,
                   "peak_rss_mb": measurement.peak_rss_mb,
                   "prompt_tok_s": measurement.prompt_tok_s,
                   "gen_tok_s": measurement.gen_tok_s, "threads": threads,
                   "perplexity": measurement.perplexity,
                   "golden_passed": f"{measurement.golden_passed}/{len(measurement.golden)}",
                   "machine": platform.machine(), "cores": os.cpu_count() or 1})
    # Written next to the destination, renamed into place: a failure leaves nothing behind.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        manifest = write_llm_bundle(
            staging / "bundle", name=config.name or _slug(gguf), version=config.version,
            llm=spec, gguf=gguf, eval_text=config.eval_text,
            extra_files={"MODEL_CARD.md": _model_card(info, spec, measurement).encode()},
            metrics={"perplexity": measurement.perplexity, "gen_tok_s": measurement.gen_tok_s,
                     "golden_passed": measurement.golden_passed,
                     "golden_total": len(measurement.golden)},
            provenance={"source": gguf.name, "gguf_name": info.name, **(provenance or {})})
        (staging / "bundle").rename(out_dir)
    except (BundleError, ValueError) as exc:
        raise LlmBuildError(f"cannot write the bundle: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest, measurement


def _model_card(info: GgufInfo, spec: LlmSpec, m: LlmMeasurement) -> str:
    rows = "\n".join(f"| {g.prompt} | {g.answer.strip()[:60]} | {'yes' if g.passed else 'NO'} |"
                     for g in m.golden)
    return f"""# {info.name}

A {info.architecture} model with {info.n_params / 1e6:.1f}M parameters, stored as {info.file_type}
({', '.join(f'{n} x {t}' for t, n in info.tensor_types.items())}), trained for a context of
{info.context_length} tokens; the device runs it with {spec.n_ctx}.

## Health contract (checked on the device after every install)

- fits in {spec.ram_mb:.0f} MB of RAM (estimate; {m.memory_mb} MB measured at build)
- generates at least {spec.min_gen_tok_s} tokens/s ({m.gen_tok_s} measured at build on
  {m.threads} thread(s))
- perplexity at most {spec.max_perplexity} on the held-out text ({m.perplexity} at build)
- answers its golden prompts:

| prompt | answer at build | passed |
|---|---|---|
{rows}
"""


def with_chat_template(src: Path, dst: Path, template: str) -> None:
    """A copy of the GGUF `src` whose chat template is `template`, every other key and every
    tensor byte-identical: the update users of other tools re-download whole models for,
    shipped as a small delta."""
    import gguf

    if not template.strip():
        raise LlmBuildError("the chat template is empty")
    info = inspect_gguf(src)
    tmp = Path(dst).with_name(f".{Path(dst).name}.part")
    try:
        reader = gguf.GGUFReader(src, "r")
        writer = gguf.GGUFWriter(str(tmp), arch=info.architecture, endianess=reader.endianess)
        for field in reader.fields.values():
            # The writer adds the architecture and GGUF.* itself; the template is replaced.
            if (field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.")
                    or field.name.startswith(gguf.Keys.Tokenizer.CHAT_TEMPLATE)):
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        writer.add_chat_template(template)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes,
                                   t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        writer.close()
    except (ValueError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise LlmBuildError(f"cannot rewrite {Path(src).name}: {exc}") from exc
    tmp.replace(dst)
