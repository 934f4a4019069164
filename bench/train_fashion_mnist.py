"""Fashion-MNIST on a CPU: the default `auto` recipe against the baselines, one JSON line each.

Runs, top to bottom (sequentially, so no run competes with another for the cores):
  1. small data (100 images per class): `auto` (transfer learning) vs the plain from-scratch
     CNN of step 3 (the issue's baseline) and vs Edgewise's own from-scratch recipe
     (fast-cnn, EMA, flip averaging), same budget (default 3 min);
  2. `feature-extract` (the last layer's features) on the same small data, no budget (it takes
     what it takes), and fine-tuning the last blocks (what `auto` did before it used the middle
     blocks' features);
  3. full training split: `auto` vs a plain from-scratch CNN (BN, dropout, flips, label
     smoothing, one-cycle AdamW) at the same budget (default 15 min);
  4. the naive recipe: every layer of the pretrained EfficientNet-Lite0 trained at 224 px.
Model selection uses a validation split only; accuracy is on the official test split, scored by
onnxruntime on the exported bundle (the naive run scores a stratified 2,000-image test subset,
since 10,000 images at 224 px alone would take minutes on 2 cores; the line says so).

Each line: {"recipe", "train_images", "test_accuracy", "wall_s", "cores", ...} plus the budget,
strategy, epochs and the 1-minute load average at start and end, because other work on a shared
machine slows every figure down.

    python bench/train_fashion_mnist.py [--budget 15m] [--small-budget 3m] [--only auto,naive]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgewise.ml.train import TrainConfig, parse_duration, train

PLAIN_CNN = {"strategy": "from-scratch", "backbone": "small-cnn", "augment": "flip",
             "optimizer": "adamw", "lr": 2e-3, "dropout": 0.3, "ema": False,
             "tta_flip": False}
NAIVE = {"strategy": "fine-tune", "trainable_blocks": 0, "resolution": 224,
         "backbone_lr_mult": 1.0, "lr": 1e-3, "augment": "light", "ema": False,
         "batch_size": 32, "test_per_class": 200}


def run(recipe: str, work: Path, **overrides) -> dict:
    load0 = os.getloadavg()[0]
    out = work / recipe
    t0 = time.perf_counter()
    result = train(TrainConfig(out_dir=str(out), track=False, **overrides),
                   notify=lambda m: print(f"  [{recipe}] {m}", file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    m = result.metrics
    line = {"recipe": recipe, "train_images": m["train_images"],
            "test_accuracy": m["test_accuracy"], "wall_s": round(wall, 1),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "strategy": result.choice.strategy, "backbone": overrides.get("backbone")
            or result.choice.backbone, "budget_s": overrides.get("time_budget_s"),
            "epochs": m.get("epochs"), "val_images": m["val_images"],
            "test_images": m["test_images"], "val_accuracy": m["val_accuracy"],
            "load_avg_start": round(load0, 2), "load_avg_end": round(os.getloadavg()[0], 2),
            "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(line), flush=True)
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="15m")
    ap.add_argument("--small-budget", default="3m")
    ap.add_argument("--small-per-class", type=int, default=100)
    ap.add_argument("--small-test-per-class", type=int, default=300)
    ap.add_argument("--only", default="", help="comma-separated recipe names")
    ap.add_argument("--work", default=None, help="keep outputs here (default: temp dir)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every run (default: the cores the load leaves free)")
    args = ap.parse_args()
    budget, small_budget = parse_duration(args.budget), parse_duration(args.small_budget)
    only = {s for s in args.only.split(",") if s}
    work = Path(args.work or tempfile.mkdtemp(prefix="edgewise-bench-"))
    # Small-data runs score a stratified 3,000-image subset of the official test split: on a
    # busy 2-core machine scoring all 10,000 images at 64 px would eat most of a 3-min budget.
    small = {"train_per_class": args.small_per_class,
             "test_per_class": args.small_test_per_class}
    plan = [
        ("small-auto", {**small, "time_budget_s": small_budget}),
        ("small-plain-cnn", {**small, **PLAIN_CNN, "time_budget_s": small_budget}),
        ("small-from-scratch", {**small, "strategy": "from-scratch",
                                "time_budget_s": small_budget}),
        ("small-feature-extract", {**small, "strategy": "feature-extract"}),
        # What `auto` chose for case 3 before it took the middle blocks' features.
        ("small-fine-tune", {**small, "strategy": "fine-tune", "augment": "none",
                             "time_budget_s": small_budget}),
        ("auto", {"time_budget_s": budget}),
        ("plain-cnn", {**PLAIN_CNN, "time_budget_s": budget}),
        ("naive-224", {**NAIVE, "time_budget_s": budget}),
    ]
    for recipe, overrides in plan:
        if not only or recipe in only:
            run(recipe, work, **overrides, **({"threads": args.threads} if args.threads else {}))


if __name__ == "__main__":
    main()
