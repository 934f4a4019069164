"""`edgewise detect ...`: object-detection data sets: synthetic scenes and statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import console, fail, print_json

detect_app = typer.Typer(help="Object detection: synthetic scenes, data-set statistics.",
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
