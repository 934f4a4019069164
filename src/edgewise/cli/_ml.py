"""`edgewise train` and `edgewise eval`: thin wrappers over edgewise.ml.train / .evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import console, fail, out, print_json, stage_progress


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("eval")(evaluate)


def train(
    data: Annotated[str, typer.Option(help="'fashion-mnist', an IDX directory or an image "
                                           "folder (one sub-folder per class); --task detect: "
                                           "a COCO, YOLO or VOC folder")]
    = "fashion-mnist",
    task: Annotated[str, typer.Option(help="classify | detect (object detection: the "
                                           "CenterNet detector of `edgewise detect train`)")]
    = "classify",
    out_dir: Annotated[Path, typer.Option("--out", help="output directory (bundle/ and run/)")]
    = Path("model"),
    time_budget: Annotated[str | None, typer.Option(
        "--time-budget", help="wall-clock budget for the whole run, e.g. 90s, 15m")] = None,
    strategy: Annotated[str, typer.Option(
        help="auto | feature-extract | fine-tune | from-scratch")] = "auto",
    backbone: Annotated[str | None, typer.Option(help="backbone name (see the registry)")]
    = None,
    weights: Annotated[Path | None, typer.Option(help="local .pth/.safetensors backbone weights")]
    = None,
    resolution: Annotated[int | None, typer.Option(help="backbone input size in pixels")] = None,
    epochs: Annotated[int | None, typer.Option(help="epochs (default: fit the budget)")] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help="default: 256 (classify), 8 (detect)")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    augment: Annotated[str | None, typer.Option(
        help="none | flip | light | default | strong (default: by strategy); --task detect: "
             "default | flip | none")] = None,
    trainable_blocks: Annotated[int, typer.Option(help="fine-tune: last N blocks (0: all)")] = 4,
    feature_blocks: Annotated[int | None, typer.Option(
        help="feature-extract: features of the backbone's first N blocks (spatial map pooled "
             "to 4x4) instead of its last layer (default: auto decides)")] = None,
    train_per_class: Annotated[int | None, typer.Option(help="use N images per class")] = None,
    name: Annotated[str | None, typer.Option(help="bundle name")] = None,
    version: Annotated[str, typer.Option(help="bundle version")] = "1.0.0",
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI (default: sqlite store in OUT/run)")] = None,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", help="skip MLflow")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
    stop_after_epochs: Annotated[int | None, typer.Option(
        help="pause after N epochs (continue later with --resume)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int | None, typer.Option(
        min=1, help="torch threads (default: the cores the 1-minute load average leaves "
                    "free)")] = None,
    balance: Annotated[str, typer.Option(
        help="class imbalance: none | weights | oversample | generative | auto (short trials, "
             "balanced validation accuracy decides)")] = "none",
    generator: Annotated[Path | None, typer.Option(
        help="cVAE bundle (edgewise gen train --kind cvae) for --balance generative/auto")]
    = None,
) -> None:
    """Train an image classifier (or, with --task detect, an object detector) on this CPU and
    write a bundle (ONNX, golden set, card)."""
    if task == "detect":
        _train_detector(locals())
        return
    if task != "classify":
        fail(f"unknown --task {task!r} (classify | detect)")

    from ..ml import MLError
    from ..ml.train import TrainConfig, parse_duration
    from ..ml.train import train as run_training

    try:
        budget_s = parse_duration(time_budget) if time_budget else None
    except ValueError as exc:
        fail(str(exc))
    config = TrainConfig(
        data=data, out_dir=str(out_dir), name=name, version=version, strategy=strategy,
        backbone=backbone, weights_path=str(weights) if weights else None,
        resolution=resolution, time_budget_s=budget_s, epochs=epochs,
        **({"batch_size": batch_size} if batch_size else {}),
        lr=lr, augment=augment, trainable_blocks=trainable_blocks,
        feature_blocks=feature_blocks, train_per_class=train_per_class,
        tracking_uri=tracking_uri, track=not no_tracking,
        resume=resume, stop_after_epochs=stop_after_epochs, seed=seed, threads=threads,
        balance=balance,
        generator=str(generator) if generator else None)
    try:
        with stage_progress() as (report, out_console):
            result = run_training(config, progress=report, notify=out_console.print)
    except (MLError, ValueError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(f"interrupted; continue with: edgewise train ... --out {out_dir} --resume", 130)
    if result.paused:
        print_json({"paused": True, "epochs": len(result.history), "out": str(out_dir)})
        return
    m = result.metrics
    from rich.table import Table

    table = Table(title=f"edgewise train: {result.manifest.release_name}")
    table.add_column("")
    table.add_column("")
    for key, value in (("strategy", f"{result.choice.strategy} (case {result.choice.case})"),
                       ("test accuracy (onnxruntime)", f"{m['test_accuracy']:.4f}"),
                       ("validation accuracy", f"{m['val_accuracy']:.4f}"),
                       ("epochs", str(m.get("epochs"))),
                       ("p95 latency, batch 1", f"{m['p95_latency_ms']:.1f} ms"),
                       ("wall time", f"{m['wall_s']:.0f} s"),
                       ("bundle", str(result.bundle_dir)),
                       ("MLflow run", str(result.run_id))):
        table.add_row(key, value)
    console.print(table)
    print_json({"bundle": str(result.bundle_dir), "strategy": result.choice.strategy,
                "mlflow_run_id": result.run_id, **m})


# Classifier options that have no meaning for a detector, with their defaults: given with
# --task detect, they are refused rather than silently ignored.
_CLASSIFY_ONLY = {"backbone": None, "weights": None, "epochs": None,
                  "trainable_blocks": 4, "feature_blocks": None, "train_per_class": None,
                  "stop_after_epochs": None, "balance": "none", "generator": None}


def _train_detector(args: dict) -> None:
    """`edgewise train --task detect`: the options mapped onto `edgewise detect train`
    (--resolution is the input side, --strategy from-scratch a random backbone)."""
    from ._detect import run_detect_training

    given = [f"--{k.replace('_', '-')}" for k, default in _CLASSIFY_ONLY.items()
             if args[k] != default]
    if given:
        fail(f"{', '.join(given)}: classifier options, not used by --task detect")
    if args["strategy"] not in ("auto", "fine-tune", "from-scratch"):
        fail(f"--strategy {args['strategy']} does not apply to a detector (auto | fine-tune: "
             "the pretrained backbone, frozen then its later blocks tuned; from-scratch)")
    if args["data"] == "fashion-mnist":
        fail("--task detect needs --data: a COCO, YOLO or VOC folder (`edgewise detect synth "
             "--out DIR` writes synthetic scenes)")
    run_detect_training(
        data=Path(args["data"]), out_dir=args["out_dir"],
        time_budget=args["time_budget"] or "2m", size=args["resolution"] or 160,
        batch_size=args["batch_size"] or 8, lr=args["lr"] or 3e-3, val_fraction=0.2,
        pretrained=args["strategy"] != "from-scratch", name=args["name"],
        version=args["version"], tracking_uri=args["tracking_uri"],
        track=not args["no_tracking"], resume=args["resume"], stop_after_steps=None,
        seed=args["seed"], augment=args["augment"] or "default", threads=args["threads"])


def evaluate(
    bundle: Annotated[Path, typer.Argument(help="bundle directory (or a train --out DIR)")],
    data: Annotated[str, typer.Option(help="'fashion-mnist', an IDX directory or an image "
                                           "folder; for a detector a COCO, YOLO or VOC "
                                           "folder")] = "fashion-mnist",
    split: Annotated[str, typer.Option(help="test | train")] = "test",
    limit: Annotated[int | None, typer.Option(help="first N images only")] = None,
) -> None:
    """Score a bundle on a data set with onnxruntime, exactly as a device runs it (a
    detector: mAP@0.5 and mAP@0.5:0.95 by pycocotools)."""
    from ..artifacts import ArtifactError
    from ..ml import MLError
    from ..ml.evaluate import evaluate_bundle

    try:
        result = evaluate_bundle(bundle, data, split=split, limit=limit)
    except (MLError, ArtifactError) as exc:
        fail(str(exc))
    if result.get("kind") == "object-detector":
        out.print(f"{result['bundle']}: mAP@0.5 {result['map50']:.4f}, mAP@0.5:0.95 "
                  f"{result['map50_95']:.4f} on {result['images']} images of {data} "
                  f"({result['seconds']:.1f} s)")
    else:
        out.print(f"{result['bundle']}: accuracy {result['accuracy']:.4f} on "
                  f"{result['images']} {split} images of {data} ({result['seconds']:.1f} s)")
    print_json(result)
