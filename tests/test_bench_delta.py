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
    old = rng.uniform(1.25, 1.75, n).astype(np.float32)  # one exponent, positive
    # Every weight moved by a uniform whole number of ulps in [-128, 127]: 8 bits each.
    new = (old.view(np.int32) + rng.integers(-128, 128, n).astype(np.int32)).view(np.float32)
    steps = np.arange(1000, dtype=np.int64)
    still = rng.normal(size=4096).astype(np.float32)
    save_file({"w": old, "steps": steps, "still": still}, str(tmp_path / "old.safetensors"))
    save_file({"w": new, "steps": steps + 1, "still": still}, str(tmp_path / "new.safetensors"))

    floor = _bench().iid_floor_bytes(tmp_path / "old.safetensors", tmp_path / "new.safetensors")
    # The unchanged tensor costs nothing; the changed integer one its zstd size.
    ints = len(zstandard.ZstdCompressor(level=19).compress((steps + 1).tobytes()))
    assert abs((floor - ints) - n) < 0.005 * n, (floor - ints) / n
