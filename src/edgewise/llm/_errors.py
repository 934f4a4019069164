"""Errors of `edgewise.llm`, rooted by origin.

`GgufError`: a file is not a usable GGUF model (untrusted input: wrong magic, truncated, no
chat template). `RuntimeUnavailable`: this machine has no llama.cpp binding installed.
`LlmRuntimeError`: llama.cpp refused or failed to run a model.
"""

__all__ = ["GgufError", "LlmError", "LlmRuntimeError", "RuntimeUnavailable"]


class LlmError(Exception):
    """Root of every error raised by `edgewise.llm`."""


class GgufError(LlmError):
    pass


class RuntimeUnavailable(LlmError):
    pass


class LlmRuntimeError(LlmError):
    pass
