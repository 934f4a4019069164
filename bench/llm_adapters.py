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
  {"bench": "llm-adapter-dense", "type", "merged_tensors", "full_gguf_bytes", "delta_bytes",
   "delta_fraction", "adapter_bytes", "adapter_bundle_bytes", "delta_over_adapter",
   "merged_correct", "held_out", "merge_s", "encode_s", "apply_s", "load_avg"}
        the same fine-tune as a dense change: the adapter merged into the base's weights
        (W + alpha/r B A in every adapted tensor) and published as a new GGUF, once in the
        base's Q4_1 and once in Q8_0 (against the base as Q8_0); what `edgewise delta` sends
        from the old GGUF to the new one, next to the adapter, and the merged model's answers
        to the held-out questions (llama.cpp)
  {"bench": "llm-adapter-delivery", "seconds_to_answer", "seconds_to_verdict", "state",
   "sent_bytes", "base_gguf_bytes", "health": {...}}
        a real server and agent daemon (its own local API) running the base: from the
        adapter release's assignment to the device's chat API answering a learned fact
        (poll, download, verify, install, activate, reload), and to the health check's
        verdict (committed, or rolled back)

    python bench/llm_adapters.py [--time-budget 10m] [--samples 240] [--rank 8] [--runs 3]
                                 [--poll-interval-s 1] [--adapter BUNDLE]
                                 [--parts measure,dense,deliver]

`--adapter` measures an adapter bundle already made by `edgewise llm finetune` from the
SmolLM2 bundle on `product_facts` (the lines but the training one); `--parts` picks what runs
after the fine-tune (e.g. `--parts dense`).
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

from llm import emit, smollm2  # noqa: E402  (bench/llm.py: the same model, same lines)

from edgewise.artifacts import file_sha256, validate_bundle  # noqa: E402
from edgewise.artifacts.delta import apply_delta, encode_delta  # noqa: E402
from edgewise.llm import LlamaModel, answer_accepted, free_cores  # noqa: E402
from edgewise.ml.llm import (  # noqa: E402
    BuildConfig,
    FinetuneConfig,
    build_llm_bundle,
    finetune,
    merge_lora_gguf,
    product_facts,
    quantize_gguf,
)
from edgewise.ml.train import parse_duration  # noqa: E402


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-budget", default="10m")
    ap.add_argument("--samples", type=int, default=240)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--poll-interval-s", type=float, default=1.0)
    ap.add_argument("--adapter", type=Path, default=None,
                    help="an adapter bundle made by `edgewise llm finetune` (no fine-tune)")
    ap.add_argument("--parts", default="measure,dense,deliver")
    args = ap.parse_args()
    threads = args.threads or free_cores()
    parts = set(args.parts.split(","))
    if parts - {"measure", "dense", "deliver"}:
        sys.exit(f"--parts: unknown {sorted(parts - {'measure', 'dense', 'deliver'})}")

    with tempfile.TemporaryDirectory(prefix="bench-llm-adapters-") as tmp:
        root = Path(tmp)
        facts = product_facts(n_samples=args.samples)
        # ---- the base bundle (the adapter's base, the device's first release) ---------------
        base = root / "base"
        if args.adapter is None or "deliver" in parts:
            note("building the base bundle ...")
            build_llm_bundle(smollm2(), base, BuildConfig(name="smollm2", n_ctx=512,
                                                          threads=threads))

        # ---- fine-tune -----------------------------------------------------------------------
        if args.adapter is not None:
            bundle_dir, manifest = args.adapter, validate_bundle(args.adapter)
            if getattr(manifest, "adapter", None) is None or \
                    manifest.adapter.base_sha256 != file_sha256(smollm2())[0]:
                sys.exit(f"{args.adapter}: not an adapter bundle for {smollm2().name}")
        else:
            data = root / "facts.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in facts.samples))
            note(f"fine-tuning for {args.time_budget} on {threads} thread(s) ...")
            result = finetune(FinetuneConfig(
                base=str(base), data=str(data), out_dir=str(root / "ft"), rank=args.rank,
                time_budget_s=parse_duration(args.time_budget), threads=threads,
                eval_every=20, track=False), notify=note)
            assert result.bundle_dir is not None and result.manifest is not None
            bundle_dir, manifest, m = result.bundle_dir, result.manifest, result.metrics
            emit({"bench": "llm-adapter-train", "samples": len(facts.samples),
                  "n_train": m["n_train"], "n_val": m["n_val"], "steps": m["steps"],
                  "train_s": m["train_s"], "base_val_loss": m["base_val_loss"],
                  "best_val_loss": m["best_val_loss"], "best_step": m["best_step"],
                  "rank": args.rank, "threads": threads,
                  "load_avg": round(os.getloadavg()[0], 2)})

        if "measure" in parts:
            measure(smollm2(), bundle_dir / "adapter.gguf", facts.held_out,
                    manifest.adapter.base_golden, threads=threads, runs=args.runs)
        if "dense" in parts:
            dense(smollm2(), bundle_dir, root, facts.held_out, threads=threads)
        if "deliver" in parts:
            deliver(root, base, bundle_dir, manifest.adapter.golden[0],
                    poll_interval_s=args.poll_interval_s)


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


def dense(gguf: Path, bundle: Path, work: Path, held_out, *, threads: int) -> None:
    """The fine-tune shipped as a dense change instead: merged into the base's weights and
    published as a new GGUF; the `edgewise delta` patch from the old file to it (the codec the
    server uses for every release) against the adapter's bytes. Twice: in the base's own type
    (Q4_1, every merged tensor re-encoded by gguf-py), and in Q8_0 (the base and the merged
    model each rebuilt as F16 and quantized by llama.cpp), with the merged model's held-out
    answers, which say whether the change survived the re-encoding."""
    adapter = bundle / "adapter.gguf"
    f16, merged_f16 = work / "base-f16.gguf", work / "merged-f16.gguf"
    pairs: dict[str, tuple[Path, Path, float]] = {}
    t0 = time.perf_counter()
    names = merge_lora_gguf(gguf, adapter, work / "merged-q4_1.gguf")
    pairs["Q4_1"] = (gguf, work / "merged-q4_1.gguf", time.perf_counter() - t0)
    quantize_gguf(gguf, f16, "F16", threads=threads)
    quantize_gguf(f16, work / "base-q8_0.gguf", "Q8_0", threads=threads)
    t0 = time.perf_counter()
    merge_lora_gguf(f16, adapter, merged_f16)
    quantize_gguf(merged_f16, work / "merged-q8_0.gguf", "Q8_0", threads=threads)
    pairs["Q8_0"] = (work / "base-q8_0.gguf", work / "merged-q8_0.gguf",
                     time.perf_counter() - t0)
    f16.unlink()
    merged_f16.unlink()

    adapter_bytes = adapter.stat().st_size
    bundle_bytes = sum(p.stat().st_size for p in bundle.iterdir() if p.is_file())
    for qtype, (old, new, merge_s) in pairs.items():
        patch, rebuilt = work / "merged.patch", work / "rebuilt.gguf"
        t0 = time.perf_counter()
        info = encode_delta(old, new, patch)
        encode_s = time.perf_counter() - t0
        t0 = time.perf_counter()  # the device's side: rebuild the new file, checked by hash
        apply_delta(old, patch, rebuilt, expected_sha256=file_sha256(new)[0])
        apply_s = time.perf_counter() - t0
        rebuilt.unlink()
        model = LlamaModel(new, n_ctx=512, threads=threads)
        ok = [answer_accepted(model.answer(g.prompt, max_tokens=g.max_tokens), g.accept)
              for g in held_out]
        model.close()
        full = new.stat().st_size
        emit({"bench": "llm-adapter-dense", "type": qtype, "merged_tensors": len(names),
              "full_gguf_bytes": full, "delta_bytes": info.patch_size,
              "delta_fraction": round(info.patch_size / full, 4),
              "delta_format": info.version, "adapter_bytes": adapter_bytes,
              "adapter_bundle_bytes": bundle_bytes,
              "delta_over_adapter": round(info.patch_size / adapter_bytes, 2),
              "merged_correct": sum(ok), "held_out": len(held_out),
              "merge_s": round(merge_s, 1), "encode_s": round(encode_s, 1),
              "apply_s": round(apply_s, 1), "threads": threads,
              "load_avg": round(os.getloadavg()[0], 2)})
        patch.unlink()
        new.unlink()
        if old != gguf:
            old.unlink()


def deliver(root: Path, base: Path, bundle: Path, learned, *, poll_interval_s: float) -> None:
    """The adapter as a release: a real server over TLS and a real agent daemon serving its
    chat API; seconds from the assignment until that API answers the learned fact."""
    import secrets

    import httpx

    from edgewise.agent import StateDir, enroll
    from edgewise.server.client import OperatorClient, publish_bundle
    from edgewise.sim import AgentProcess, ServerProcess, free_port
    from edgewise.trust import init_certs, init_keys

    keys = init_keys(root / "keys")
    certs = init_certs(root / "certs", hostnames=["127.0.0.1", "localhost"])
    token = secrets.token_urlsafe(24)
    server = ServerProcess(data_dir=root / "server", root_path=keys.root_json,
                           online_key_path=keys.online_key, admin_token=token,
                           tls_cert=certs.server_cert, tls_key=certs.server_key,
                           ca_path=certs.ca_cert, log_path=root / "server.log").start()
    state, port = root / "device", free_port()
    agent = None
    try:
        client = OperatorClient(server.url, token=token, verify=str(certs.ca_cert))
        enroll(state, server_url=server.url, token=client.create_enrollment_token(),
               root_path=keys.root_json, name="bench", hardware="bench", ca_path=certs.ca_cert)
        agent = AgentProcess(state_dir=state, poll_interval_s=poll_interval_s, api_port=port,
                             log_path=root / "agent.log").start()
        url = f"http://127.0.0.1:{port}/v1/chat/completions"

        def answer() -> str | None:
            try:
                r = httpx.post(url, timeout=120, json={
                    "messages": [{"role": "user", "content": learned.prompt}],
                    "temperature": 0, "max_tokens": learned.max_tokens})
            except httpx.HTTPError:
                return None
            return r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None

        def settled(release_id: str) -> bool:
            """Committed, or back at rest without it (rolled back, failed)."""
            rec = StateDir(state).load_record()
            return rec.target is None and (rec.state.value != "committed" or (
                rec.installed is not None and rec.installed.release_id == release_id))

        def wait(ok, what: str, timeout_s: float = 900) -> float:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if ok():
                    return time.monotonic()
                time.sleep(0.2)
            sys.exit(f"timed out waiting for {what}; see {root / 'agent.log'}")

        def ship(bundle_dir: Path) -> tuple[str, float]:
            release = publish_bundle(client, bundle_dir, root_path=keys.root_json,
                                     targets_key_path=keys.targets_key)
            t0 = time.monotonic()
            client.assign(release["id"])
            return release["id"], t0

        note("the device installs the base ...")
        ship(base)
        wait(lambda: answer() is not None, "the base to answer")
        note("the device installs the adapter ...")
        lora_id, t0 = ship(bundle)
        # The local API follows the active slot, which switches before the health check: the
        # first answer with the adapter can come before the commit; both are timed.
        first = wait(lambda: answer_accepted(answer() or "", learned.accept),
                     "the adapter's answer")
        done = wait(lambda: settled(lora_id), "the adapter's verdict")
        rec = StateDir(state).load_record()
        emit({"bench": "llm-adapter-delivery", "seconds_to_answer": round(first - t0, 2),
              "seconds_to_verdict": round(done - t0, 2), "state": rec.state.value,
              "poll_interval_s": poll_interval_s,
              "sent_bytes": rec.last_download.get("sent_bytes"),
              "base_gguf_bytes": (base / "model.gguf").stat().st_size,
              "health": {k: rec.last_health.get(k) for k in (
                  "passed", "gen_tok_s", "adapter_golden_passed", "base_golden_passed")},
              "load_avg": round(os.getloadavg()[0], 2)})
    finally:
        if agent is not None:
            agent.stop()
        server.stop()


if __name__ == "__main__":
    main()
