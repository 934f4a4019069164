"""Small LLMs as GGUF files, run with llama.cpp: reading a GGUF's header, loading it, chatting,
and the measurements a bundle's health contract is made of (golden answers, perplexity,
tokens/s).

Shared by `edgewise.ml.llm` (build, quantize) and `edgewise.agent` (health check, local chat
API), so both measure the same way; it imports neither. llama-cpp-python is imported only when
a model is loaded (`RuntimeUnavailable` without it).
"""

from ._errors import GgufError, LlmError, LlmRuntimeError, RuntimeUnavailable
from ._gguf import GgufInfo, read_gguf_info
from ._measure import GoldenResult, LlmMeasurement, measure_in_subprocess, measure_llm
from ._runtime import (
    LlamaModel,
    Speed,
    answer_accepted,
    free_cores,
    perplexity,
    proc_mb,
    rss_mb,
)

__all__ = [
    "GgufError",
    "GgufInfo",
    "GoldenResult",
    "LlamaModel",
    "LlmMeasurement",
    "LlmError",
    "LlmRuntimeError",
    "RuntimeUnavailable",
    "Speed",
    "answer_accepted",
    "free_cores",
    "measure_in_subprocess",
    "measure_llm",
    "perplexity",
    "proc_mb",
    "read_gguf_info",
    "rss_mb",
]
