"""Measurements of candidate models: size, peak RSS while serving, latency, accuracy.

Invariant: every figure comes from running the model in this process or a child process during
this call; latency of all candidates is measured interleaved (round-robin, same input, same
thread count) so that load from other processes hits every candidate alike, and ratios are only
ever taken between figures of the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._errors import CompressError

__all__ = ["LatencyStats", "accuracy", "measure_latency", "ort_session", "peak_rss",
           "run_batched"]


def ort_session(model_path: Path | str, threads: int | None = 1):
    """A CPU session; spinning off, so a waiting thread yields its core on a shared machine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(model_path), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise CompressError(f"{model_path}: onnxruntime cannot load the model: {exc}") from exc


def run_batched(session, inputs: np.ndarray, batch: int = 128,
                progress: Callable[[str, int, int], None] | None = None,
                stage: str = "run") -> np.ndarray:
    name = session.get_inputs()[0].name
    outs = []
    for i in range(0, len(inputs), batch):
        outs.append(session.run(None, {name: inputs[i:i + batch]})[0])
        if progress:
            progress(stage, min(i + batch, len(inputs)), len(inputs))
    return np.concatenate(outs)


def accuracy(model_path: Path, inputs: np.ndarray, labels: np.ndarray,
             threads: int | None = None) -> tuple[float, np.ndarray]:
    """Top-1 accuracy and the logits."""
    logits = run_batched(ort_session(model_path, threads), inputs)
    return float((logits.argmax(1) == labels).mean()), logits


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p95_ms: float
    samples: int


def measure_latency(models: Mapping[str, Path], one: np.ndarray, *, threads: int,
                    rounds: int = 30, runs_per_round: int = 5, warmup: int = 5
                    ) -> dict[str, LatencyStats]:
    """Batch-1 latency of every model, interleaved round-robin in one process."""
    sessions = {k: ort_session(p, threads) for k, p in models.items()}
    names = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, {names[k]: one})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    for r in range(rounds):
        # Rotate the order so no candidate always runs right after the same neighbour.
        for k in order[r % len(order):] + order[:r % len(order)]:
            s, feed = sessions[k], {names[k]: one}
            for _ in range(runs_per_round):
                t0 = time.perf_counter()
                s.run(None, feed)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: LatencyStats(float(np.percentile(v, 50)), float(np.percentile(v, 95)), len(v))
            for k, v in times.items()}


def peak_rss(model_path: Path, threads: int = 1, runs: int = 20) -> dict[str, float]:
    """Peak RSS (MiB) of a fresh process that loads `model_path` and serves `runs` requests."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        proc = subprocess.run(
            # Run the file, not the module: `-m` would import edgewise.ml (and torch) first.
            [sys.executable, str(Path(__file__).with_name("_probe.py")), str(model_path),
             "--threads", str(threads), "--runs", str(runs)],
            capture_output=True, text=True, timeout=300, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CompressError(f"{model_path}: serving probe timed out") from exc
    if proc.returncode != 0:
        raise CompressError(f"{model_path}: serving probe failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)
