"""`edgewise llm finetune`: LoRA fine-tuning of an LLM bundle on this CPU, shipped as an
adapter bundle (a GGUF LoRA adapter + a manifest naming its base by hash).

Reads top to bottom in `finetune()`: checks -> data -> model -> tracking -> train -> export
-> measure with llama.cpp -> bundle.

Invariant: nothing is written until the base bundle, every data row and both splits passed
their checks; the run writes its resolved config before it trains and a checkpoint it can
resume from after every evaluation (and when interrupted); the adapter shipped is the one
with the lowest validation loss, and its golden prompts are answers llama.cpp gave with that
adapter loaded on the base's own GGUF in this run. Samples are formatted with the base's own
chat template and tokenized with llama.cpp's tokenizer, exactly as the device will prompt
it; the loss counts only the assistant's tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...artifacts import (
    AdapterSpec,
    BundleError,
    GoldenPrompt,
    LlmAdapterManifest,
    LlmManifest,
    validate_bundle,
    write_llm_adapter_bundle,
)
from ...llm import LlamaModel, LlmError, answer_accepted, free_cores
from ..errors import MLError
from ..tracking import Tracker, default_tracking_uri
from ._adapter import write_lora_gguf
from ._torch_llama import LORA_TARGETS, TorchLlama, load_gguf_llama

__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneResult", "Sample", "finetune",
           "load_chat_samples"]

ProgressFn = Callable[[str, float, float], None]
NotifyFn = Callable[[str], None]
ADAPTER_FILE = "adapter.gguf"
# What must stay equal for `resume` to continue a run rather than start a different one.
_RESUME_KEYS = ("base", "data", "data_sha256", "base_sha256", "rank", "alpha", "targets", "lr",
                "batch_size", "val_fraction", "seed")
_IGNORE = -100


class FinetuneError(MLError):
    """Input that cannot be fine-tuned on (the message says why; nothing was written)."""


@dataclass(frozen=True)
class FinetuneConfig:
    base: str  # an LLM bundle (edgewise llm build)
    data: str  # chat JSON lines: {"messages": [...], "accept": [...] (optional)}
    out_dir: str  # OUT/run (config, checkpoints, MLflow, curve) and OUT/bundle
    rank: int = 8
    alpha: float | None = None  # default: 2 x rank
    targets: tuple[str, ...] = LORA_TARGETS
    time_budget_s: float = 600.0  # training time, resumed runs included
    max_steps: int | None = None
    stop_after_steps: int | None = None  # pause after N steps; `resume` continues
    lr: float = 2e-3
    batch_size: int = 8
    val_fraction: float = 0.2
    eval_every: int = 10  # steps between validation passes (and checkpoints)
    seed: int = 0
    name: str | None = None  # default: "<base name>-lora"
    version: str = "1.0.0"
    golden: tuple[GoldenPrompt, ...] | None = None  # default: validation rows with "accept"
    max_golden: int = 5
    threads: int | None = None  # default: the cores free now
    tracking_uri: str | None = None  # default: sqlite store under OUT/run
    track: bool = True
    resume: bool = False

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else 2 * self.rank)


@dataclass(frozen=True)
class Sample:
    line: int
    tokens: tuple[int, ...]
    trained: tuple[bool, ...]  # per token: counted in the loss (the assistant's tokens)
    prompt: str | None  # the single user message, when the row can be a golden prompt
    accept: tuple[str, ...]


@dataclass
class FinetuneResult:
    out_dir: Path
    bundle_dir: Path | None
    manifest: LlmAdapterManifest | None
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    paused: bool = False


def _noop(*_: Any) -> None:
    pass


# ---- checks and data ------------------------------------------------------------------------

def _base_bundle(path: Path) -> LlmManifest:
    try:
        manifest = validate_bundle(path)
    except BundleError as exc:
        raise FinetuneError(f"base {path}: {exc}") from exc
    if not isinstance(manifest, LlmManifest):
        raise FinetuneError(f"base {path} is a {manifest.kind} bundle, not an LLM bundle "
                            "(make one with edgewise llm build)")
    return manifest


class _ChatTokenizer:
    """The base's chat template rendered as llama-cpp-python renders it for a chat
    completion, tokenized by llama.cpp's own vocabulary (loaded without the weights)."""

    def __init__(self, gguf: Path, template: str) -> None:
        try:
            import llama_cpp
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:
            raise FinetuneError("fine-tuning needs llama-cpp-python for the tokenizer "
                                "(pip install 'edgewise[llm]')") from exc
        try:
            self.llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise FinetuneError(f"llama.cpp cannot read the vocabulary of {gguf.name}: "
                                f"{exc}") from exc

        def text(token: int) -> str:
            return (self.llm.detokenize([token], special=True).decode("utf-8", "replace")
                    if token >= 0 else "")

        eos, bos = text(self.llm.token_eos()), text(self.llm.token_bos())
        self.prompt = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos,
                                          add_generation_prompt=True)
        self.full = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos,
                                        add_generation_prompt=False)

    def tokenize(self, text: str) -> list[int]:
        # The chat handler tokenizes the rendered template with add_bos off: the template
        # writes any special tokens itself.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def encode(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """Tokens of the conversation and, per token, whether it is the assistant's."""
        tokens: list[int] = []
        trained: list[bool] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.prompt(messages=messages[:i]).prompt
            whole = self.full(messages=messages[:i + 1]).prompt
            if not prefix.startswith(done) or not whole.startswith(prefix):
                raise ValueError("the chat template does not render this conversation as a "
                                 "prefix of its continuation")
            for piece, train in ((prefix[len(done):], False), (whole[len(prefix):], True)):
                ids = self.tokenize(piece) if piece else []
                tokens += ids
                trained += [train] * len(ids)
            done = whole
        return tokens, trained

    def close(self) -> None:
        self.llm.close()


def _row_messages(row: Any) -> list[dict[str, str]]:
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise ValueError('expected an object with "messages": [{"role", "content"}, ...]')
    unknown = set(row) - {"messages", "accept"}
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
    messages = []
    for m in row["messages"]:
        if (not isinstance(m, dict) or set(m) != {"role", "content"}
                or m["role"] not in ("system", "user", "assistant")
                or not isinstance(m["content"], str) or not m["content"].strip()):
            raise ValueError('each message needs a "role" (system, user or assistant) and a '
                             'non-empty "content"')
        messages.append({"role": m["role"], "content": m["content"]})
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's answer to train on")
    if "system" in (m["role"] for m in messages[1:]):
        raise ValueError("only the first message may be a system message")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("a conversation needs a user message")
    return messages


def load_chat_samples(path: Path, tokenizer: _ChatTokenizer, *, n_ctx: int) -> list[Sample]:
    """Every row of a chat JSONL file, checked and tokenized; the first bad row is refused
    with its line number."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"cannot read {path}: {exc}") from exc
    samples = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            messages = _row_messages(row)
            accept = row.get("accept", [])
            if not isinstance(accept, list) or not all(isinstance(a, str) and a.strip()
                                                       for a in accept):
                raise ValueError('"accept" must be a list of non-empty strings')
            tokens, trained = tokenizer.encode(messages)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise FinetuneError(f"{path}:{n}: not a chat sample: {exc}") from exc
        except Exception as exc:  # jinja2 errors while rendering the template
            raise FinetuneError(f"{path}:{n}: the chat template cannot render this "
                                f"conversation: {exc}") from exc
        if len(tokens) > n_ctx:
            raise FinetuneError(f"{path}:{n}: the sample is {len(tokens)} tokens long, longer "
                                f"than the base's context of {n_ctx} tokens; shorten it")
        if not any(trained):
            raise FinetuneError(f"{path}:{n}: the assistant's answer has no tokens")
        single = len(messages) == 2 and messages[0]["role"] == "user"
        samples.append(Sample(line=n, tokens=tuple(tokens), trained=tuple(trained),
                              prompt=messages[0]["content"] if single else None,
                              accept=tuple(accept)))
    if not samples:
        raise FinetuneError(f"{path} holds no samples")
    return samples


def _split(samples: list[Sample], val_fraction: float, seed: int,
           path: Path) -> tuple[list[Sample], list[Sample]]:
    if not 0 < val_fraction < 1:
        raise FinetuneError(f"the validation fraction must lie between 0 and 1, not "
                            f"{val_fraction}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_val = round(len(samples) * val_fraction)
    val = [samples[i] for i in sorted(order[:n_val])]
    train = [samples[i] for i in sorted(order[n_val:])]
    for name, split in (("training", train), ("validation", val)):
        if not split:
            raise FinetuneError(f"{path}: the {name} split is empty ({len(samples)} sample(s) "
                                f"at a validation fraction of {val_fraction}); add samples")
    return train, val


# ---- training ---------------------------------------------------------------------------------

def _batch(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and next-token targets (-100 where not trained)."""
    width = max(len(s.tokens) for s in samples)
    tokens = torch.zeros(len(samples), width, dtype=torch.long)
    targets = torch.full((len(samples), width), _IGNORE, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.tokens)
        tokens[i, :n] = torch.tensor(s.tokens)
        ids = torch.tensor(s.tokens[1:])
        mask = torch.tensor(s.trained[1:], dtype=torch.bool)
        targets[i, :n - 1] = torch.where(mask, ids, torch.tensor(_IGNORE))
    return tokens, targets


def _loss(model: TorchLlama, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the trained positions; the vocabulary projection runs only on
    those (the largest matrix of a small model)."""
    hidden = model.hidden(tokens)
    keep = targets != _IGNORE
    return F.cross_entropy(model.logits(hidden[keep]), targets[keep])


def _val_loss(model: TorchLlama, val: list[Sample], batch_size: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val), batch_size):
            tokens, targets = _batch(val[i:i + batch_size])
            n = int((targets != _IGNORE).sum())
            total += float(_loss(model, tokens, targets)) * n
            count += n
    return total / max(1, count)


def _save_checkpoint(path: Path, model: TorchLlama, opt: torch.optim.Optimizer,
                     state: dict[str, Any], best: dict[str, torch.Tensor]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"lora": model.lora_state(), "best": best, "optimizer": opt.state_dict(),
                "state_json": json.dumps(state)}, tmp)
    os.replace(tmp, path)


def _learning_curve(history: list[dict[str, float]], path: Path, best_step: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    train = [h for h in history if "train_loss" in h]
    val = [h for h in history if "val_loss" in h]
    ax.plot([h["step"] for h in train], [h["train_loss"] for h in train], label="train",
            alpha=0.7)
    ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="validation")
    ax.axvline(best_step, color="gray", linestyle=":", label=f"shipped (step {best_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- measuring with llama.cpp ----------------------------------------------------------------

def _answers(gguf: Path, prompts: Sequence[GoldenPrompt], *, n_ctx: int, threads: int,
             lora: Path | None = None, speed: bool = False
             ) -> tuple[list[tuple[str, bool]], float | None]:
    try:
        model = LlamaModel(gguf, n_ctx=n_ctx, threads=threads, lora_path=lora)
    except LlmError as exc:
        raise MLError(f"llama.cpp cannot load {'base + adapter' if lora else 'the base'}: "
                      f"{exc}") from exc
    try:
        results = []
        for g in prompts:
            answer = model.answer(g.prompt, max_tokens=g.max_tokens)
            results.append((answer, answer_accepted(answer, g.accept)))
        tok_s = None
        if speed and n_ctx >= 64 + 63:
            tok_s = round(model.speed(prompt_tokens=64, gen_tokens=63).gen_tok_s, 1)
    finally:
        model.close()
    return results, tok_s


# ---- the run ----------------------------------------------------------------------------------

def finetune(cfg: FinetuneConfig, *, progress: ProgressFn | None = None,
             notify: NotifyFn | None = None) -> FinetuneResult:
    progress, notify = progress or _noop, notify or _noop
    base_dir, data, out = Path(cfg.base), Path(cfg.data), Path(cfg.out_dir)
    run_dir, bundle_dir = out / "run", out / "bundle"
    ckpt = run_dir / "checkpoint.pt"

    # ---- checks (nothing written yet) ----------------------------------------------------
    if cfg.rank < 1 or cfg.lr <= 0 or cfg.batch_size < 1 or cfg.time_budget_s <= 0:
        raise FinetuneError("rank, learning rate, batch size and time budget must be positive")
    unknown = sorted(set(cfg.targets) - set(LORA_TARGETS))
    if unknown or not cfg.targets:
        raise FinetuneError(f"unknown LoRA target(s) {', '.join(unknown) or '(none)'}; choose "
                            f"from {', '.join(LORA_TARGETS)}")
    if cfg.resume and not ckpt.is_file():
        raise FinetuneError(f"nothing to resume: {ckpt} does not exist")
    if not cfg.resume and out.exists():
        hint = " (an unfinished run: add --resume)" if ckpt.is_file() else ""
        raise FinetuneError(f"{out} already exists{hint}; choose a new output directory")
    base = _base_bundle(base_dir)
    gguf = base_dir / base.llm.model
    if not data.is_file():
        raise FinetuneError(f"{data}: no such file")
    progress("tokenize", 0, 1)
    tokenizer = _ChatTokenizer(gguf, base.llm.chat_template)
    try:
        samples = load_chat_samples(data, tokenizer, n_ctx=base.llm.n_ctx)
    finally:
        tokenizer.close()
    train, val = _split(samples, cfg.val_fraction, cfg.seed, data)
    progress("tokenize", 1, 1)
    if cfg.golden is not None:
        candidates = tuple(cfg.golden)
    else:
        # One per question (a question may appear with several phrasings of its answer).
        by_prompt = {s.prompt: s for s in val if s.prompt and s.accept}
        candidates = tuple(GoldenPrompt(prompt=p, accept=s.accept, max_tokens=32)
                           for p, s in by_prompt.items())
    if not candidates:
        raise FinetuneError(f"{data}: no golden prompts: give --golden, or add \"accept\": "
                            "[...] to single-question rows (those in the validation split "
                            "become the adapter's golden prompts)")
    threads = cfg.threads or free_cores()
    torch.set_num_threads(threads)

    # ---- run directory and resolved config ------------------------------------------------
    resolved = {**asdict(cfg), "base": str(base_dir.resolve()), "data": str(data.resolve()),
                "alpha": cfg.lora_alpha, "targets": list(cfg.targets),
                "golden": [g.model_dump() for g in candidates], "threads": threads,
                "base_release": base.release_name,
                "base_sha256": base.files[base.llm.model].sha256,
                "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                "n_train": len(train), "n_val": len(val)}
    if cfg.resume:
        saved = json.loads((run_dir / "config.json").read_text())
        diff = [k for k in _RESUME_KEYS if saved.get(k) != json.loads(json.dumps(resolved[k]))]
        if diff:
            raise FinetuneError(f"cannot resume: the run was started with other settings "
                                f"({', '.join(diff)})")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")

    # ---- model -----------------------------------------------------------------------------
    progress("load base weights", 0, 1)
    model = load_gguf_llama(gguf)
    model.add_lora(rank=cfg.rank, alpha=cfg.lora_alpha, targets=cfg.targets, seed=cfg.seed)
    progress("load base weights", 1, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    state: dict[str, Any] = {"step": 0, "elapsed_s": 0.0, "best_val": math.inf,
                             "best_step": 0, "history": []}
    best = model.lora_state()
    if cfg.resume:
        ck = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_lora_state(ck["lora"])
        opt.load_state_dict(ck["optimizer"])
        best, state = ck["best"], json.loads(ck["state_json"])
        notify(f"resuming at step {state['step']} ({state['elapsed_s']:.0f}s trained)")

    # ---- tracking, training, export --------------------------------------------------------
    with contextlib.ExitStack() as stack:
        tracker = None
        if cfg.track:
            tracker = stack.enter_context(Tracker(
                cfg.tracking_uri or default_tracking_uri(run_dir), run_dir,
                run_name=f"finetune-{base.name}-r{cfg.rank}"))
            tracker.log_params({k: v for k, v in resolved.items() if k != "golden"})
        run_id = tracker.run_id if tracker else None
        trained = _train(cfg, model, opt, train, val, state, best, ckpt, tracker, progress,
                         notify)
        if trained is None:
            notify(f"paused after step {state['step']}; continue with --resume")
            return FinetuneResult(out, None, None, state["history"], run_id=run_id,
                                  paused=True)
        model.load_lora_state(trained)
        manifest, metrics = _export(cfg, base, base_dir, model, state, candidates, run_dir,
                                    bundle_dir, threads, train, val, progress, notify)
        if tracker:
            tracker.log_metrics({k: v for k, v in metrics.items()
                                 if isinstance(v, int | float)}, step=state["step"])
            tracker.log_artifact(run_dir / "learning_curve.png")
            tracker.log_artifact(bundle_dir / "MODEL_CARD.md")
            tracker.set_tag("bundle", str(bundle_dir))
    return FinetuneResult(out, bundle_dir, manifest, state["history"], metrics, run_id)


def _train(cfg: FinetuneConfig, model: TorchLlama, opt: torch.optim.Optimizer,
           train: list[Sample], val: list[Sample], state: dict[str, Any],
           best: dict[str, torch.Tensor], ckpt: Path, tracker: Tracker | None,
           progress: ProgressFn, notify: NotifyFn) -> dict[str, torch.Tensor] | None:
    """Train until the time budget (or `max_steps`) is spent; returns the best adapter by
    validation loss, or None when paused by `stop_after_steps`."""
    budget = cfg.time_budget_s
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    started = time.perf_counter() - state["elapsed_s"]
    history: list[dict[str, float]] = state["history"]
    first_step = state["step"]
    warmup = 5

    def done_fraction() -> float:
        """How far training is towards its end, whichever comes first: budget or steps."""
        spent = (time.perf_counter() - started) / budget
        steps = state["step"] / cfg.max_steps if cfg.max_steps else 0.0
        return min(1.0, max(spent, steps))

    def evaluate() -> None:
        nonlocal best
        model.eval()
        loss = _val_loss(model, val, cfg.batch_size)
        model.train()
        history.append({"step": state["step"], "val_loss": round(loss, 5)})
        if tracker:
            tracker.log_metrics({"val_loss": loss}, step=state["step"])
        if loss < state["best_val"]:
            state["best_val"], state["best_step"] = loss, state["step"]
            best = model.lora_state()
        state["elapsed_s"] = time.perf_counter() - started
        _save_checkpoint(ckpt, model, opt, state, best)

    if not history:
        evaluate()  # the base's own loss: the baseline every adapter must beat
    model.train()
    try:
        while True:
            elapsed = time.perf_counter() - started
            if elapsed >= budget or (cfg.max_steps is not None and state["step"] >= cfg.max_steps):
                break
            if (cfg.stop_after_steps is not None
                    and state["step"] - first_step >= cfg.stop_after_steps):
                if history[-1].get("step") != state["step"] or "val_loss" not in history[-1]:
                    evaluate()
                return None
            epoch, pos = divmod(state["step"], steps_per_epoch)
            order = list(range(len(train)))
            random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
            batch = [train[i] for i in order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]]
            tokens, targets = _batch(batch)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * min(1.0, (state["step"] + 1) / warmup)
            loss = _loss(model, tokens, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                           1.0)
            opt.step()
            state["step"] += 1
            history.append({"step": state["step"], "train_loss": round(loss.item(), 5),
                            "epoch": epoch})
            if tracker:
                tracker.log_metrics({"train_loss": loss.item()}, step=state["step"])
            progress("train", done_fraction(), 1.0)
            if state["step"] % cfg.eval_every == 0:
                evaluate()
    except KeyboardInterrupt:
        state["elapsed_s"] = time.perf_counter() - started
        _save_checkpoint(ckpt, model, opt, state, best)
        notify(f"interrupted at step {state['step']}: saved; continue with --resume")
        raise
    if "val_loss" not in history[-1]:
        evaluate()
    progress("train", 1.0, 1.0)
    if state["best_step"] == 0:
        raise FinetuneError(f"no step lowered the validation loss below the base's "
                            f"({state['best_val']:.4f}) in {state['step']} steps: give a "
                            "longer --time-budget, more data or another learning rate")
    return best


def _export(cfg: FinetuneConfig, base: LlmManifest, base_dir: Path, model: TorchLlama,
            state: dict[str, Any], candidates: tuple[GoldenPrompt, ...], run_dir: Path,
            bundle_dir: Path, threads: int, train: list[Sample], val: list[Sample],
            progress: ProgressFn, notify: NotifyFn) -> tuple[LlmAdapterManifest, dict]:
    gguf = base_dir / base.llm.model
    name = cfg.name or f"{base.name}-lora"[:64]
    adapter = run_dir / ADAPTER_FILE
    adapter_bytes = write_lora_gguf(adapter, model.lora_state(), alpha=cfg.lora_alpha,
                                    architecture=base.llm.architecture, name=name)
    _learning_curve(state["history"], run_dir / "learning_curve.png", state["best_step"])

    # ---- measure with llama.cpp: candidates and the base's golden, with and without ------
    progress("measure with llama.cpp", 0, 2)
    n_ctx = base.llm.n_ctx
    before, base_tok_s = _answers(gguf, candidates, n_ctx=n_ctx, threads=threads, speed=True)
    progress("measure with llama.cpp", 1, 2)
    after, lora_tok_s = _answers(gguf, (*candidates, *base.llm.golden), n_ctx=n_ctx,
                                 threads=threads, lora=adapter, speed=True)
    progress("measure with llama.cpp", 2, 2)
    learned, base_kept = after[:len(candidates)], after[len(candidates):]
    passed = [g for g, (_a, ok) in zip(candidates, learned, strict=True) if ok]
    # New behaviour first: prompts the base failed and base + adapter answers.
    passed.sort(key=lambda g: before[candidates.index(g)][1])
    golden = tuple(passed[:cfg.max_golden])
    if not golden:
        lines = "; ".join(f"{g.prompt!r} -> {a[:60]!r}" for g, (a, _ok) in
                          zip(candidates, learned, strict=True))
        raise FinetuneError(f"with the adapter, llama.cpp answers none of the {len(candidates)} "
                            f"golden prompts ({lines}); train longer (--time-budget) or check "
                            f"the data. The adapter is at {adapter} (resume with --resume)")
    base_golden_kept = sum(ok for _a, ok in base_kept)
    if base_golden_kept < len(base.llm.golden):
        notify(f"warning: with the adapter the base answers {base_golden_kept} of its "
               f"{len(base.llm.golden)} golden prompts")
    metrics = {
        "best_val_loss": round(state["best_val"], 5), "best_step": state["best_step"],
        "base_val_loss": next(h["val_loss"] for h in state["history"] if "val_loss" in h),
        "steps": state["step"], "train_s": round(state["elapsed_s"], 1),
        "n_train": len(train), "n_val": len(val),
        "golden_passed": len(passed), "golden_total": len(candidates),
        "golden_passed_base": sum(ok for _a, ok in before),
        "base_golden_passed_with_adapter": base_golden_kept,
        "base_golden_total": len(base.llm.golden),
        "adapter_bytes": adapter_bytes, "base_gguf_bytes": base.files[base.llm.model].size,
        "gen_tok_s_base": base_tok_s, "gen_tok_s_adapter": lora_tok_s}
    spec = AdapterSpec(
        adapter=ADAPTER_FILE, base_release=base.release_name,
        base_sha256=base.files[base.llm.model].sha256,
        base_chat_template_sha256=base.llm.chat_template_sha256,
        rank=cfg.rank, alpha=cfg.lora_alpha, target_modules=tuple(cfg.targets), n_ctx=n_ctx,
        golden=golden, base_golden=base.llm.golden,
        reference={**metrics, "threads": threads, "machine": platform.machine(),
                   "cores": os.cpu_count() or 1,
                   "answers": [{"prompt": g.prompt, "base": b[0][:120], "adapter": a[0][:120],
                                "passed": a[1]}
                               for g, b, a in zip(candidates, before, learned, strict=True)]})
    card = _model_card(name, cfg, base, spec, metrics)
    out_parent = bundle_dir.parent
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out_parent))
    try:
        manifest = write_llm_adapter_bundle(
            staging / "bundle", name=name, version=cfg.version, adapter=spec, gguf=adapter,
            extra_files={"MODEL_CARD.md": card.encode(),
                         "learning_curve.png": run_dir / "learning_curve.png"},
            metrics=metrics,
            provenance={"base": base.release_name, "data": Path(cfg.data).name,
                        "trainer": "edgewise llm finetune (torch LoRA on GGUF weights)"})
        (staging / "bundle").rename(bundle_dir)
    except (BundleError, ValueError) as exc:
        raise FinetuneError(f"cannot write the adapter bundle: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest, metrics


def _model_card(name: str, cfg: FinetuneConfig, base: LlmManifest, spec: AdapterSpec,
                m: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {a['prompt']} | {a['base'].strip()[:50]} | {a['adapter'].strip()[:50]} | "
        f"{'yes' if a['passed'] else 'no'} |" for a in spec.reference["answers"])
    mb, base_mb = m["adapter_bytes"] / 2**20, m["base_gguf_bytes"] / 2**20
    facts = [
        f"adapter: {mb:.2f} MB, {100 * mb / base_mb:.1f}% of the {base_mb:.1f} MB base",
        f"trained {m['steps']} steps in {m['train_s']:.0f} s on this CPU: {m['n_train']} "
        f"samples, {m['n_val']} held out",
        f"validation loss {m['base_val_loss']:.4f} (the base) -> {m['best_val_loss']:.4f} "
        f"(step {m['best_step']}, the adapter shipped); learning curve: learning_curve.png",
        f"generation: {m['gen_tok_s_adapter']} tokens/s with the adapter, "
        f"{m['gen_tok_s_base']} without",
        f"the base's own golden prompts with the adapter: "
        f"{m['base_golden_passed_with_adapter']} of {m['base_golden_total']} pass"]
    bullets = "\n".join(f"- {f}" for f in facts)
    return f"""# {name}

A LoRA adapter (rank {spec.rank}, alpha {spec.alpha:g}) for **{base.release_name}**: it applies
only to the GGUF with sha256 `{spec.base_sha256[:16]}...`. Adapted projections:
{', '.join(spec.target_modules)} in all {base.llm.architecture} blocks.

{bullets}

## Golden prompts (greedy, llama.cpp, base vs base + adapter)

{m['golden_passed']} of {m['golden_total']} pass with the adapter, {m['golden_passed_base']}
without; the manifest keeps up to {cfg.max_golden} that pass, those the base fails first.

| prompt | base | base + adapter | passed |
|---|---|---|---|
{rows}
"""
