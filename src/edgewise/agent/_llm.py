"""LLM releases on the device: the llama.cpp backend of the runtime seam (`_runtime`).

Invariant: an LLM release commits only if it fits the device's RAM limit, answers every golden
prompt of its bundle, generates at least the bundle's tokens/s floor and stays within its
perplexity bound, all measured here by `edgewise.llm` with the cores that are free. Prompts
and answers of the device's users are never logged or reported; only the bundle's own golden
prompts appear in a health report.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import LlmManifest
from ..llm import LlamaModel, LlmError, RuntimeUnavailable, free_cores, measure_llm, proc_mb
from ._errors import HealthCheckFailed

__all__ = ["device_ram_mb", "llm_health_check", "load_llm"]


def device_ram_mb() -> float | None:
    """Memory available to a new model now (Linux MemAvailable), or None if unknown."""
    return proc_mb("/proc/meminfo", "MemAvailable")


def load_llm(bundle_dir: Path, manifest: LlmManifest, *, threads: int | None = None
             ) -> LlamaModel:
    try:
        return LlamaModel(Path(bundle_dir) / manifest.llm.model, n_ctx=manifest.llm.n_ctx,
                          threads=threads or free_cores())
    except RuntimeUnavailable as exc:
        raise HealthCheckFailed(str(exc)) from exc
    except LlmError as exc:
        raise HealthCheckFailed(f"llama.cpp cannot load {manifest.release_name}: {exc}") from exc


def llm_health_check(bundle_dir: Path, manifest: LlmManifest, *,
                     ram_limit_mb: float | None = None):
    from ._runtime import HealthReport

    spec = manifest.llm
    limit = ram_limit_mb if ram_limit_mb is not None else device_ram_mb()
    if limit is not None and spec.ram_mb > limit:
        # Refused before loading: a model that cannot fit must not push the device into swap
        # or the OOM killer while the old release is still serving.
        return HealthReport(False, 0.0, 0.0, 0.0, f"needs {spec.ram_mb:.0f} MB of RAM, the "
                            f"device allows {limit:.0f} MB", memory_mb=None,
                            extra={"ram_needed_mb": spec.ram_mb, "ram_limit_mb": limit})
    try:
        eval_text = (Path(bundle_dir) / spec.eval_text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HealthCheckFailed(f"unreadable evaluation text {spec.eval_text}: {exc}") from exc
    try:
        # Loaded inside, so the memory figure is the whole growth: weights, KV cache, buffers.
        m = measure_llm(Path(bundle_dir) / spec.model, golden=spec.golden, eval_text=eval_text,
                        n_ctx=spec.n_ctx, threads=free_cores())
    except RuntimeUnavailable as exc:
        raise HealthCheckFailed(str(exc)) from exc
    except (LlmError, ValueError, RuntimeError) as exc:  # llama.cpp's own errors too
        raise HealthCheckFailed(f"{manifest.release_name} failed to load or run: {exc}"
                                ) from exc
    reasons = []
    failed = m.failed_prompts()
    if failed:
        reasons.append(f"{len(failed)} of {len(m.golden)} golden prompts answered wrongly (e.g. "
                       f"{failed[0].prompt!r} -> {failed[0].answer.strip()[:60]!r})")
    if m.gen_tok_s < spec.min_gen_tok_s:
        reasons.append(f"generates {m.gen_tok_s:.1f} tokens/s < floor {spec.min_gen_tok_s:g}")
    if m.perplexity is not None and m.perplexity > spec.max_perplexity:
        reasons.append(f"perplexity {m.perplexity:.2f} > bound {spec.max_perplexity:g}")
    if limit is not None and m.memory_mb is not None and m.memory_mb > limit:
        reasons.append(f"uses {m.memory_mb:.0f} MB of RAM > the device's {limit:.0f} MB")
    return HealthReport(
        passed=not reasons, max_abs_diff=0.0,
        top1_agreement=m.golden_passed / len(m.golden),
        # Per generated token: what the rollout's latency gate compares across releases.
        p95_latency_ms=round(1000.0 / m.gen_tok_s, 3) if m.gen_tok_s else 0.0,
        reason="; ".join(reasons) or "ok", memory_mb=m.memory_mb,
        extra={"gen_tok_s": m.gen_tok_s, "prompt_tok_s": m.prompt_tok_s,
               "perplexity": m.perplexity, "threads": m.threads,
               "golden_passed": m.golden_passed, "golden_total": len(m.golden),
               "failed_golden": [{"prompt": g.prompt, "answer": g.answer[:200]}
                                 for g in failed]})
