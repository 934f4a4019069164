"""Decoding streams: peak memory stays bounded whatever the file size (measured, not assumed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgewise.artifacts.delta import encode_delta

from .test_delta import safetensors_bytes

# A tiny interpreter forks and execs the measured one, so the child's high-water mark is not
# inherited from this (large) pytest process; wait4() reports the child's own peak RSS.
_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def peak_rss_mb(code: str) -> float:
    proc = subprocess.run([sys.executable, "-S", "-I", "-c", _WRAPPER, sys.executable, "-c", code],
                          capture_output=True, text=True, check=True)
    rss_kb, status = proc.stdout.split()[-2:]
    assert status == "0", proc.stderr
    return int(rss_kb) / 1024


def _write_file(path: Path, tensors: dict[str, np.ndarray]) -> None:
    path.write_bytes(safetensors_bytes(tensors))


def test_decode_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n_tensors, per = 24, 1 << 20  # 24 x 4 MiB = 96 MiB
    old = {f"layer.{i}.w": rng.standard_normal(per, dtype=np.float32) * np.float32(0.02)
           for i in range(n_tensors)}
    new = dict(old)
    for i in (0, 12, n_tensors - 1):  # a fine-tune of a few layers; long unchanged runs
        new[f"layer.{i}.w"] = old[f"layer.{i}.w"] + np.float32(1e-4)
    new["renamed.w"] = new.pop("layer.1.w")
    _write_file(tmp_path / "old", old)
    _write_file(tmp_path / "new", new)
    del old, new
    size_mb = (tmp_path / "new").stat().st_size / 2**20
    info = encode_delta(tmp_path / "old", tmp_path / "new", tmp_path / "patch", level=1)
    assert info.patch_size < 0.2 * info.result_size

    args = json.dumps([str(tmp_path / "old"), str(tmp_path / "patch"), str(tmp_path / "out")])
    baseline = peak_rss_mb("import edgewise.artifacts.delta")
    start = time.perf_counter()
    peak = peak_rss_mb(f"import json; from edgewise.artifacts.delta import apply_delta; "
                       f"apply_delta(*json.loads({args!r}))")
    elapsed = time.perf_counter() - start
    assert (tmp_path / "out").read_bytes() == (tmp_path / "new").read_bytes()
    print(f"file {size_mb:.0f} MiB, import {baseline:.0f} MB, decode peak {peak:.0f} MB, "
          f"{elapsed:.1f} s")
    assert peak < 100, f"decode peak RSS {peak:.0f} MB for a {size_mb:.0f} MiB file"
    assert peak - baseline < 32, f"decoder used {peak - baseline:.0f} MB above its imports"
