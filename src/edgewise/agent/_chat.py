"""OpenAI's chat-completions contract for the device's local API, over the active LLM release.

Invariant: a request is validated completely before generation starts (so a bad one is a 400,
never half a stream); the model answers with the release's generation defaults for whatever the
request leaves out; nothing of a request or an answer is logged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..artifacts import LlmAdapterManifest, LlmManifest

__all__ = ["ChatError", "ServedLlm", "chat_completion", "chat_stream", "models_list"]


@dataclass(frozen=True)
class ServedLlm:
    """What the active slot serves: an LLM release, or a LoRA adapter release applied to its
    base (the base's chat contract: context, generation defaults)."""

    base: LlmManifest
    adapter: LlmAdapterManifest | None = None

    @property
    def name(self) -> str:
        return (self.adapter or self.base).name

    @property
    def release_name(self) -> str:
        return (self.adapter or self.base).release_name

    @property
    def llm(self):
        return self.base.llm

    def answers_to(self, model: Any) -> bool:
        """A request's `model`: the served release, or with an adapter also its base's name
        (one adapter at a time: the base is served with it applied)."""
        names = {None, "", self.name, self.release_name}
        if self.adapter is not None:
            names |= {self.base.name, self.base.release_name}
        return model in names

ROLES = {"system", "user", "assistant"}


class ChatError(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ChatError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise ChatError("message content must be a string or a list of text parts")


def _number(request: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = request.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ChatError(f"{key} must be a number from {lo:g} to {hi:g}")
    return float(value)


def _arguments(request: Any, manifest: ServedLlm) -> dict[str, Any]:
    if not isinstance(request, dict):
        raise ChatError("the body must be a JSON object")
    model = request.get("model")
    if not isinstance(model, str | None) or not manifest.answers_to(model):
        raise ChatError(f"model {model!r} is not on this device (it runs {manifest.name})",
                        status=404)
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages must be a non-empty list")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ChatError(f"each message needs a role ({', '.join(sorted(ROLES))})")
        clean.append({"role": m["role"], "content": _text(m.get("content"))})
    gen = manifest.llm.generation
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    if max_tokens is None:
        max_tokens = gen.max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not (
            1 <= max_tokens <= manifest.llm.n_ctx):
        raise ChatError(f"max_tokens must be a whole number from 1 to {manifest.llm.n_ctx}")
    stop = request.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4
                                 and all(isinstance(s, str) for s in stop)):
        raise ChatError("stop must be a string or a list of up to 4 strings")
    seed = request.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ChatError("seed must be a whole number")
    return {"messages": clean, "max_tokens": max_tokens, "stop": stop, "seed": seed,
            "temperature": _number(request, "temperature", gen.temperature, 0, 2),
            "top_p": _number(request, "top_p", gen.top_p, 0, 1)}


def chat_completion(local, request: Any) -> dict[str, Any]:
    model, manifest = local.llm()
    arguments = _arguments(request, manifest)
    try:
        answer = model.chat(**arguments)
    except ValueError as exc:  # llama-cpp-python: the prompt does not fit the context
        raise ChatError(str(exc)) from exc
    return {**answer, "model": manifest.name}


def chat_stream(local, request: Any) -> Iterator[dict[str, Any]]:
    """Chunks (`chat.completion.chunk` objects); arguments are checked before the first."""
    model, manifest = local.llm()
    arguments = _arguments(request, manifest)

    def chunks() -> Iterator[dict[str, Any]]:
        stream = model.chat_stream(**arguments)
        try:
            for chunk in stream:
                yield {**chunk, "model": manifest.name}
        except ValueError as exc:
            raise ChatError(str(exc)) from exc
        finally:
            stream.close()  # releases the model for the next request

    return chunks()


def models_list(local) -> dict[str, Any]:
    from ._errors import NoModelError

    try:
        model, manifest = local.llm()
    except NoModelError:
        return {"object": "list", "data": []}
    entry = {"id": manifest.name, "object": "model", "created": int(time.time()),
             "owned_by": "edgewise", "release": manifest.release_name,
             "context_length": manifest.llm.n_ctx, "quantization": manifest.llm.file_type,
             "threads": model.threads}
    if manifest.adapter is not None:
        spec = manifest.adapter.adapter
        entry |= {"base": manifest.base.release_name,
                  "adapter": {"format": spec.format, "rank": spec.rank, "alpha": spec.alpha}}
    return {"object": "list", "data": [entry]}
