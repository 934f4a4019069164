"""Serve one ONNX model in a fresh process and report its peak RSS (run as a module).

Invariant: the process imports nothing but numpy and onnxruntime, so its peak RSS is what a
device's inference process needs for this model: interpreter + runtime + model + arena.
`baseline_rss_mb` is the peak before the model was loaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys


def _peak_mb() -> float:
    # VmHWM is this address space's high-water mark. ru_maxrss is not usable here: Linux
    # carries it across exec, so a child forked from a big parent (torch loaded) would report
    # the parent's peak.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime as ort

    baseline = _peak_mb()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(args.runs):
        session.run(None, {inp.name: x})
    json.dump({"peak_rss_mb": round(_peak_mb(), 1), "baseline_rss_mb": round(baseline, 1)},
              sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
