"""LLMs on the workstation: GGUF files become bundles (`build`), quantized candidates are
measured against their reference (`quantize`), LoRA fine-tunes become adapter bundles
(`finetune`). The runtime itself is `edgewise.llm`."""

from ._adapter import merge_lora_gguf, read_lora_gguf, write_lora_gguf
from ._build import (
    BuildConfig,
    LlmBuildError,
    build_llm_bundle,
    inspect_gguf,
    ram_needed_mb,
    with_chat_template,
)
from ._data import DEFAULT_EVAL_TEXT, DEFAULT_GOLDEN
from ._facts import FactSet, product_facts
from ._finetune import (
    FinetuneConfig,
    FinetuneError,
    FinetuneResult,
    finetune,
)
from ._quantize import (
    QUANT_TYPES,
    LlmCandidate,
    LlmFit,
    LlmQuantReport,
    fit_llm,
    load_llm_report,
    quantize_bundle,
    quantize_gguf,
)

__all__ = [
    "DEFAULT_EVAL_TEXT",
    "DEFAULT_GOLDEN",
    "QUANT_TYPES",
    "BuildConfig",
    "FactSet",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "LlmBuildError",
    "LlmCandidate",
    "LlmFit",
    "LlmQuantReport",
    "build_llm_bundle",
    "finetune",
    "fit_llm",
    "inspect_gguf",
    "load_llm_report",
    "merge_lora_gguf",
    "product_facts",
    "quantize_bundle",
    "quantize_gguf",
    "ram_needed_mb",
    "read_lora_gguf",
    "with_chat_template",
    "write_lora_gguf",
]
