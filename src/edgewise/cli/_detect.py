"""`edgewise detect ...`: object detection: synthetic scenes, data-set statistics, training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import console, fail, print_json, stage_progress

detect_app = typer.Typer(help="Object detection: synthetic scenes, data-set statistics, training.",
                         no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(detect_app, name="detect")


@detect_app.command("synth")
def synth(
    out_dir: Annotated[Path, typer.Option("--out", help="new folder for the COCO data set")],
    scenes: Annotated[int, typer.Option(min=1, help="number of scenes")] = 200,
    size: Annotated[int, typer.Option(min=32, max=1024, help="scene side in pixels")] = 160,
    min_objects: Annotated[int, typer.Option(min=1, help="fewest objects per scene")] = 1,
    max_objects: Annotated[int, typer.Option(min=1, help="most objects per scene")] = 5,
    split: Annotated[str, typer.Option(help="Fashion-MNIST split the items come from: "
                                            "train | test")] = "train",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write SYNTHETIC detection scenes (Fashion-MNIST items, scaled and tinted, on textured
    backgrounds, with occlusion) as a COCO data set: OUT/annotations.json + OUT/images/."""
    from ..ml import MLError
    from ..ml.detect import SynthConfig, detection_stats, write_synth_coco

    if split not in ("train", "test"):
        fail(f"unknown --split {split!r} (train | test)")
    cfg = SynthConfig(scenes=scenes, size_px=size, min_objects=min_objects,
                      max_objects=max_objects, seed=seed, split=split)
    try:
        path, dataset = write_synth_coco(cfg, out_dir)
    except MLError as exc:
        fail(str(exc))
    stats = detection_stats(dataset)
    console.print(f"[green]{path}[/]: {stats['images']} synthetic scenes, {stats['boxes']} "
                  "boxes")
    print_json({"annotations": str(path), **stats})


@detect_app.command("stats")
def stats(
    data: Annotated[Path, typer.Argument(help="COCO (annotations.json), YOLO (images/ + "
                                              "labels/) or VOC (Annotations/) folder")],
    val_fraction: Annotated[float, typer.Option(
        help="also report the stratified train/validation split of this share")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Check a detection data set and print class and box-size statistics as JSON."""
    from ..ml import MLError
    from ..ml.detect import detection_split, detection_stats, load_detection_dataset

    if not 0 <= val_fraction < 1:
        fail("--val-fraction must be in [0, 1)")
    try:
        dataset = load_detection_dataset(data)
        report = {"source": dataset.source, **detection_stats(dataset)}
        if val_fraction:
            tr, va = detection_split(dataset, val_fraction, seed)
            report["split"] = {"train": detection_stats(dataset.subset(tr)),
                               "val": detection_stats(dataset.subset(va))}
    except MLError as exc:
        fail(str(exc))
    print_json(report)


@detect_app.command("train")
def train(
    data: Annotated[Path, typer.Option(help="COCO, YOLO or VOC data set folder "
                                            "(e.g. from `edgewise detect synth`)")],
    out_dir: Annotated[Path, typer.Option("--out", help="new folder: best.pt, model.onnx, "
                                                        "metrics.json, config.json, bundle/")],
    time_budget: Annotated[str, typer.Option("--time-budget", help="e.g. 90s, 5m")] = "2m",
    size: Annotated[int, typer.Option(help="input side in pixels (multiple of 32)")] = 160,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW)")] = 3e-3,
    val_fraction: Annotated[float, typer.Option(help="share held out for validation")] = 0.2,
    augment: Annotated[str, typer.Option(
        help="default (flips, zoom in/out with crop or pad, shifts, colour jitter; boxes "
             "follow) | flip | none")] = "default",
    scratch: Annotated[bool, typer.Option(
        "--scratch", help="random backbone instead of the ImageNet EfficientNet-Lite0")] = False,
    name: Annotated[str | None, typer.Option(help="bundle name")] = None,
    version: Annotated[str, typer.Option(help="bundle version")] = "1.0.0",
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI (default: sqlite store in OUT)")] = None,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", help="skip MLflow")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
    stop_after_steps: Annotated[int | None, typer.Option(
        min=1, help="pause after N steps (continue later with --resume)")] = None,
    min_score: Annotated[float, typer.Option(
        min=0.01, max=1.0, help="bundle: detections from this score on are served and "
                                "health-checked")] = 0.3,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int | None, typer.Option(
        min=1, help="torch threads (default: the cores the 1-minute load average leaves "
                    "free)")] = None,
) -> None:
    """Train a CenterNet detector on the pretrained EfficientNet-Lite0 on this CPU; export
    ONNX with decoding and NMS inside (image [1,3,H,W] -> boxes, scores, labels) and bundle it
    with golden images for the device health check. Same as `edgewise train --task detect`."""
    run_detect_training(data=data, out_dir=out_dir, time_budget=time_budget, size=size,
                        batch_size=batch_size, lr=lr, val_fraction=val_fraction,
                        pretrained=not scratch, name=name, version=version,
                        tracking_uri=tracking_uri, track=not no_tracking, resume=resume,
                        stop_after_steps=stop_after_steps, min_score=min_score, seed=seed,
                        augment=augment, threads=threads)


def run_detect_training(*, data: Path, out_dir: Path, time_budget: str, size: int,
                        batch_size: int, lr: float, val_fraction: float, pretrained: bool,
                        name: str | None, version: str, tracking_uri: str | None, track: bool,
                        resume: bool, stop_after_steps: int | None, seed: int,
                        min_score: float = 0.3, augment: str = "default",
                        threads: int | None = None) -> None:
    """`edgewise detect train` and `edgewise train --task detect`."""
    from ..ml import MLError
    from ..ml.detect import DetectConfig, train_detector
    from ..ml.train import parse_duration

    if not 0 < val_fraction < 1:
        fail("--val-fraction must be between 0 and 1")
    try:
        budget_s = parse_duration(time_budget)
    except ValueError as exc:
        fail(str(exc))
    cfg = DetectConfig(data=str(data), out_dir=str(out_dir), input_size=size,
                       time_budget_s=budget_s, batch_size=batch_size, lr=lr,
                       val_fraction=val_fraction, pretrained=pretrained, seed=seed,
                       val_every_s=max(30.0, budget_s / 5), name=name, version=version,
                       track=track, tracking_uri=tracking_uri, resume=resume,
                       stop_after_steps=stop_after_steps, bundle_min_score=min_score,
                       augment=augment, threads=threads)
    try:
        with stage_progress() as (report, out_console):
            result = train_detector(cfg, progress=report, notify=out_console.print)
    except (MLError, ValueError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(f"interrupted; continue with the same command and --resume (--out {out_dir})",
             130)
    m = result.metrics
    if result.paused:
        print_json({"paused": True, "steps": m["steps"], "out": str(out_dir)})
        return
    console.print(f"[green]{result.out_dir}[/]: validation mAP@0.5 {m['val_map50']:.3f}, "
                  f"mAP@0.5:0.95 {m['val_map50_95']:.3f} after {m['steps']} steps "
                  f"({m['train_s']:.0f} s); bundle: {m['bundle'] or 'none (see warnings)'}")
    print_json({"out": str(result.out_dir), **{k: v for k, v in m.items()
                                               if k not in ("history", "val_stats")}})
