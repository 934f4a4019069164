"""`edgewise gen ...`: generative models (VAE, cVAE, DDPM) for anomaly detection, synthesis and
denoising."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import console, fail, print_json, stage_progress

gen_app = typer.Typer(help="Generative models: VAEs, DDPMs: anomalies, sampling, denoising.",
                      no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(gen_app, name="gen")


@gen_app.command("train")
def train(
    kind: Annotated[str, typer.Option(
        help="vae (beta-VAE) | cvae (class-conditional VAE) | ddpm (class-conditional "
             "diffusion model with a denoiser)")] = "cvae",
    data: Annotated[str, typer.Option(help="'fashion-mnist' or an IDX directory")]
    = "fashion-mnist",
    out_dir: Annotated[Path, typer.Option("--out", help="output directory (bundle/ and run/)")]
    = Path("gen-model"),
    time_budget: Annotated[str, typer.Option("--time-budget", help="e.g. 90s, 2m")] = "2m",
    epochs: Annotated[int, typer.Option(help="at most this many epochs")] = 20,
    latent_dim: Annotated[int, typer.Option(help="latent dimensions")] = 16,
    beta: Annotated[float, typer.Option(help="KL weight (beta-VAE)")] = 1.0,
    target_fpr: Annotated[float, typer.Option(
        help="false-positive rate the anomaly threshold is calibrated to")] = 0.05,
    train_limit: Annotated[int | None, typer.Option(help="use only N training images")] = None,
    name: Annotated[str | None, typer.Option(help="bundle name")] = None,
    version: Annotated[str, typer.Option(help="bundle version")] = "1.0.0",
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", help="skip MLflow")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    steps: Annotated[int, typer.Option(min=1, max=1000,
                                       help="DDPM: sampling (DDIM) steps in the sampler")] = 25,
    guidance: Annotated[float, typer.Option(
        min=0.0, help="DDPM: classifier-free guidance when sampling a class")] = 1.0,
    resume: Annotated[bool, typer.Option(
        "--resume", help="continue an interrupted run in --out from its last epoch")] = False,
) -> None:
    """Train a VAE or a DDPM on this CPU; write a bundle with the anomaly-score graph, its
    calibrated threshold, the decoder (VAE) or sampler and denoiser (DDPM), and a golden set."""

    from ..ml import MLError
    from ..ml.gen import KINDS, GenConfig, train_generative
    from ..ml.train import parse_duration

    if kind not in KINDS:
        fail(f"unknown --kind {kind!r} ({', '.join(KINDS)})")
    if not 0 < target_fpr < 1:
        fail("--target-fpr must be between 0 and 1")
    try:
        budget_s = parse_duration(time_budget)
    except ValueError as exc:
        fail(str(exc))
    cfg = GenConfig(kind=kind, data=data, out_dir=str(out_dir), time_budget_s=budget_s,
                    epochs=epochs, latent_dim=latent_dim, beta=beta, target_fpr=target_fpr,
                    train_limit=train_limit, name=name, version=version,
                    tracking_uri=tracking_uri, track=not no_tracking, seed=seed,
                    sample_steps=steps, guidance=guidance, resume=resume)
    try:
        with stage_progress() as (report, out_console):
            result = train_generative(cfg, progress=report, notify=out_console.print)
    except (MLError, ValueError) as exc:
        fail(str(exc))
    m = result.metrics
    console.print(f"[green]{result.manifest.release_name}[/]: score {m['score_method']}, "
                  f"test mean AUROC {m['test_mean_auroc']:.3f}, FPR at threshold "
                  f"{m['test_fpr']:.1%} (target {target_fpr:.0%}), trained {m['train_s']:.0f} s")
    print_json({"bundle": str(result.bundle_dir), "mlflow_run_id": result.run_id, **m})


@gen_app.command("augment")
def augment(
    bundle: Annotated[Path, typer.Argument(help="a class-conditional generator bundle "
                                           "(gen train --kind cvae or ddpm)")],
    class_name: Annotated[list[str], typer.Option("--class", help="class to synthesise "
                                                  "(repeat for several)")],
    n: Annotated[int, typer.Option("-n", min=1, help="images per class")] = 100,
    out_dir: Annotated[Path, typer.Option("--out", help="image folder to write into")]
    = Path("synthetic"),
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Generate images of under-represented classes into an image folder (one sub-folder per
    class). Whether they help a classifier must be measured; they often do not."""
    from ..ml import MLError
    from ..ml.gen import synthesize

    counts = {}
    try:
        for i, label in enumerate(class_name):
            counts[label] = len(synthesize(bundle, label=label, n=n, out_dir=out_dir,
                                           seed=seed + i))
    except MLError as exc:
        fail(str(exc))
    console.print(f"wrote {sum(counts.values())} image(s) to {out_dir}")
    print_json({"out": str(out_dir), "images": counts})


@gen_app.command("attach")
def attach(
    classifier: Annotated[Path, typer.Argument(help="a classifier bundle (edgewise train)")],
    generator: Annotated[Path, typer.Argument(help="a generator bundle (gen train)")],
    out_dir: Annotated[Path, typer.Option("--out", help="where to write the combined bundle")],
    version: Annotated[str | None, typer.Option(help="version of the combined bundle "
                                                "(default: the classifier's)")] = None,
) -> None:
    """Ship the generator's anomaly detector beside a classifier: every local prediction then
    carries its anomaly score, and the agent reports drift aggregates for the release."""
    from ..artifacts import ArtifactError
    from ..ml import MLError
    from ..ml.gen import attach_detector

    try:
        manifest = attach_detector(classifier, generator, out_dir, version=version)
    except (MLError, ArtifactError) as exc:
        fail(str(exc))
    console.print(f"wrote {manifest.release_name} with detector "
                  f"({manifest.detector.method}, threshold {manifest.detector.threshold:.4g}) "
                  f"to {out_dir}")
    print_json({"out": str(out_dir), "release": manifest.release_name,
                "detector": manifest.detector.model_dump(mode="json")})
