"""One measurement of a GGUF model: what the build writes into a bundle's contract and what the
device's health check compares with it, taken by the same code.

Invariant: the model is loaded at the bundle's context size and thread count; memory is the
resident-set growth from before the load to after the last generation (the serving instance,
not the separate perplexity pass); answers are greedy.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..artifacts import GoldenPrompt
from ._runtime import LlamaModel, answer_accepted, perplexity, proc_mb, rss_mb

__all__ = ["GoldenResult", "LlmMeasurement", "measure_llm", "measure_in_subprocess"]


@dataclass(frozen=True)
class GoldenResult:
    prompt: str
    answer: str
    passed: bool


@dataclass(frozen=True)
class LlmMeasurement:
    load_s: float
    memory_mb: float | None  # RSS growth of the serving instance
    prompt_tok_s: float
    gen_tok_s: float
    threads: int
    perplexity: float | None
    golden: tuple[GoldenResult, ...]
    peak_rss_mb: float | None = None  # the whole process's peak (a subprocess measurement)

    @property
    def golden_passed(self) -> int:
        return sum(g.passed for g in self.golden)

    def failed_prompts(self) -> list[GoldenResult]:
        return [g for g in self.golden if not g.passed]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LlmMeasurement:
        return cls(**{**data, "golden": tuple(GoldenResult(**g) for g in data["golden"])})


def measure_llm(path: Path | str, *, golden: Sequence[GoldenPrompt], eval_text: str | None,
                n_ctx: int, threads: int | None = None, gen_tokens: int = 63,
                lora_path: Path | str | None = None) -> LlmMeasurement:
    """Load (with the LoRA adapter `lora_path` applied, if given), answer the golden prompts,
    time prompt processing and generation, then score `eval_text` (None: skip perplexity;
    it is the base's alone, so it is measured without an adapter)."""
    before = rss_mb()
    t0 = time.perf_counter()
    model = LlamaModel(path, n_ctx=n_ctx, threads=threads, lora_path=lora_path)
    load_s = time.perf_counter() - t0
    try:
        results = []
        for g in golden:
            answer = model.answer(g.prompt, max_tokens=g.max_tokens)
            results.append(GoldenResult(g.prompt, answer, answer_accepted(answer, g.accept)))
        prompt_tokens = min(128, max(16, n_ctx // 4))
        speed = model.speed(prompt_tokens=prompt_tokens,
                            gen_tokens=min(gen_tokens, n_ctx - prompt_tokens))
        after = rss_mb()
    finally:
        model.close()
    ppl = (perplexity(path, eval_text, window=min(256, n_ctx), threads=speed.threads)
           if eval_text else None)
    return LlmMeasurement(
        load_s=round(load_s, 3),
        memory_mb=round(after - before, 1) if before is not None and after is not None else None,
        prompt_tok_s=round(speed.prompt_tok_s, 1), gen_tok_s=round(speed.gen_tok_s, 1),
        threads=speed.threads, perplexity=round(ppl, 3) if ppl is not None else None,
        golden=tuple(results))


def measure_in_subprocess(path: Path, *, golden: Sequence[GoldenPrompt], eval_text: str | None,
                          n_ctx: int, threads: int, timeout_s: float = 600) -> LlmMeasurement:
    """`measure_llm` in a fresh Python process, so its peak RSS is this model's alone."""
    import subprocess

    request = {"path": str(path), "golden": [g.model_dump() for g in golden],
               "eval_text": eval_text, "n_ctx": n_ctx, "threads": threads}
    proc = subprocess.run([sys.executable, "-m", "edgewise.llm._measure"],
                          input=json.dumps(request), capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    if proc.returncode != 0:
        from ._errors import LlmRuntimeError

        raise LlmRuntimeError(f"measuring {Path(path).name} failed: "
                              f"{proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    return LlmMeasurement.from_json(json.loads(proc.stdout.strip().splitlines()[-1]))


def _peak_rss_mb() -> float | None:
    """This process's resident high-water mark (VmHWM). Not getrusage's ru_maxrss: Linux
    carries that across fork and exec, so a child started from a large parent reports the
    parent's peak."""
    return proc_mb("/proc/self/status", "VmHWM")


def _main() -> None:
    request = json.loads(sys.stdin.read())
    m = measure_llm(request["path"], golden=[GoldenPrompt(**g) for g in request["golden"]],
                    eval_text=None, n_ctx=request["n_ctx"], threads=request["threads"])
    # Peak of serving (load, answers, generation), before the perplexity pass, which keeps
    # every position's logits and is not what the device runs.
    peak = _peak_rss_mb()
    ppl = (perplexity(request["path"], request["eval_text"],
                      window=min(256, request["n_ctx"]), threads=request["threads"])
           if request["eval_text"] else None)
    data = {**m.to_json(), "peak_rss_mb": round(peak, 1) if peak is not None else None,
            "perplexity": round(ppl, 3) if ppl is not None else None}
    sys.stdout.write(json.dumps(data) + "\n")


if __name__ == "__main__":
    _main()
