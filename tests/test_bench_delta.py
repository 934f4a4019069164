"""The delta benchmark's entropy floor estimate, on a pair whose entropy is known."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import zstandard
from safetensors.numpy import save_file

BENCH = Path(__file__).resolve().parents[1] / "bench" / "delta.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_delta", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_iid_floor_is_the_entropy_of_the_moves(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    # Two exponents, half the weights each; the floor is the entropy given the exponent.
    old = np.concatenate([rng.uniform(1.25, 1.75, n // 2),    # moved by 8 bits' worth
                          rng.uniform(2.5, 3.5, n // 2)]).astype(np.float32)  # by 4 bits'
    spread = np.repeat([128, 8], n // 2)
    moves = rng.integers(-spread, spread).astype(np.int32)  # whole ulps, uniform
    new = (old.view(np.int32) + moves).view(np.float32)
    perm = rng.permutation(n)
    old, new = old[perm], new[perm]
    steps = np.arange(1000, dtype=np.int64)
    still = rng.normal(size=4096).astype(np.float32)
    save_file({"w": old, "steps": steps, "still": still}, str(tmp_path / "old.safetensors"))
    save_file({"w": new, "steps": steps + 1, "still": still}, str(tmp_path / "new.safetensors"))

    floor = _bench().iid_floor_bytes(tmp_path / "old.safetensors", tmp_path / "new.safetensors")
    # The unchanged tensor costs nothing; the changed integer one its zstd size.
    ints = len(zstandard.ZstdCompressor(level=19).compress((steps + 1).tobytes()))
    expected = (n // 2) * (8 + 4) / 8
    assert abs((floor - ints) - expected) < 0.005 * expected, (floor - ints) / expected
