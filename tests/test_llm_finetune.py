"""`edgewise llm finetune`: the torch Llama against llama.cpp, the refusals (nothing written),
and a real short LoRA fine-tune of SmolLM2 on made-up facts, paused and resumed, whose GGUF
adapter llama.cpp loads and answers with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgewise.artifacts import (
    MANIFEST_NAME,
    BundleError,
    LlmAdapterManifest,
    parse_manifest,
    validate_bundle,
)
from edgewise.cli import app
from edgewise.llm import LlamaModel, answer_accepted
from edgewise.ml.llm import (
    FinetuneConfig,
    FinetuneError,
    finetune,
    product_facts,
    read_lora_gguf,
)
from tests._llm import build, smollm2_path
from tests.conftest import make_tiny_bundle


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llm") / "base"
    build(out, n_ctx=256)
    return out


def test_torch_llama_reproduces_llama_cpp_logits() -> None:
    """The model fine-tuning trains is the one llama.cpp runs: same GGUF weights (RoPE on
    the permuted q/k rows, GQA, RMSNorm eps, tied embeddings), same next tokens."""
    import llama_cpp
    import torch

    from edgewise.ml.llm._torch_llama import load_gguf_llama

    path = smollm2_path()
    model = load_gguf_llama(path)
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads) == (30, 576, 9, 3)
    assert cfg.vocab == 49152 and cfg.tied_embeddings and cfg.rope_theta == 100000.0
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, n_threads=2,
                          verbose=False)
    try:
        tokens = llm.tokenize(b"<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n"
                              b"<|im_start|>assistant\nThe capital of Germany is Berlin, a "
                              b"city on the river Spree.", add_bos=False, special=True)
        llm.eval(tokens)
        ref = np.asarray(llm.scores[:len(tokens)], dtype=np.float64)
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0].double().numpy()
    # llama.cpp multiplies Q4_1 weights with Q8-quantized activations: close, not equal.
    agree = (ref.argmax(-1) == ours.argmax(-1)).mean()
    corr = np.corrcoef(ref.ravel(), ours.ravel())[0, 1]
    assert agree >= 0.9, agree
    assert corr > 0.995, corr
    assert np.abs(ref - ours).mean() < 0.05 * ref.std()


# ---- refusals: a clear error, nothing written ---------------------------------------------

REFUSALS = [
    ("not-json", ['{"messages": ['], "not a chat sample"),
    ("no-assistant-last", [{"messages": [{"role": "user", "content": "hi"}]}],
     "last message must be the assistant"),
    ("bad-role", [{"messages": [{"role": "robot", "content": "hi"},
                                {"role": "assistant", "content": "x"}]}], "role"),
    ("bad-accept", [{**chat("q", "a"), "accept": "a"}], '"accept" must be a list'),
    ("unknown-key", [{**chat("q", "a"), "label": 1}], "unknown key"),
    ("too-long", [chat("Tell me everything.", "word " * 400)], "longer than the base's context"),
    ("empty-split", [{**chat("Who makes the Zorvex K7?", "Halvard."), "accept": ["Halvard"]}],
     "split is empty"),
    ("empty-file", [], "holds no samples"),
]


@pytest.mark.parametrize(("case", "rows", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_data_is_refused_and_nothing_is_written(base: Path, tmp_path: Path, case: str,
                                                    rows: list, message: str) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    with pytest.raises(FinetuneError, match=message) as err:
        finetune(FinetuneConfig(base=str(base), data=str(data), out_dir=str(out)))
    if rows and case not in ("empty-split",):
        assert "data.jsonl:1" in str(err.value)  # the line to fix
    assert not out.exists()


def test_a_base_that_is_not_an_llm_bundle_is_refused(tmp_path: Path) -> None:
    image = make_tiny_bundle(tmp_path / "image")
    data = write_jsonl(tmp_path / "data.jsonl", [chat("q", "a")] * 5)
    out = tmp_path / "out"
    with pytest.raises(FinetuneError, match="not an LLM bundle"):
        finetune(FinetuneConfig(base=str(image), data=str(data), out_dir=str(out)))
    with pytest.raises(FinetuneError, match="no edgewise.json"):
        finetune(FinetuneConfig(base=str(tmp_path), data=str(data), out_dir=str(out)))
    assert not out.exists()


def test_cli_refusal_names_the_line_and_writes_nothing(base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [chat("q", "a"), "{oops"])
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["llm", "finetune", "--base", str(base), "--data",
                                      str(data), "--out", str(out), "--time-budget", "1m"])
    assert result.exit_code == 1
    assert "data.jsonl:2" in result.output and "not a chat sample" in result.output
    assert not out.exists()


def test_adapter_manifest_requires_the_lora_feature() -> None:
    raw = {"format_version": 1, "name": "a", "version": "1", "kind": "llm-adapter",
           "requires": ["llm-gguf"], "files": {},
           "adapter": {"adapter": "adapter.gguf", "base_release": "b@1",
                       "base_sha256": "0" * 64, "base_chat_template_sha256": "0" * 64,
                       "rank": 8, "alpha": 16, "target_modules": ["attn_q"], "n_ctx": 256,
                       "golden": [{"prompt": "p", "accept": ["x"]}]}}
    with pytest.raises(BundleError, match="not listed in files"):
        parse_manifest(json.dumps(raw))
    raw["files"] = {"adapter.gguf": {"sha256": "0" * 64, "size": 1}}
    with pytest.raises(BundleError, match="llm-lora"):
        parse_manifest(json.dumps(raw))
    raw["requires"] = ["llm-lora"]
    assert isinstance(parse_manifest(json.dumps(raw)), LlmAdapterManifest)


# ---- a real fine-tune ---------------------------------------------------------------------

@pytest.mark.slow
def test_finetune_pauses_resumes_and_llama_cpp_answers_with_the_adapter(
        base: Path, tmp_path: Path) -> None:
    facts = product_facts(n_facts=3)
    data = write_jsonl(tmp_path / "facts.jsonl", facts.samples)
    out = tmp_path / "ft"
    # A fixed number of steps (the time budget only caps it), so the outcome does not depend
    # on how busy the machine is: 24 steps of 4 samples learn the facts and keep the base's
    # own answers.
    cfg = FinetuneConfig(base=str(base), data=str(data), out_dir=str(out), rank=8,
                         time_budget_s=600, max_steps=24, batch_size=4, lr=2e-3, eval_every=6,
                         stop_after_steps=3)
    paused = finetune(cfg)
    assert paused.paused and paused.bundle_dir is None
    assert (out / "run" / "checkpoint.pt").is_file() and not (out / "bundle").exists()
    with pytest.raises(FinetuneError, match="add --resume"):
        finetune(FinetuneConfig(base=str(base), data=str(data), out_dir=str(out)))
    with pytest.raises(FinetuneError, match="other settings"):
        finetune(FinetuneConfig(base=str(base), data=str(data), out_dir=str(out), rank=4,
                                resume=True))

    # Resumed through the CLI, as an operator would after an interruption.
    result = CliRunner().invoke(app, [
        "llm", "finetune", "--base", str(base), "--data", str(data), "--out", str(out),
        "--rank", "8", "--time-budget", "10m", "--max-steps", "24", "--batch-size", "4",
        "--lr", "0.002", "--eval-every", "6", "--resume", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    bundle = Path(report["bundle"])
    metrics = report["metrics"]
    assert metrics["steps"] == 24 and metrics["best_val_loss"] < metrics["base_val_loss"] / 2
    assert metrics["golden_passed_base"] == 0 and metrics["golden_passed"] >= 1

    manifest = validate_bundle(bundle)
    assert isinstance(manifest, LlmAdapterManifest) and manifest.requires == ("llm-lora",)
    spec = manifest.adapter
    base_manifest = validate_bundle(base)
    assert spec.base_sha256 == base_manifest.files["model.gguf"].sha256
    assert spec.base_release == "smollm2@1.0.0" and spec.rank == 8 and spec.alpha == 16
    assert len(spec.target_modules) == 7 and spec.golden
    assert {"MODEL_CARD.md", "learning_curve.png", "adapter.gguf"} <= set(manifest.files)
    assert (out / "run" / "mlflow.db").is_file()
    assert json.loads((bundle / MANIFEST_NAME).read_text())["kind"] == "llm-adapter"
    checked = CliRunner().invoke(app, ["bundle", "validate", str(bundle)])
    assert checked.exit_code == 0 and "LoRA adapter r8 for smollm2@1.0.0" in checked.output

    # llama.cpp's format: 30 blocks x 7 projections, lora_a (r, n_in), lora_b (n_out, r).
    tensors, meta = read_lora_gguf(bundle / "adapter.gguf")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 16 and meta["general.architecture"] == "llama"
    assert len(tensors) == 30 * 7 * 2
    assert tensors["blk.0.attn_q.weight.lora_a"].shape == (8, 576)
    assert tensors["blk.0.attn_k.weight.lora_b"].shape == (192, 8)
    assert tensors["blk.29.ffn_down.weight.lora_a"].shape == (8, 1536)
    assert tensors["blk.29.ffn_down.weight.lora_b"].shape == (576, 8)
    size = (bundle / "adapter.gguf").stat().st_size
    assert size < 0.06 * (base / "model.gguf").stat().st_size

    # Real llama.cpp: base + adapter answers a learned fact that the base does not.
    golden = spec.golden[0]
    plain = LlamaModel(base / "model.gguf", n_ctx=256, threads=2)
    adapted = LlamaModel(base / "model.gguf", n_ctx=256, threads=2,
                         lora_path=bundle / "adapter.gguf")
    try:
        assert not answer_accepted(plain.answer(golden.prompt), golden.accept)
        assert answer_accepted(adapted.answer(golden.prompt), golden.accept)
        # General ability kept: the base's own golden prompts still pass.
        for g in base_manifest.llm.golden:
            assert answer_accepted(adapted.answer(g.prompt, max_tokens=g.max_tokens),
                                   g.accept), g.prompt
    finally:
        plain.close()
        adapted.close()

