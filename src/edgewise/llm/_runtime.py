"""llama.cpp through llama-cpp-python: the one LLM runtime, used the same way on the device
(health check, local chat API) and on the workstation (build and quantization measurements).

Invariant: every figure that decides something (golden answers, perplexity, tokens/s) is
measured greedily and with the same code on both sides, so a bundle's bounds written at build
time mean the same thing when the device checks them. Nothing here logs or sends a prompt or
an answer anywhere.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import LlmRuntimeError, RuntimeUnavailable

__all__ = ["LlamaModel", "Speed", "answer_accepted", "free_cores", "perplexity", "proc_mb",
           "rss_mb"]


def free_cores() -> int:
    """Cores not busy right now (by the 1-minute load average), at least 1: a generation
    that fights another process for a core runs several times slower than one thread less."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, math.floor(cores - busy + 0.5)))


def rss_mb() -> float | None:
    """Resident memory of this process (Linux); a model's cost is the growth around its
    load."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def proc_mb(path: str, key: str) -> float | None:
    """A `Key:  N kB` line of a /proc file (/proc/meminfo, /proc/self/status) in MB, or None
    off Linux or when the key is absent."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def answer_accepted(answer: str, accept: Sequence[str]) -> bool:
    """A golden answer passes when it contains one of the accepted strings (any case)."""
    text = answer.casefold()
    return any(a.casefold() in text for a in accept)


@dataclass(frozen=True)
class Speed:
    prompt_tok_s: float
    gen_tok_s: float
    threads: int


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise RuntimeUnavailable("no LLM runtime on this machine: install llama-cpp-python "
                                 "(pip install 'edgewise[llm]')") from exc
    return llama_cpp


class LlamaModel:
    """One GGUF model loaded for chat. Calls are serialised: llama.cpp contexts are not
    thread-safe, and the local API may get concurrent requests."""

    def __init__(self, path: Path | str, *, n_ctx: int = 512, threads: int | None = None,
                 logits_all: bool = False, lora_path: Path | str | None = None) -> None:
        llama_cpp = _llama_cpp()
        self.path = Path(path)
        self.lora_path = Path(lora_path) if lora_path is not None else None
        self.threads = threads or free_cores()
        self.n_ctx = n_ctx
        self.lock = threading.Lock()
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx,
                                       n_threads=self.threads, n_threads_batch=self.threads,
                                       logits_all=logits_all, seed=0, verbose=False,
                                       lora_path=None if lora_path is None else str(lora_path))
        except (ValueError, RuntimeError, OSError) as exc:
            what = self.path.name + (f" + {self.lora_path.name}" if self.lora_path else "")
            raise LlmRuntimeError(f"llama.cpp cannot load {what}: {exc}") from exc

    def close(self) -> None:
        self.llm.close()

    # ---- chat (OpenAI-style objects, as llama-cpp-python makes them) ----------------------

    def chat(self, messages: list[dict[str, Any]], *, max_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
             seed: int | None = None) -> dict[str, Any]:
        with self.lock:
            self.llm.reset()
            return self.llm.create_chat_completion(
                messages=messages, max_tokens=max_tokens, temperature=temperature,
                top_p=top_p, stop=stop, seed=seed)

    def chat_stream(self, messages: list[dict[str, Any]], *, max_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0,
                    stop: list[str] | None = None,
                    seed: int | None = None) -> Iterator[dict[str, Any]]:
        """Chunks of a streamed answer; the model stays locked until the stream is consumed
        or closed."""
        with self.lock:
            self.llm.reset()
            yield from self.llm.create_chat_completion(
                messages=messages, max_tokens=max_tokens, temperature=temperature,
                top_p=top_p, stop=stop, seed=seed, stream=True)

    def answer(self, prompt: str, *, max_tokens: int = 48) -> str:
        """The greedy answer to one user message."""
        out = self.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens)
        return out["choices"][0]["message"]["content"] or ""

    # ---- measurements -------------------------------------------------------------------

    def speed(self, *, prompt_tokens: int = 128, gen_tokens: int = 63) -> Speed:
        """Prompt processing and greedy generation rates at this model's thread count."""
        llm = self.llm
        vocab = llm.n_vocab()
        # A fixed, ordinary prompt: token ids of a repeated sentence, cut to length.
        text = "The quick brown fox jumps over the lazy dog near the river bank. " * 64
        tokens = llm.tokenize(text.encode())[:prompt_tokens]
        if len(tokens) < prompt_tokens or prompt_tokens + gen_tokens > self.n_ctx:
            raise LlmRuntimeError(f"cannot time {prompt_tokens}+{gen_tokens} tokens in a "
                                  f"context of {self.n_ctx}")
        with self.lock:
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(tokens)
            t1 = time.perf_counter()
            for _ in range(gen_tokens):
                token = llm.sample(temp=0.0, top_k=1)
                if not 0 <= token < vocab:
                    raise LlmRuntimeError(f"sampled token {token} outside the vocabulary")
                llm.eval([token])
            t2 = time.perf_counter()
            llm.reset()
        return Speed(prompt_tok_s=prompt_tokens / (t1 - t0), gen_tok_s=gen_tokens / (t2 - t1),
                     threads=self.threads)


def perplexity(path: Path | str, text: str, *, window: int = 256,
               threads: int | None = None, max_windows: int = 8) -> float:
    """Perplexity of `text` under the model: non-overlapping windows of `window` tokens, each
    scored on its second half given the first (as llama.cpp's perplexity tool does)."""
    import numpy as np

    model = LlamaModel(path, n_ctx=window, threads=threads, logits_all=True)
    try:
        llm = model.llm
        tokens = llm.tokenize(text.encode(), add_bos=False)
        bos = llm.token_bos()
        nll, count = 0.0, 0
        for start in range(0, max(1, len(tokens) - window + 2), window - 1):
            chunk = [bos, *tokens[start:start + window - 1]]
            if len(chunk) < 16:
                break
            llm.reset()
            llm.eval(chunk)
            first = len(chunk) // 2
            rows = np.asarray(llm.scores[first:len(chunk) - 1], dtype=np.float64)
            top = rows.max(axis=1, keepdims=True)
            log_z = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
            targets = np.asarray(chunk[first + 1:])
            nll += float((log_z - rows[np.arange(len(rows)), targets]).sum())
            count += len(rows)
            max_windows -= 1
            if max_windows == 0:
                break
    finally:
        model.close()
    if count == 0:
        raise LlmRuntimeError("the evaluation text is too short to measure perplexity "
                              "(needs at least 16 tokens)")
    return math.exp(nll / count)
