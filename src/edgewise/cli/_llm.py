"""`edgewise llm build`, `quantize` and `finetune`: thin wrappers over `edgewise.ml.llm`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ._common import console, fail, out, print_json, stage_progress
from ._compress import llm_app


def _golden_file(path: Path):
    """Golden prompts from JSON lines: {"prompt": ..., "accept": [...], "max_tokens": N}."""
    from pydantic import ValidationError

    from edgewise.artifacts import GoldenPrompt

    prompts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {path}: {exc}")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            prompts.append(GoldenPrompt.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as exc:
            fail(f"{path}:{n}: not a golden prompt ({{\"prompt\": ..., \"accept\": [...]}}): "
                 f"{str(exc).splitlines()[0]}")
    if not prompts:
        fail(f"{path} holds no golden prompts")
    return tuple(prompts)


@llm_app.command("build")
def build(
    gguf: Annotated[Path, typer.Option("--gguf", help="a local GGUF model file")],
    out_dir: Annotated[Path, typer.Option("--out", help="the bundle directory to write")],
    name: Annotated[str | None, typer.Option(help="bundle name [default: from the file]")]
    = None,
    version: str = "1.0.0",
    ctx: Annotated[int, typer.Option(help="context length the device runs with")] = 512,
    golden: Annotated[Path | None, typer.Option(help="golden prompts, JSON lines "
                                                "{\"prompt\", \"accept\": [...]} [default: "
                                                "five general-knowledge questions]")] = None,
    eval_text: Annotated[Path | None, typer.Option(help="held-out text for perplexity "
                                                   "[default: a text written for Edgewise]")]
    = None,
    threads: Annotated[int | None, typer.Option(help="[default: the cores free now]")] = None,
    min_tok_s: Annotated[float | None, typer.Option(help="generation floor the device must "
                                                    "reach [default: 1/4 of this machine's]")]
    = None,
    max_ppl_ratio: Annotated[float, typer.Option(help="perplexity bound = measured x this")]
    = 1.5,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Make an LLM bundle from a local GGUF: checked, measured, with its health contract."""
    from edgewise.ml.llm import (
        DEFAULT_EVAL_TEXT,
        DEFAULT_GOLDEN,
        BuildConfig,
        LlmBuildError,
        build_llm_bundle,
    )

    text = DEFAULT_EVAL_TEXT
    if eval_text is not None:
        try:
            text = eval_text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read {eval_text}: {exc}")
    config = BuildConfig(name=name, version=version, n_ctx=ctx,
                         golden=_golden_file(golden) if golden else DEFAULT_GOLDEN,
                         eval_text=text, threads=threads, min_gen_tok_s=min_tok_s,
                         max_perplexity_ratio=max_ppl_ratio)
    if not gguf.is_file():
        fail(f"{gguf}: no such file")
    try:
        with console.status(f"checking and measuring {gguf.name} ..."):
            manifest, m = build_llm_bundle(gguf, out_dir, config)
    except (LlmBuildError, ValueError) as exc:
        fail(str(exc))
    spec = manifest.llm
    if json_out:
        print_json({"bundle": str(out_dir), "release": manifest.release_name,
                    "llm": spec.model_dump(exclude={"chat_template"}),
                    "measured": m.to_json()})
        return
    out.print(f"[green]{manifest.release_name}[/] -> {out_dir}: {spec.architecture}, "
              f"{spec.n_params / 1e6:.0f}M params, {spec.file_type}")
    out.print(f"  golden {m.golden_passed}/{len(m.golden)}, {m.gen_tok_s} gen tok/s and "
              f"{m.prompt_tok_s} prompt tok/s on {m.threads} thread(s), perplexity "
              f"{m.perplexity}")
    out.print(f"  contract: RAM {spec.ram_mb:.0f} MB, >= {spec.min_gen_tok_s} tok/s, "
              f"perplexity <= {spec.max_perplexity}")


@llm_app.command("quantize")
def quantize(
    bundle: Annotated[Path, typer.Argument(help="an LLM bundle (edgewise llm build)")],
    types: Annotated[str, typer.Option(help="comma-separated llama.cpp types")]
    = "Q8_0,Q4_K_M,Q4_0",
    out_dir: Annotated[Path | None, typer.Option("--out", help="[default: BUNDLE-quantized]")]
    = None,
    threads: Annotated[int | None, typer.Option(help="the device's thread count [default: the "
                                                "cores free now]")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Quantize an LLM bundle with llama.cpp; measure every candidate against F16."""
    from edgewise.ml.errors import MLError
    from edgewise.ml.llm import quantize_bundle

    target = out_dir or bundle.with_name(bundle.name + "-quantized")
    try:
        with stage_progress() as (progress, _console):
            report = quantize_bundle(
                bundle, target, types=types.split(","), threads=threads,
                progress=lambda what, i, total: progress(f"candidates ({what})"[:24], i, total))
    except MLError as exc:
        fail(str(exc))
    if json_out:
        print_json(report.to_json())
        return
    out.print((target / "report.md").read_text())
    out.print(f"report: {target / 'report.md'}, {target / 'report.png'}; candidates under "
              f"{target / 'candidates'}")


@llm_app.command("finetune")
def finetune(
    base: Annotated[Path, typer.Option("--base", help="the LLM bundle to adapt "
                                       "(edgewise llm build)")],
    data: Annotated[Path, typer.Option("--data", help="chat JSON lines: {\"messages\": "
                                       "[{\"role\", \"content\"}, ...], \"accept\": [...]}; "
                                       "the loss counts the assistant's tokens")],
    out_dir: Annotated[Path, typer.Option("--out", help="OUT/run (checkpoints, MLflow, "
                                          "learning curve) and OUT/bundle (the adapter)")],
    rank: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha [default: 2 x rank]")] = None,
    targets: Annotated[str, typer.Option(help="comma-separated projections to adapt")]
    = "attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down",
    time_budget: Annotated[str, typer.Option("--time-budget", help="training time, e.g. "
                                             "90s, 10m")] = "10m",
    max_steps: Annotated[int | None, typer.Option(help="stop after this many steps")] = None,
    lr: Annotated[float, typer.Option(help="learning rate (AdamW)")] = 2e-3,
    batch_size: int = 8,
    val_fraction: Annotated[float, typer.Option(help="held-out share for validation")] = 0.2,
    eval_every: Annotated[int, typer.Option(help="steps between validations/checkpoints")]
    = 10,
    golden: Annotated[Path | None, typer.Option(help="golden prompts, JSON lines [default: "
                                                "validation rows with \"accept\"]")] = None,
    name: Annotated[str | None, typer.Option(help="[default: BASE-NAME-lora]")] = None,
    version: str = "1.0.0",
    seed: int = 0,
    threads: Annotated[int | None, typer.Option(help="[default: the cores free now]")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI [default: sqlite "
                                                     "under OUT/run]")] = None,
    no_track: Annotated[bool, typer.Option("--no-track", help="no MLflow run")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in OUT")] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """LoRA-fine-tune an LLM bundle on this CPU; write a GGUF adapter bundle."""
    from edgewise.ml.errors import MLError
    from edgewise.ml.llm import FinetuneConfig
    from edgewise.ml.llm import finetune as run_finetune
    from edgewise.ml.train import parse_duration

    try:
        budget_s = parse_duration(time_budget)
    except ValueError as exc:
        fail(str(exc))
    cfg = FinetuneConfig(
        base=str(base), data=str(data), out_dir=str(out_dir), rank=rank, alpha=alpha,
        targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
        time_budget_s=budget_s, max_steps=max_steps, lr=lr, batch_size=batch_size,
        val_fraction=val_fraction, eval_every=eval_every,
        golden=_golden_file(golden) if golden else None, name=name, version=version,
        seed=seed, threads=threads, tracking_uri=tracking_uri, track=not no_track,
        resume=resume)
    try:
        with stage_progress() as (progress, note):
            result = run_finetune(cfg, progress=progress, notify=note.print)
    except MLError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(f"interrupted; continue with: edgewise llm finetune ... --out {out_dir} --resume")
    if json_out:
        print_json({"bundle": str(result.bundle_dir) if result.bundle_dir else None,
                    "paused": result.paused, "run_id": result.run_id,
                    "metrics": result.metrics})
        return
    if result.manifest is None:
        out.print(f"paused; continue with --resume (run in {out_dir / 'run'})")
        return
    m, spec = result.metrics, result.manifest.adapter
    out.print(f"[green]{result.manifest.release_name}[/] -> {result.bundle_dir}: LoRA r{spec.rank} "
              f"for {spec.base_release}, {m['adapter_bytes'] / 2**20:.2f} MB")
    out.print(f"  {m['steps']} steps in {m['train_s']:.0f}s; validation loss "
              f"{m['base_val_loss']:.3f} -> {m['best_val_loss']:.3f} (step {m['best_step']})")
    out.print(f"  golden: {m['golden_passed']}/{m['golden_total']} with the adapter, "
              f"{m['golden_passed_base']} without; base golden kept "
              f"{m['base_golden_passed_with_adapter']}/{m['base_golden_total']}")
    out.print(f"  curve: {out_dir / 'run' / 'learning_curve.png'}; card: "
              f"{result.bundle_dir / 'MODEL_CARD.md'}")


def register(app: typer.Typer) -> None:
    """Commands attach to `edgewise llm` (owned by `_compress`)."""
