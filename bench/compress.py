"""Benchmark: compression candidates of the Fashion-MNIST bundle, measured (JSON lines).

Targets (issue 7), on the Fashion-MNIST bundle, int8 static against fp32 in the same run:
size <= 0.27x, p50 latency <= 0.5x (1 and 2 threads), test accuracy loss <= 0.5 points.

    .venv/bin/python bench/compress.py                  # builds the quick bundle once
    .venv/bin/python bench/compress.py --bundle DIR     # any bundle (e.g. from edgewise train)

Prints one JSON line per candidate, then one line with the machine and the target verdicts.
The machine may be shared: latency is interleaved across candidates and only ratios measured
in this run are compared; the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from edgewise.artifacts import BundleError, validate_bundle
from edgewise.ml.compress import CompressConfig, GuardPolicy, compress_bundle

TARGETS = {"size_ratio": 0.27, "p50_latency_ratio": 0.5, "accuracy_drop_pt": 0.5}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle to compress (default: build the "
                        "quick Fashion-MNIST bundle into --workdir once)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgewise-bench-compress"))
    parser.add_argument("--test-images", type=int, default=0, help="0: whole test split (10k)")
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=40, help="latency rounds x 5 runs")
    parser.add_argument("--prune-keep", type=float, default=0.75)
    parser.add_argument("--prune-epochs", type=float, default=1.0)
    parser.add_argument("--distill-epochs", type=float, default=15.0)
    parser.add_argument("--quick", action="store_true", help="small settings, for a smoke run")
    args = parser.parse_args()

    # ---- the input bundle ---------------------------------------------------------------------
    bundle = args.bundle
    if bundle is None:
        bundle = args.workdir / "fmnist-quick"
        try:
            validate_bundle(bundle)
            log(f"reusing {bundle}")
        except BundleError:
            from edgewise.ml.quick import build_feature_head_bundle

            log("building the quick Fashion-MNIST bundle (EfficientNet-Lite0 at 64 px + head)")
            build_feature_head_bundle(bundle, name="fmnist-quick", version="1.0.0")

    # ---- compress and measure -----------------------------------------------------------------
    if args.quick:
        args.test_images, args.train_images, args.rounds = 1000, 1000, 10
        args.distill_epochs = 3.0
    config = CompressConfig(
        # The second int8-static is onnxruntime's default signed-activation (s8s8) flavour,
        # kept to show what the per-CPU choice buys.
        recipes=("fp16", "int8-dynamic", "int8-static", "int8-static:activation=int8", "prune",
                 "distill"),
        recipe_options={"prune": {"keep": args.prune_keep, "epochs": args.prune_epochs},
                        "distill": {"epochs": args.distill_epochs,
                                    "widths": [32, 64, 128]}},
        test_images=args.test_images or None, train_images=args.train_images,
        latency_rounds=args.rounds, policy=GuardPolicy(max_drop_pt=1.0))
    last: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last.get(stage, 0) > 15:
            last[stage] = now
            log(f"{stage} {done}/{total}")

    started = time.perf_counter()
    report = compress_bundle(bundle, args.workdir / "candidates", config, progress=progress)

    # ---- results ------------------------------------------------------------------------------
    for line in report.json_lines():
        print(json.dumps(line), flush=True)
    int8 = report.candidate("int8-static")
    held = {
        "size_ratio": int8.size_ratio <= TARGETS["size_ratio"],
        "p50_latency_ratio_1t": int8.p50_ratio[1] <= TARGETS["p50_latency_ratio"],
        "p50_latency_ratio_2t": int8.p50_ratio[2] <= TARGETS["p50_latency_ratio"],
        "accuracy_drop_pt": int8.accuracy_drop_pt <= TARGETS["accuracy_drop_pt"],
    }
    print(json.dumps({"summary": "int8-static targets", "targets": TARGETS, "held": held,
                      "all_held": all(held.values()), "failed_recipes": report.failed,
                      "cpu": {k: report.cpu[k] for k in ("arch", "model", "logical_cpus",
                                                         "avx2", "avx512_vnni", "arm_dotprod")},
                      "load_avg_start": report.run["load_avg_start"],
                      "load_avg_end": report.run["load_avg_end"],
                      "test_images": report.run["test_images"],
                      "report": str(args.workdir / "candidates" / "report.md"),
                      "wall_s": round(time.perf_counter() - started, 1),
                      "pid": os.getpid()}), flush=True)
    return 0 if all(held.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
