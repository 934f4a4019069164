"""LLM releases on the device: the llama.cpp backend of the runtime seam (`_runtime`).

Invariant: an LLM release commits only if it fits the device's RAM limit, answers every golden
prompt of its bundle, generates at least the bundle's tokens/s floor and stays within its
perplexity bound, all measured here by `edgewise.llm` with the cores that are free. Prompts
and answers of the device's users are never logged or reported; only the bundle's own golden
prompts appear in a health report.

An adapter release (`LlmAdapterManifest`) occupies a slot like any release, and that slot holds
everything it runs: the adapter bundle as downloaded, plus `base.gguf`, a hard link to the base
GGUF the adapter was trained on (checked by sha256 when it is linked), and `base.json`, the base
release's manifest (its chat contract and golden prompts). A later install into the other slot
(a new base, another adapter) or a rollback can therefore never leave a committed adapter
without its base, and the base's bytes are stored once however many slots link them.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import (
    MANIFEST_NAME,
    BundleError,
    LlmAdapterManifest,
    LlmManifest,
    Manifest,
    parse_manifest,
)
from ..llm import LlamaModel, LlmError, RuntimeUnavailable, free_cores, measure_llm, proc_mb
from ._errors import HealthCheckFailed

__all__ = ["BASE_GGUF", "BASE_MANIFEST", "adapter_base", "adapter_health_check",
           "device_ram_mb", "llm_base", "llm_health_check", "load_adapter_llm", "load_llm"]

BASE_GGUF = "base.gguf"  # in an adapter's slot: a hard link to the base GGUF
BASE_MANIFEST = "base.json"  # in an adapter's slot: the base release's edgewise.json


def llm_base(slot_dir: Path, manifest: Manifest | None) -> tuple[str, Path, Path] | None:
    """The base model a slot runs, as an adapter would name it: (the GGUF's sha256 as signed,
    the GGUF, the base release's manifest file); None when the slot runs no LLM."""
    if isinstance(manifest, LlmManifest):
        return (manifest.files[manifest.llm.model].sha256, slot_dir / manifest.llm.model,
                slot_dir / MANIFEST_NAME)
    if isinstance(manifest, LlmAdapterManifest):  # another adapter on the same base
        return manifest.adapter.base_sha256, slot_dir / BASE_GGUF, slot_dir / BASE_MANIFEST
    return None


def adapter_base(slot_dir: Path) -> LlmManifest:
    """The base release's manifest kept in an adapter's slot."""
    try:
        base = parse_manifest((Path(slot_dir) / BASE_MANIFEST).read_bytes())
    except (OSError, BundleError) as exc:
        raise HealthCheckFailed(f"the adapter's slot holds no readable base manifest: {exc}"
                                ) from exc
    if not isinstance(base, LlmManifest):
        raise HealthCheckFailed(f"the adapter's base {base.release_name} is not an LLM")
    return base


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


def load_adapter_llm(slot_dir: Path, manifest: LlmAdapterManifest, *,
                     threads: int | None = None) -> tuple[LlamaModel, LlmManifest]:
    """The base GGUF of an adapter's slot with the adapter applied, at the base's context
    size; and the base's manifest (its chat contract)."""
    base = adapter_base(slot_dir)
    try:
        model = LlamaModel(Path(slot_dir) / BASE_GGUF, n_ctx=base.llm.n_ctx,
                           threads=threads or free_cores(),
                           lora_path=Path(slot_dir) / manifest.adapter.adapter)
    except RuntimeUnavailable as exc:
        raise HealthCheckFailed(str(exc)) from exc
    except LlmError as exc:
        raise HealthCheckFailed(f"llama.cpp cannot load {manifest.release_name} on "
                                f"{base.release_name}: {exc}") from exc
    return model, base


def adapter_health_check(slot_dir: Path, manifest: LlmAdapterManifest, *,
                         ram_limit_mb: float | None = None):
    """Base + adapter, loaded as the local API will serve them, must answer the adapter's
    golden prompts (the new behaviour) and the base's own (the general ability kept),
    generate at least the base's tokens/s floor and fit the device's RAM."""
    from ._runtime import HealthReport

    base = adapter_base(slot_dir)
    spec = manifest.adapter
    adapter_mb = (Path(slot_dir) / spec.adapter).stat().st_size / 2**20
    # llama.cpp turns mmap off with an adapter: the base's weights are read into RAM too,
    # which `ram_mb` (measured as resident memory) already counts.
    need_mb = base.llm.ram_mb + adapter_mb
    limit = ram_limit_mb if ram_limit_mb is not None else device_ram_mb()
    if limit is not None and need_mb > limit:
        return HealthReport(False, 0.0, 0.0, 0.0, f"needs {need_mb:.0f} MB of RAM with the "
                            f"adapter, the device allows {limit:.0f} MB", memory_mb=None,
                            extra={"ram_needed_mb": need_mb, "ram_limit_mb": limit})
    golden = (*spec.golden, *base.llm.golden)
    try:
        m = measure_llm(Path(slot_dir) / BASE_GGUF, golden=golden, eval_text=None,
                        n_ctx=base.llm.n_ctx, threads=free_cores(),
                        lora_path=Path(slot_dir) / spec.adapter)
    except RuntimeUnavailable as exc:
        raise HealthCheckFailed(str(exc)) from exc
    except (LlmError, ValueError, RuntimeError) as exc:
        raise HealthCheckFailed(f"{manifest.release_name} on {base.release_name} failed to "
                                f"load or run: {exc}") from exc
    own, kept = m.golden[:len(spec.golden)], m.golden[len(spec.golden):]
    reasons = []
    for what, results in (("adapter", own), ("base", kept)):
        failed = [g for g in results if not g.passed]
        if failed:
            reasons.append(f"{len(failed)} of {len(results)} {what} golden prompts answered "
                           f"wrongly with the adapter (e.g. {failed[0].prompt!r} -> "
                           f"{failed[0].answer.strip()[:60]!r})")
    if m.gen_tok_s < base.llm.min_gen_tok_s:
        reasons.append(f"generates {m.gen_tok_s:.1f} tokens/s < the base's floor "
                       f"{base.llm.min_gen_tok_s:g}")
    if limit is not None and m.memory_mb is not None and m.memory_mb > limit:
        reasons.append(f"uses {m.memory_mb:.0f} MB of RAM > the device's {limit:.0f} MB")
    failed = m.failed_prompts()
    return HealthReport(
        passed=not reasons, max_abs_diff=0.0,
        top1_agreement=m.golden_passed / len(m.golden),
        p95_latency_ms=round(1000.0 / m.gen_tok_s, 3) if m.gen_tok_s else 0.0,
        reason="; ".join(reasons) or "ok", memory_mb=m.memory_mb,
        extra={"gen_tok_s": m.gen_tok_s, "prompt_tok_s": m.prompt_tok_s, "threads": m.threads,
               "base": base.release_name, "adapter_mb": round(adapter_mb, 2),
               "golden_passed": m.golden_passed, "golden_total": len(m.golden),
               "adapter_golden_passed": sum(g.passed for g in own),
               "adapter_golden_total": len(own),
               "base_golden_passed": sum(g.passed for g in kept), "base_golden_total": len(kept),
               "failed_golden": [{"prompt": g.prompt, "answer": g.answer[:200]}
                                 for g in failed]})
