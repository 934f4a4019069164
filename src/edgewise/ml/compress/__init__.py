"""Compression with measured trade-offs: recipes, measurements, guards, `fit`, LLM sizing.

Invariant: every candidate a caller sees was measured in the same run as its fp32 baseline,
and a candidate slower than fp32 or losing more than the allowed accuracy is refused unless
the caller explicitly allows it.
"""

from . import _detect as _detect  # registers the object-detector recipes
from . import _recipes as _recipes  # registers the recipes
from ._cpu import CpuInfo, detect_cpu, parse_cpuinfo
from ._decide import (
    BASELINE,
    CandidateFigures,
    DeviceProfile,
    FitDecision,
    GuardPolicy,
    assess,
    choose,
)
from ._errors import CompressError, NoFitError, NotApplicableError
from ._llm import (
    BITS_DEFAULT_FTYPE,
    FILE_TYPES,
    GGML_TYPES,
    PRESETS,
    LLMShape,
    MemoryEstimate,
    estimate_memory,
    gguf_weight_bytes,
    shape_from_params,
)
from ._pipeline import (
    CompressConfig,
    compress_bundle,
    fit_bundle,
    load_report,
    parse_recipe_entry,
)
from ._recipes import Candidate, CompressContext
from ._registry import Recipe, create_recipe, list_recipes, register_recipe
from ._report import CompressReport
from ._torch_source import TORCH_KEY, WEIGHTS_FILE, TorchModel, load_torch_model, weights_bytes

__all__ = [
    "BASELINE",
    "BITS_DEFAULT_FTYPE",
    "FILE_TYPES",
    "GGML_TYPES",
    "PRESETS",
    "TORCH_KEY",
    "WEIGHTS_FILE",
    "Candidate",
    "CandidateFigures",
    "CompressConfig",
    "CompressContext",
    "CompressError",
    "CompressReport",
    "CpuInfo",
    "DeviceProfile",
    "FitDecision",
    "GuardPolicy",
    "LLMShape",
    "MemoryEstimate",
    "NoFitError",
    "NotApplicableError",
    "Recipe",
    "TorchModel",
    "assess",
    "choose",
    "compress_bundle",
    "create_recipe",
    "detect_cpu",
    "estimate_memory",
    "fit_bundle",
    "gguf_weight_bytes",
    "list_recipes",
    "load_report",
    "load_torch_model",
    "parse_cpuinfo",
    "parse_recipe_entry",
    "register_recipe",
    "shape_from_params",
    "weights_bytes",
]
