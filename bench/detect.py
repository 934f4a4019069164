"""Object detection benchmark: the CenterNet detector on SYNTHETIC scenes, through the shipped
code paths (training and bundle as `edgewise train --task detect` makes them, scoring as the
device runs the bundle).

    python bench/detect.py [--scenes 3000] [--size 160] [--budget 15m] [--test-scenes 500]
                           [--threads N] [--compress]

Training runs on `--threads` torch threads (default: every core), pinned and reported in
every line that depends on it, not guessed from the load average: a run started right after
other work would otherwise train on fewer threads than the figure claims.

Prints JSON lines on stdout:
  {"bench": "detect-data", ...}     the synthetic sets: Fashion-MNIST *train* items for training
                                    and validation, scenes of *test* items (another seed) held
                                    out; figures on them are not figures on photographs
  {"bench": "detect-train", "backbone": "pretrained" | "scratch", "val_map50", "val_map50_95",
   "steps", "train_s", "wall_s", "threads"}
                                    the default recipe (ImageNet EfficientNet-Lite0, frozen then
                                    later blocks tuned) and the issue's baseline, the same
                                    detector from a random backbone, at the same budget
  {"bench": "detect-onnx", "backbone": ..., "test_map50", "test_map50_95", "onnx_bytes"}
                                    the bundle scored as `edgewise eval` scores it (the
                                    manifest's preprocessing -> onnxruntime -> boxes in image
                                    pixels -> pycocotools) on the held-out scenes
  {"bench": "detect-latency", "threads": 1 | 2, "p50_ms", "p95_ms"}
                                    per image, batch 1, the pretrained bundle in the agent's
                                    runtime (PNG -> preprocessing -> onnxruntime)
  {"bench": "detect-compress", "candidate": "fp32" | "int8-static" | "fp16", "map50",
   "map50_drop_pt", "map50_95", "map50_95_drop_pt", "p50_ms", "p50_latency_ratio", ...}
                                    with --compress: `edgewise compress` on the pretrained
                                    bundle (calibration on training scenes, mAP on the held-out
                                    scenes), its report's lines
  {"bench": "detect-goals", ...}    the issue's goals: mAP@0.5 >= 0.85 after 15 minutes; transfer
                                    learning >= 5 points ahead of scratch; with --compress, int8
                                    <= 0.5x fp32's p50 latency (1 thread) losing <= 1 point of
                                    mAP@0.5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgewise.artifacts import validate_bundle
from edgewise.ml.detect import (
    DetectConfig,
    SynthConfig,
    detection_stats,
    evaluate_detector_bundle,
    synth_scenes,
    train_detector,
)
from edgewise.ml.train import parse_duration

GOAL_MAP50 = 0.85
GOAL_TRANSFER_POINTS = 5.0
GOAL_INT8_P50_RATIO = 0.5
GOAL_INT8_MAP50_DROP_PT = 1.0


def emit(line: dict) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def latency(bundle: Path, test, threads: int, runs: int) -> dict:
    from edgewise.agent import OnnxModel, preprocess_image

    model = OnnxModel(bundle, threads=threads)
    xs = [preprocess_image(png(image), model.manifest.preprocessing)
          for image in test.images[:runs]]
    for x in xs[:3]:
        model.detect(x)
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        model.detect(xs[i % len(xs)])
        times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 2),
            "p95_ms": round(float(np.percentile(times, 95)), 2), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=3000, help="training + validation scenes")
    ap.add_argument("--test-scenes", type=int, default=500)
    ap.add_argument("--size", type=int, default=160, help="scene and input side, px")
    ap.add_argument("--budget", default="15m", help="training budget per detector")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-scratch", action="store_true", help="skip the from-scratch baseline")
    ap.add_argument("--latency-runs", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads for training (default: every core)")
    ap.add_argument("--augment", default="default", help="default | flip | none")
    ap.add_argument("--compress", action="store_true",
                    help="also compress the pretrained bundle (int8-static, fp16) and measure")
    ap.add_argument("--calib-scenes", type=int, default=128,
                    help="--compress: training scenes to calibrate int8 on")
    args = ap.parse_args()
    budget_s = parse_duration(args.budget)
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    work = Path(tempfile.mkdtemp(prefix="bench-detect-"))
    emit({"bench": "detect-env", "cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0],
          "budget_s": budget_s, "size": args.size, "batch_size": args.batch_size,
          "augment": args.augment, "threads": args.threads})

    t0 = time.perf_counter()
    data = synth_scenes(SynthConfig(scenes=args.scenes, size_px=args.size, seed=args.seed))
    test = synth_scenes(SynthConfig(scenes=args.test_scenes, size_px=args.size,
                                    seed=args.seed + 1000, split="test"))
    emit({"bench": "detect-data", "synthetic": True, "scenes": len(data),
          "boxes": data.num_boxes, "test_scenes": len(test), "test_boxes": test.num_boxes,
          "classes": len(data.class_names), "size": args.size,
          "seconds": round(time.perf_counter() - t0, 1),
          "test_box_size_bins": detection_stats(test)["box_size_bins"]})

    results = {}
    for backbone in ("pretrained", *(() if args.no_scratch else ("scratch",))):
        log(f"training {backbone} for {budget_s:.0f} s")
        t0 = time.perf_counter()
        cfg = DetectConfig(data="synthetic", out_dir=str(work / backbone),
                           input_size=args.size, time_budget_s=budget_s,
                           batch_size=args.batch_size, pretrained=backbone == "pretrained",
                           val_every_s=max(30.0, budget_s / 5), seed=args.seed,
                           name=f"synth-{backbone}", augment=args.augment,
                           threads=args.threads)
        r = train_detector(cfg, dataset=data)
        m = r.metrics
        emit({"bench": "detect-train", "backbone": backbone, "val_map50": round(m["val_map50"], 4),
              "val_map50_95": round(m["val_map50_95"], 4), "steps": m["steps"],
              "train_s": m["train_s"], "wall_s": round(time.perf_counter() - t0, 1),
              "train_images": m["train_images"], "val_images": m["val_images"],
              "threads": args.threads, "loadavg_1m": os.getloadavg()[0]})
        onnx_bytes = (r.out_dir / "model.onnx").stat().st_size
        if r.bundle_dir is None:
            emit({"bench": "detect-onnx", "backbone": backbone, "bundle": None,
                  "onnx_bytes": onnx_bytes, "warnings": m.get("warnings")})
            results[backbone] = {"val_map50": m["val_map50"], "test_map50": None}
            continue
        s = evaluate_detector_bundle(r.bundle_dir, validate_bundle(r.bundle_dir), test)
        emit({"bench": "detect-onnx", "backbone": backbone, "test_map50": round(s["map50"], 4),
              "test_map50_95": round(s["map50_95"], 4), "onnx_bytes": onnx_bytes,
              "per_class_ap50": {k: None if v["ap50"] is None else round(v["ap50"], 3)
                                 for k, v in s["per_class"].items()}})
        results[backbone] = {"val_map50": m["val_map50"], "test_map50": s["map50"],
                             "bundle": r.bundle_dir}

    bundle = results["pretrained"].get("bundle")
    if bundle is not None:
        for threads in (1, 2):
            emit({"bench": "detect-latency", "threads": threads, "size": args.size,
                  **latency(bundle, test, threads, args.latency_runs),
                  "loadavg_1m": os.getloadavg()[0]})

    int8 = None
    if args.compress and bundle is not None:
        int8 = compress(bundle, data, test, work, args.calib_scenes)

    # Transfer learning is judged on the validation split both runs share (a detector that
    # finds nothing confident gets no bundle, hence no held-out score).
    pre, scratch = results["pretrained"], results.get("scratch")
    points = None if scratch is None else round(100 * (pre["val_map50"] - scratch["val_map50"]),
                                                1)
    emit({"bench": "detect-goals", "budget_s": budget_s, "threads": args.threads,
          "val_map50": round(pre["val_map50"], 4),
          "test_map50": pre["test_map50"] and round(pre["test_map50"], 4),
          "goal_map50": GOAL_MAP50,
          "map50_met": pre["test_map50"] is not None and pre["test_map50"] >= GOAL_MAP50,
          "transfer_points_val": points, "goal_transfer_points": GOAL_TRANSFER_POINTS,
          "transfer_met": None if points is None else points >= GOAL_TRANSFER_POINTS,
          **({} if int8 is None else {
              "int8_p50_ratio_1t": int8["p50_latency_ratio"],
              "int8_map50_drop_pt": int8["map50_drop_pt"],
              "goal_int8_p50_ratio": GOAL_INT8_P50_RATIO,
              "goal_int8_map50_drop_pt": GOAL_INT8_MAP50_DROP_PT,
              "int8_met": (int8["p50_latency_ratio"] <= GOAL_INT8_P50_RATIO
                           and int8["map50_drop_pt"] <= GOAL_INT8_MAP50_DROP_PT)})})


def compress(bundle: Path, data, test, work: Path, calib_scenes: int) -> dict | None:
    """`edgewise compress` on the bundle: int8 calibrated on training scenes, every candidate
    scored on the held-out scenes; returns int8's report line."""
    from edgewise.ml.compress import CompressConfig, compress_bundle
    from edgewise.ml.detect import write_coco

    log("compressing the pretrained bundle (int8-static, fp16)")
    t0 = time.perf_counter()
    write_coco(data.subset(range(min(calib_scenes, len(data)))), work / "calib")
    write_coco(test, work / "held-out")
    report = compress_bundle(bundle, work / "compressed", CompressConfig(
        recipes=("int8-static", "fp16"), data_root=work / "held-out",
        calib_root=work / "calib", calib_images=calib_scenes, test_images=None,
        keep_refused=True))
    lines = report.json_lines()
    for line in lines:
        emit({"bench": "detect-compress", **line, "loadavg_start": report.run["load_avg_start"],
              "loadavg_end": report.run["load_avg_end"]})
    emit({"bench": "detect-compress-run", "report": str(work / "compressed" / "report.md"),
          "seconds": round(time.perf_counter() - t0, 1), "test_images": len(test),
          "calibration_images": report.run["calibration_images"]})
    return next((line for line in lines if line["candidate"] == "int8-static"), None)


if __name__ == "__main__":
    main()
