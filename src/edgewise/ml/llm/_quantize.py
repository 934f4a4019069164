"""`edgewise llm quantize`: real llama.cpp quantization of an LLM bundle, every candidate
measured on this CPU against the unquantized reference, and `fit` for a device profile.

Invariant: every candidate in a report was made and measured in the same run as its
reference (an F16 rebuilt from the bundle's GGUF), each in its own process so its peak RSS is
its own; a candidate that answers a golden prompt wrongly or whose perplexity passes the
bundle's bound is marked collapsed, and `fit_llm` never chooses a collapsed candidate,
whatever its size or speed.
"""

from __future__ import annotations

import ctypes
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ...artifacts import BundleError, LlmManifest, read_manifest
from ...llm import LlmError, LlmMeasurement, RuntimeUnavailable, free_cores, measure_in_subprocess
from ..errors import MLError
from ._build import BuildConfig, LlmBuildError, build_llm_bundle

__all__ = ["QUANT_TYPES", "LlmCandidate", "LlmFit", "LlmQuantReport", "fit_llm",
           "load_llm_report", "quantize_bundle", "quantize_gguf"]

# llama.cpp's file types (llama_ftype), by the names its quantize tool uses.
QUANT_TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
               "Q3_K_M", "Q2_K")
REFERENCE = "F16"
REPORT_KIND = "llm-quantize"


def quantize_gguf(src: Path, dst: Path, quant: str, *, threads: int | None = None) -> None:
    """llama.cpp's `llama-quantize` through its C API (requantizing a quantized file too)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise RuntimeUnavailable("llama-cpp-python is not installed") from exc
    name = quant.upper()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if name not in QUANT_TYPES or ftype is None:
        raise LlmBuildError(f"unknown quantization type {quant!r} (known: "
                            f"{', '.join(QUANT_TYPES)})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or free_cores()
    params.allow_requantize = True
    tmp = dst.with_name(f".{dst.name}.part")
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # llama.cpp prints a line per tensor
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                            ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise LlmBuildError(f"llama.cpp could not quantize {src.name} to {name} (code {rc})")
    tmp.replace(dst)


@dataclass(frozen=True)
class LlmCandidate:
    quant: str
    bundle: str
    file_mb: float
    ram_mb: float | None  # what the candidate's bundle says it needs (the device checks this)
    peak_rss_mb: float | None
    prompt_tok_s: float
    gen_tok_s: float
    threads: int
    perplexity: float | None
    golden_pass: float  # fraction of golden prompts answered acceptably
    golden_agree: float  # fraction answered exactly as the reference answers them
    collapsed: bool
    why: str  # why collapsed, or "ok"


@dataclass(frozen=True)
class LlmQuantReport:
    kind: str
    source: str
    reference: LlmCandidate
    candidates: list[LlmCandidate]
    max_perplexity: float
    threads: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _candidate(quant: str, bundle: Path, file: Path, m: LlmMeasurement,
               reference: LlmMeasurement | None, max_ppl: float,
               ram_mb: float | None = None) -> LlmCandidate:
    n = len(m.golden)
    agree = (sum(a.answer.strip() == b.answer.strip() for a, b in zip(m.golden, reference.golden,
                                                                       strict=True)) / n
             if reference is not None else 1.0)
    why = []
    if m.failed_prompts():
        why.append(f"{len(m.failed_prompts())}/{n} golden prompts wrong (e.g. "
                   f"{m.failed_prompts()[0].answer.strip()[:40]!r})")
    if m.perplexity is not None and m.perplexity > max_ppl:
        why.append(f"perplexity {m.perplexity:.1f} > {max_ppl:.1f}")
    return LlmCandidate(
        quant=quant, bundle=str(bundle), file_mb=round(file.stat().st_size / 1e6, 1),
        ram_mb=ram_mb, peak_rss_mb=m.peak_rss_mb, prompt_tok_s=m.prompt_tok_s,
        gen_tok_s=m.gen_tok_s,
        threads=m.threads, perplexity=m.perplexity, golden_pass=round(m.golden_passed / n, 3),
        golden_agree=round(agree, 3), collapsed=bool(why), why="; ".join(why) or "ok")


def quantize_bundle(bundle_dir: Path, out_dir: Path, *, types: Sequence[str],
                    threads: int | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> LlmQuantReport:
    """Quantize BUNDLE's model to each of `types`, measure each against the F16 reference,
    write each as a bundle (same name, version `V+type`) and a report to `out_dir`."""
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    try:
        manifest = read_manifest(bundle_dir)
    except BundleError as exc:
        raise LlmBuildError(str(exc)) from exc
    if not isinstance(manifest, LlmManifest):
        raise LlmBuildError(f"{bundle_dir} is not an LLM bundle (edgewise llm build makes one)")
    wanted = [t.upper() for t in types]
    unknown = [t for t in wanted if t not in QUANT_TYPES]
    if unknown or not wanted:
        raise LlmBuildError(f"unknown quantization types {', '.join(unknown) or '(none)'} "
                            f"(known: {', '.join(QUANT_TYPES)})")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise LlmBuildError(f"{out_dir} is not empty; choose a new output directory")
    spec = manifest.llm
    eval_text = (bundle_dir / spec.eval_text).read_text(encoding="utf-8")
    threads = threads or free_cores()
    files = out_dir / "files"
    files.mkdir(parents=True, exist_ok=True)
    steps = len(wanted) + 1
    tell = progress or (lambda _what, _done, _total: None)

    def measure(path: Path) -> LlmMeasurement:
        try:
            return measure_in_subprocess(path, golden=spec.golden, eval_text=eval_text,
                                         n_ctx=spec.n_ctx, threads=threads)
        except LlmError as exc:
            raise LlmBuildError(str(exc)) from exc

    tell(f"reference {REFERENCE}", 0, steps)
    ref_file = files / f"{REFERENCE}.gguf"
    quantize_gguf(bundle_dir / spec.model, ref_file, REFERENCE, threads=threads)
    ref_m = measure(ref_file)
    tell(f"measured {REFERENCE}", 1, steps)
    max_ppl = spec.max_perplexity
    reference = _candidate(REFERENCE, Path(""), ref_file, ref_m, None, max_ppl)
    candidates = []
    config = BuildConfig(name=manifest.name, n_ctx=spec.n_ctx, golden=spec.golden,
                         eval_text=eval_text, threads=threads, min_gen_tok_s=spec.min_gen_tok_s,
                         generation=spec.generation, require_golden=False)
    for i, quant in enumerate(wanted, start=2):
        tell(f"quantize {quant}", i - 1, steps)
        file = ref_file if quant == REFERENCE else files / f"{quant}.gguf"
        if quant != REFERENCE:
            quantize_gguf(ref_file, file, quant, threads=threads)
        m = ref_m if quant == REFERENCE else measure(file)
        version = f"{manifest.version}+{quant.lower()}"
        target = out_dir / "candidates" / quant
        # The candidate keeps the reference's contract: its bounds say what "healthy" means.
        build_llm_bundle(file, target, replace(config, version=version), measurement=m,
                         provenance={"quantized_from": manifest.release_name, "quant": quant})
        kept = _keep_perplexity_bound(target, spec.max_perplexity)
        candidates.append(_candidate(quant, target, file, m, ref_m, max_ppl,
                                     ram_mb=kept.llm.ram_mb))
        tell(f"measured {quant}", i, steps)
    report = LlmQuantReport(kind=REPORT_KIND, source=manifest.release_name,
                            reference=reference, candidates=candidates,
                            max_perplexity=max_ppl, threads=threads)
    (out_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    (out_dir / "report.md").write_text(_markdown(report))
    _plot(report, out_dir / "report.png")
    shutil.rmtree(files, ignore_errors=True)  # each candidate bundle holds its own copy
    return report


def _keep_perplexity_bound(bundle: Path, max_perplexity: float) -> LlmManifest:
    """A candidate inherits the source bundle's perplexity bound: its own measurement must
    not move the goalposts."""
    from ...artifacts import MANIFEST_NAME, parse_manifest, validate_bundle

    manifest = parse_manifest((bundle / MANIFEST_NAME).read_bytes())
    assert isinstance(manifest, LlmManifest)
    llm = manifest.llm.model_copy(update={"max_perplexity": max_perplexity})
    updated = manifest.model_copy(update={"llm": llm})
    (bundle / MANIFEST_NAME).write_text(updated.to_json())
    validate_bundle(bundle)
    return updated


def _markdown(report: LlmQuantReport) -> str:
    lines = [f"# Quantization of {report.source}", "",
             f"Measured on this machine at {report.threads} thread(s); reference: F16 rebuilt "
             f"from the bundle's file. Perplexity bound {report.max_perplexity:g}.", "",
             "| quant | file MB | RAM needed MB | peak RSS MB | prompt tok/s | gen tok/s | "
             "perplexity | golden pass | agrees with F16 | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in [report.reference, *report.candidates]:
        verdict = "reference" if c is report.reference else (
            f"**collapsed**: {c.why}" if c.collapsed else "ok")
        lines.append(f"| {c.quant} | {c.file_mb} | {c.ram_mb or '-'} | {c.peak_rss_mb} | "
                     f"{c.prompt_tok_s} | "
                     f"{c.gen_tok_s} | {c.perplexity} | {c.golden_pass:.0%} | "
                     f"{c.golden_agree:.0%} | {verdict} |")
    return "\n".join(lines) + "\n"


def _plot(report: LlmQuantReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for c in [report.reference, *report.candidates]:
        color = "tab:red" if c.collapsed else "tab:blue"
        ax1.scatter(c.file_mb, c.gen_tok_s, color=color)
        ax1.annotate(c.quant, (c.file_mb, c.gen_tok_s), fontsize=8)
        if c.perplexity is not None:
            ax2.scatter(c.file_mb, c.perplexity, color=color)
            ax2.annotate(c.quant, (c.file_mb, c.perplexity), fontsize=8)
    ax1.set(xlabel="file MB", ylabel="generation tokens/s", title="speed vs size")
    ax2.axhline(report.max_perplexity, color="tab:red", linestyle="--", linewidth=1)
    ax2.set(xlabel="file MB", ylabel="perplexity (held-out text)",
            title="quality vs size (red: collapsed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_llm_report(path: Path) -> LlmQuantReport:
    try:
        data = json.loads(Path(path).read_text())
        if data.get("kind") != REPORT_KIND:
            raise ValueError("not an LLM quantization report")
        return LlmQuantReport(
            kind=data["kind"], source=data["source"],
            reference=LlmCandidate(**data["reference"]),
            candidates=[LlmCandidate(**c) for c in data["candidates"]],
            max_perplexity=data["max_perplexity"], threads=data["threads"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MLError(f"{path}: not a readable LLM quantization report: {exc}") from exc


@dataclass(frozen=True)
class LlmFit:
    chosen: LlmCandidate
    fitting: list[str]
    explanation: list[str]


def fit_llm(report: LlmQuantReport, *, max_ram_mb: float | None = None,
            min_gen_tok_s: float | None = None, max_size_mb: float | None = None,
            slowdown: float = 1.0) -> LlmFit:
    """The best-quality (lowest perplexity) candidate that fits the device: the RAM its bundle
    says it needs (what the device's agent checks) within the device's, generation at least
    its floor once slowed by `slowdown` (device time / this machine's), file within its size
    budget. Collapsed candidates are never chosen."""
    explanation, fitting = [], []
    for c in report.candidates:
        reasons = []
        if c.collapsed:
            reasons.append(f"collapsed ({c.why})")
        if max_ram_mb is not None and (c.ram_mb is None or c.ram_mb > max_ram_mb):
            reasons.append(f"needs {c.ram_mb} MB of RAM > {max_ram_mb:g} MB" if c.ram_mb
                           else "RAM needed unknown")
        if min_gen_tok_s is not None and c.gen_tok_s / slowdown < min_gen_tok_s:
            reasons.append(f"{c.gen_tok_s / slowdown:.1f} tok/s on the device < "
                           f"{min_gen_tok_s:g}")
        if max_size_mb is not None and c.file_mb > max_size_mb:
            reasons.append(f"file {c.file_mb} MB > {max_size_mb:g} MB")
        explanation.append(f"{c.quant}: {'refused: ' + '; '.join(reasons) if reasons else 'fits'}")
        if not reasons:
            fitting.append(c)
    if not fitting:
        raise MLError("no candidate fits this device profile: " + " | ".join(explanation))
    best = min(fitting, key=lambda c: (c.perplexity or float("inf"), -c.gen_tok_s))
    explanation.append(f"chosen: {best.quant} (lowest perplexity of those that fit: "
                       f"{best.perplexity}, {best.gen_tok_s} tok/s, {best.file_mb} MB)")
    return LlmFit(chosen=best, fitting=[c.quant for c in fitting], explanation=explanation)
