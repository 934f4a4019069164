"""LLM bundles: reading GGUF files, `edgewise llm build` and its refusals, the manifest kind,
and real llama.cpp quantization with a measured report and `fit`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgewise.artifacts import (
    MANIFEST_NAME,
    BundleError,
    GoldenPrompt,
    LlmManifest,
    parse_manifest,
    read_manifest,
    validate_bundle,
)
from edgewise.cli import app
from edgewise.llm import GgufError, read_gguf_info
from edgewise.ml.errors import MLError
from edgewise.ml.llm import LlmBuildError, fit_llm, quantize_bundle
from tests._llm import GOLDEN, build, smollm2_path
from tests.conftest import make_tiny_bundle


def synthetic_gguf(path: Path, *, arch: str = "llama", template: str | None = "{{ x }}") -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    if template is not None:
        writer.add_chat_template(template)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_info_of_the_real_smollm2() -> None:
    info = read_gguf_info(smollm2_path())
    assert info.architecture == "llama" and info.file_type == "Q4_1"
    assert info.n_params == 134_515_008
    assert info.tensor_types == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert info.context_length == 8192 and info.n_layers == 30 and info.vocab == 49152
    assert info.chat_template and "im_start" in info.chat_template
    assert len(info.tokenizer_sha256) == 64


@pytest.fixture(scope="module")
def smollm2_v1(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llm") / "v1"
    build(out)
    return out


def test_build_writes_a_valid_bundle_with_measured_contract(smollm2_v1: Path) -> None:
    manifest = validate_bundle(smollm2_v1)
    assert isinstance(manifest, LlmManifest) and manifest.kind == "llm"
    assert manifest.requires == ("llm-gguf",)
    spec = manifest.llm
    assert spec.architecture == "llama" and spec.file_type == "Q4_1" and spec.n_ctx == 256
    assert spec.golden == GOLDEN
    ref = spec.reference
    # The bounds come from this run's measurements.
    assert spec.max_perplexity == pytest.approx(ref["perplexity"] * 1.5, rel=1e-3)
    assert spec.min_gen_tok_s == pytest.approx(ref["gen_tok_s"] / 4, abs=0.1)
    assert ref["golden_passed"] == "3/3"
    # RAM: the GGUF arithmetic, never below what was measured.
    assert spec.ram_mb >= ref["ram_estimate_mb"] and spec.ram_mb >= ref["memory_mb"]
    assert spec.ram_mb > (smollm2_v1 / "model.gguf").stat().st_size / 2**20
    assert (smollm2_v1 / "MODEL_CARD.md").read_text().count("| yes |") == 3


@pytest.mark.parametrize("case", ["not-gguf", "truncated", "unknown-architecture",
                                  "no-chat-template", "fails-own-golden"])
def test_build_refuses_bad_models_and_writes_nothing(tmp_path: Path, case: str) -> None:
    src, golden, match = smollm2_path(), GOLDEN, None
    if case == "not-gguf":
        src = tmp_path / "model.gguf"
        src.write_text("definitely not a model\n")
        match = "not a GGUF file"
    elif case == "truncated":
        src = tmp_path / "cut.gguf"
        with open(smollm2_path(), "rb") as f:
            src.write_bytes(f.read(60 << 20))
        match = "truncated"
    elif case == "unknown-architecture":
        src = synthetic_gguf(tmp_path / "odd.gguf", arch="edgewise-unknown")
        match = "llama.cpp cannot load"
    elif case == "no-chat-template":
        src = synthetic_gguf(tmp_path / "plain.gguf", template=None)
        match = "no chat template"
    else:
        golden = (GoldenPrompt(prompt="What is the capital of Germany?", accept=("Paris",),
                               max_tokens=16),)
        match = "fails 1 of its 1 golden prompts"
    out = tmp_path / "out" / "bundle"
    with pytest.raises(LlmBuildError, match=match):
        build(out, gguf=src, golden=golden)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_gguf_errors_name_the_problem(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GgufError, match="not a GGUF file"):
        read_gguf_info(empty)
    with pytest.raises(GgufError, match="cannot read"):
        read_gguf_info(tmp_path / "missing.gguf")


def test_cli_build_refuses_malformed_golden_lines(tmp_path: Path) -> None:
    bad = tmp_path / "golden.jsonl"
    bad.write_text('{"prompt": "ok?", "accept": ["yes"]}\n{"prompt": "no accept list"}\n')
    result = CliRunner().invoke(app, ["llm", "build", "--gguf", str(smollm2_path()),
                                      "--out", str(tmp_path / "b"), "--golden", str(bad)])
    assert result.exit_code == 1
    assert "golden.jsonl:2" in result.output and "accept" in result.output
    assert not (tmp_path / "b").exists()


def test_manifest_requires_reader_features(smollm2_v1: Path, tmp_path: Path) -> None:
    raw = json.loads((smollm2_v1 / MANIFEST_NAME).read_text())
    raw["requires"] = ["llm-gguf", "teleportation"]
    with pytest.raises(BundleError, match="teleportation.*update the agent"):
        parse_manifest(json.dumps(raw))
    raw["requires"] = []  # an LLM bundle that does not say it needs the LLM runtime
    with pytest.raises(BundleError, match="must require"):
        parse_manifest(json.dumps(raw))
    # Image bundles require nothing, so agents that predate the field still read them.
    image = make_tiny_bundle(tmp_path / "img")
    assert "requires" not in json.loads((image / MANIFEST_NAME).read_text())
    assert read_manifest(image).kind == "image-classifier"


@pytest.mark.slow
def test_quantize_measures_every_candidate_and_fit_never_picks_a_collapsed_one(
        smollm2_v1: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    steps = []
    report = quantize_bundle(smollm2_v1, out, types=["Q8_0", "Q4_0"],
                             progress=lambda what, i, n: steps.append((what, i, n)))
    by = {c.quant: c for c in report.candidates}
    assert report.reference.quant == "F16" and report.reference.file_mb > 250
    assert 130 < by["Q8_0"].file_mb < 160 and 80 < by["Q4_0"].file_mb < 100
    for c in report.candidates:
        assert c.peak_rss_mb and c.peak_rss_mb > c.file_mb  # its own process, mapped weights
        assert c.gen_tok_s > 0 and c.prompt_tok_s > 0 and c.perplexity > 1
        assert validate_bundle(Path(c.bundle)).llm.file_type == c.quant
    # Q4_0 of SmolLM2 answers the Spanish question in Spanish: collapsed, whatever its size.
    assert not by["Q8_0"].collapsed and by["Q8_0"].golden_pass == 1.0
    assert by["Q4_0"].collapsed and "golden prompts wrong" in by["Q4_0"].why
    assert (out / "report.md").read_text().count("collapsed") == 1
    assert (out / "report.png").stat().st_size > 10_000
    assert steps[-1][1] == steps[-1][2] == 3
    # A candidate keeps the source bundle's perplexity bound.
    q4 = validate_bundle(Path(by["Q4_0"].bundle))
    assert q4.llm.max_perplexity == validate_bundle(smollm2_v1).llm.max_perplexity

    chosen = fit_llm(report, max_ram_mb=10_000)
    assert chosen.chosen.quant == "Q8_0" and chosen.fitting == ["Q8_0"]
    # RAM is judged by what the candidate's bundle says it needs: what its devices check.
    q8_ram = validate_bundle(Path(by["Q8_0"].bundle)).llm.ram_mb
    assert by["Q8_0"].ram_mb == q8_ram
    with pytest.raises(MLError, match="needs .* MB of RAM"):
        fit_llm(report, max_ram_mb=q8_ram - 1)
    with pytest.raises(MLError, match="collapsed"):  # only Q4_0 is small enough: refused
        fit_llm(report, max_size_mb=120)
    result = CliRunner().invoke(app, ["fit", str(smollm2_v1), "--report",
                                      str(out / "report.json"), "--max-ram", "10000",
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["chosen"] == "Q8_0"
    shutil.rmtree(out)
    assert os.path.exists(smollm2_v1)
