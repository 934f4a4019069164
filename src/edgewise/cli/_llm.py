"""`edgewise llm build` and `edgewise llm quantize`: thin wrappers over `edgewise.ml.llm`."""

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


def register(app: typer.Typer) -> None:
    """Commands attach to `edgewise llm` (owned by `_compress`)."""
