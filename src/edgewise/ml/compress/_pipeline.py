"""`compress`: a bundle in, measured candidate bundles and a report out; `fit`: pick one.

Invariant: every figure in the report was measured in this run on this machine, and a candidate
bundle is written only if the guards accepted it (or the caller asked to keep refused ones);
every written candidate is a valid bundle whose golden set holds its own outputs.

The run, top to bottom: validate the bundle -> load data per its preprocessing contract ->
run each recipe -> measure everything (accuracy, interleaved latency, peak RSS in a child
process) -> guards -> write candidate bundles -> report (JSON, markdown, Pareto PNG). An object
detector bundle takes the same steps in `_detect` (mAP instead of accuracy).
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgewise.artifacts import (
    BundleManifest,
    file_sha256,
    load_golden,
    validate_bundle,
    write_bundle,
)

from ..data import FASHION_MNIST_ROOT, load_idx_dataset, stratified_subset
from ._cpu import CpuInfo, detect_cpu
from ._decide import (
    BASELINE,
    CandidateFigures,
    DeviceProfile,
    FitDecision,
    GuardPolicy,
    assess,
    choose,
)
from ._errors import CompressError, NotApplicableError
from ._measure import accuracy, measure_latency, ort_session, peak_rss
from ._recipes import Candidate, CompressContext
from ._registry import create_recipe, list_recipes
from ._report import PARETO_PNG, REPORT_JSON, REPORT_MD, CompressReport, plot_pareto

__all__ = ["CompressConfig", "compress_bundle", "fit_bundle", "load_report",
           "parse_recipe_entry"]

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CompressConfig:
    # Entries "name" or "name:key=value,...", the latter a named variant; empty: all recipes.
    recipes: tuple[str, ...] = ()
    recipe_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    data_root: Path = FASHION_MNIST_ROOT  # detectors: a COCO, YOLO or VOC folder
    calib_root: Path | None = None  # detectors: calibration images (default: split data_root)
    calib_images: int = 256
    train_images: int = 4000  # fine-tuning / distillation set (stratified)
    test_images: int | None = 2000  # None: the whole test split
    threads: tuple[int, ...] = (1, 2)
    latency_rounds: int = 30
    runs_per_round: int = 5
    policy: GuardPolicy = GuardPolicy()
    keep_refused: bool = False
    seed: int = 0


def _noop(stage: str, done: int, total: int) -> None:
    pass


def _load_data(manifest: BundleManifest, config: CompressConfig):
    from ..quick import preprocess_images

    pre = manifest.preprocessing
    n_classes = len(manifest.labels)
    train_x, train_y = load_idx_dataset(config.data_root, "train", num_classes=n_classes)
    test_x, test_y = load_idx_dataset(config.data_root, "test", num_classes=n_classes)
    classes = len(np.unique(train_y))
    per = max(1, config.calib_images // classes)
    calib_idx = stratified_subset(train_y, per, config.seed + 7)
    train_idx = stratified_subset(train_y, max(1, config.train_images // classes), config.seed)
    if config.test_images is None or config.test_images >= len(test_y):
        test_idx = np.arange(len(test_y))
    else:
        test_idx = stratified_subset(test_y, max(1, config.test_images // classes), config.seed)
    return (preprocess_images(train_x[calib_idx], pre),
            preprocess_images(train_x[train_idx], pre), train_y[train_idx],
            preprocess_images(test_x[test_idx], pre), test_y[test_idx])


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name).strip("-")


def parse_recipe_entry(entry: str) -> tuple[str, dict[str, Any]]:
    """"int8-static:activation=int8,per_channel=false" -> ("int8-static", {...})."""
    import json

    name, _, rest = entry.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise CompressError(f"recipe option {item!r} in {entry!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
    return name.strip(), options


def _candidate_name(recipe: str, options: dict[str, Any]) -> str:
    if not options:
        return recipe
    import json

    return recipe + "-" + "-".join(f"{k}-{json.dumps(v).strip(chr(34))}"
                                   for k, v in sorted(options.items()))


def _load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _write_candidate(out: Path, src_dir: Path, manifest: BundleManifest, name: str,
                     cand: Candidate, figures: CandidateFigures, cpu: CpuInfo,
                     recipe_config: dict[str, Any]) -> None:
    from ._torch_source import TORCH_KEY, WEIGHTS_FILE

    golden = load_golden(src_dir, manifest)
    outputs = ort_session(cand.model_path, threads=1).run(
        None, {manifest.preprocessing.input_name: golden.inputs})[0]
    atol = manifest.golden.atol
    if cand.quantized:
        # Integer kernels differ between CPUs (VNNI vs not, 7-bit weights) by up to a few
        # output quantization steps; 2% of the logit range still catches a scrambled model.
        atol = max(atol, 0.02 * float(np.abs(outputs).max()))
    extra: dict[str, bytes] = {}
    provenance: dict[str, Any] = {
        "recipe": f"edgewise.ml.compress:{name}",
        "recipe_config": recipe_config,
        "compressed_from": {"name": manifest.name, "version": manifest.version,
                            "model_sha256": manifest.files[manifest.model].sha256},
        "measured_on_cpu": cpu.as_dict(),
        "source_provenance": manifest.provenance,
    }
    if cand.torch_weights is not None:
        extra[WEIGHTS_FILE] = cand.torch_weights
        provenance[TORCH_KEY] = {"arch": cand.torch_arch, "config": cand.torch_config,
                                 "weights": WEIGHTS_FILE}
    card = src_dir / "MODEL_CARD.md"
    if card.is_file():
        extra["MODEL_CARD.md"] = (card.read_text() + f"\n## Compression\n{name}: "
                                  + "; ".join(cand.notes) + "\n").encode()
    version = f"{manifest.version}+{_slug(name)}"[:64]
    metrics = {**{k: v for k, v in figures.as_dict().items()
                  if k not in ("notes", "bundle", "name")},
               "test_accuracy": round(figures.accuracy, 4)}
    if out.exists():
        shutil.rmtree(out)
    write_bundle(out, name=manifest.name, version=version, labels=manifest.labels,
                 preprocessing=manifest.preprocessing, model=cand.model_path,
                 golden_inputs=golden.inputs, golden_outputs=outputs, atol=atol,
                 max_latency_ms=manifest.golden.max_latency_ms, extra_files=extra,
                 metrics=metrics, provenance=provenance)


def compress_bundle(bundle_dir: Path | str, out_dir: Path | str,
                    config: CompressConfig = CompressConfig(),
                    progress: ProgressFn | None = None,
                    context_overrides: dict[str, Any] | None = None) -> CompressReport:
    """Build, measure, guard and write the candidates of `bundle_dir` under `out_dir`."""
    progress = progress or _noop
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    load_start = _load_avg()
    manifest = validate_bundle(bundle_dir)
    if getattr(manifest, "detection", None) is not None:
        # Judged by mAP on detection data, its network compressed, its post-processing not.
        from ._detect import compress_detector

        return compress_detector(bundle_dir, out_dir, manifest, config, progress,
                                 context_overrides, load_start)
    cpu = detect_cpu()

    # ---- data ---------------------------------------------------------------------------------
    progress("load data", 0, 1)
    calib, train_x, train_y, test_x, test_y = _load_data(manifest, config)
    progress("load data", 1, 1)
    work = out_dir / ".work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    fields = {"bundle_dir": bundle_dir, "manifest": manifest, "work_dir": work,
              "calib_inputs": calib, "train_inputs": train_x, "train_labels": train_y,
              "cpu": cpu, "seed": config.seed, "progress": progress,
              "max_drop_pt": config.policy.max_drop_pt}
    # Overrides replace what a recipe sees (e.g. other calibration data, another CPU's
    # features), never what the candidates are measured on.
    ctx = CompressContext(**{**fields, **(context_overrides or {})})

    # ---- recipes ------------------------------------------------------------------------------
    built, failed = build_candidates(config.recipes or tuple(list_recipes()), config, ctx,
                                     work, progress)

    # ---- measure ------------------------------------------------------------------------------
    models = {BASELINE: ctx.source_model, **{k: c.model_path for k, (c, _) in built.items()}}
    figures: dict[str, CandidateFigures] = {}
    for i, (name, path) in enumerate(models.items()):
        progress("accuracy", i, len(models))
        acc, _ = accuracy(path, test_x, test_y)
        rss = peak_rss(path, threads=1)
        cand = built.get(name, (None, None))[0]
        figures[name] = CandidateFigures(
            name=name, size_bytes=path.stat().st_size, peak_rss_mb=rss["peak_rss_mb"],
            p50_ms={}, p95_ms={}, accuracy=acc, params=cand.params if cand else None,
            notes=list(cand.notes) if cand else [])
    progress("accuracy", len(models), len(models))
    one = test_x[:1]
    for j, threads in enumerate(config.threads):
        progress("latency", j, len(config.threads))
        stats = measure_latency(models, one, threads=threads, rounds=config.latency_rounds,
                                runs_per_round=config.runs_per_round)
        for name, s in stats.items():
            figures[name].p50_ms[threads] = round(s.p50_ms, 3)
            figures[name].p95_ms[threads] = round(s.p95_ms, 3)
    progress("latency", len(config.threads), len(config.threads))

    # ---- guards and bundles -------------------------------------------------------------------
    base = figures[BASELINE]
    for name, fig in figures.items():
        assess(fig, base, config.policy)
        if name == BASELINE:
            fig.bundle = str(bundle_dir)
            continue
        if fig.refused and not config.keep_refused:
            continue
        cand, options = built[name]
        dest = out_dir / _slug(name)
        _write_candidate(dest, bundle_dir, manifest, name, cand, fig, cpu, options)
        fig.bundle = str(dest)
    shutil.rmtree(work, ignore_errors=True)

    # ---- report -------------------------------------------------------------------------------
    import onnxruntime

    sha, _ = file_sha256(bundle_dir / manifest.model)
    report = CompressReport(
        source={"name": manifest.name, "version": manifest.version, "bundle": str(bundle_dir),
                "model_sha256": sha},
        cpu=cpu.as_dict(),
        run={"load_avg_start": load_start, "load_avg_end": _load_avg(),
             "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
             "test_images": len(test_y), "calibration_images": len(calib),
             "train_images": len(train_y), "threads": list(config.threads),
             "latency_samples": config.latency_rounds * config.runs_per_round,
             "spinning": False, "policy": asdict(config.policy)},
        candidates=list(figures.values()), failed=failed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_JSON).write_text(report.to_json())
    (out_dir / REPORT_MD).write_text(report.markdown())
    plot_pareto(report, out_dir / PARETO_PNG)
    return report


def load_report(path: Path | str) -> CompressReport:
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_JSON
    try:
        return CompressReport.from_json(path.read_text())
    except FileNotFoundError:
        raise CompressError(f"{path}: no compression report; run `edgewise compress` "
                            "first") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CompressError(f"{path}: unreadable compression report: {exc}") from exc


def fit_bundle(report: CompressReport, profile: DeviceProfile) -> FitDecision:
    return choose(report.candidates, profile)


def build_candidates(names, config, ctx: CompressContext, work: Path, progress,
                     **recipe_kwargs: Any
                     ) -> tuple[dict[str, tuple[Candidate, dict[str, Any]]], dict[str, str]]:
    """Run each recipe entry (`name` or `name:key=value,...`) on `ctx`: the candidates built,
    with their options, and why the others were not (not applicable, or failed)."""
    built: dict[str, tuple[Candidate, dict[str, Any]]] = {}
    failed: dict[str, str] = {}
    for i, entry in enumerate(names):
        recipe_name, inline = parse_recipe_entry(entry)
        options = {**config.recipe_options.get(recipe_name, {}), **inline}
        # Options given inline name a variant; options given per recipe tune the default one.
        name = _candidate_name(recipe_name, inline)
        progress(f"recipe {name}", i, len(names))
        started = time.perf_counter()
        ctx.work_dir = work / _slug(name)  # variants of one recipe must not share files
        try:
            cand = create_recipe(recipe_name, **recipe_kwargs, **options)(ctx)
        except NotApplicableError as exc:
            failed[name] = f"not applicable: {exc}"
            continue
        except CompressError as exc:
            failed[name] = f"failed: {exc}"
            continue
        cand.build_s = round(time.perf_counter() - started, 1)
        cand.notes.append(f"built in {cand.build_s:.1f} s")
        built[name] = (cand, options)
    progress("recipes", len(names), len(names))
    return built, failed
