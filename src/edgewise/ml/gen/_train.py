"""`edgewise gen train`: a beta-VAE or class-conditional VAE trained on this CPU, exported to
ONNX (anomaly-score graph + decoder) with a calibrated threshold, written as a bundle.

Invariant: the threshold and the figures in the manifest are measured with onnxruntime on the
exported score graph (what the device runs), never with the torch model; the score method is
chosen on validation-derived data and reported on test-derived data.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...artifacts import BundleManifest, DetectorSpec, GeneratorSpec, write_bundle
from ..data import (
    FASHION_MNIST_LABELS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_ROOT,
    FASHION_MNIST_STD,
    load_idx_dataset,
    stratified_split,
)
from ..errors import ExportError, MLError
from ..quick import FASHION_MNIST_PREPROCESSING, preprocess_images
from ..train import _free_cores
from ._model import SCORE_METHODS, ConvVAE, DecoderGraph, ScoreGraph, fit_latent_gaussians
from ._ood import OOD_KINDS, auroc, make_ood, threshold_for_fpr

__all__ = ["GenConfig", "GenResult", "image_grid", "train_generative"]

ProgressFn = Callable[[str, float, float], None]
OPSET = 17
GOLDEN_COUNT = 8
_PARITY_RTOL = 1e-3
_TRAIN_SHARE_OF_BUDGET = 0.65  # the rest: calibration, export, checks (cVAE scores 10 classes)


@dataclass
class GenConfig:
    kind: str = "vae"  # vae | cvae
    data: str = "fashion-mnist"
    out_dir: str = "gen-model"
    time_budget_s: float | None = 120.0
    epochs: int = 20
    latent_dim: int = 16
    width: int = 32
    beta: float = 1.0
    batch_size: int = 128
    lr: float = 2e-3
    target_fpr: float = 0.05
    train_limit: int | None = None  # use only this many training images (tests, quick runs)
    val_limit: int = 4000  # validation images: half standardise the score, half calibrate
    report_n: int = 2000  # test images scored for the reported figures (OOD sets: a quarter)
    name: str | None = None
    version: str = "1.0.0"
    track: bool = True
    tracking_uri: str | None = None
    seed: int = 0
    labels: tuple[str, ...] = field(default=FASHION_MNIST_LABELS)


@dataclass
class GenResult:
    bundle_dir: Path
    manifest: BundleManifest
    metrics: dict[str, Any]
    run_id: str | None


def _noop(*_: Any) -> None:
    pass


def image_grid(images: np.ndarray, cols: int | None = None):
    """[N, H, W] floats in [0, 1] -> one PIL grayscale grid image with 2-pixel gutters."""
    from PIL import Image

    n, h, w = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * (h + 2) + 2, cols * (w + 2) + 2), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = (
            np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(grid, mode="L")


def _load(cfg: GenConfig):
    root = FASHION_MNIST_ROOT if cfg.data == "fashion-mnist" else Path(cfg.data)
    x_all, y_all = load_idx_dataset(root, "train", num_classes=len(cfg.labels))
    x_test, y_test = load_idx_dataset(root, "test", num_classes=len(cfg.labels))
    tr, va = stratified_split(y_all, 1 / 12, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.train_limit:
        tr = np.sort(rng.permutation(tr)[:cfg.train_limit])
    va = np.sort(rng.permutation(va)[:cfg.val_limit])
    return (x_all[tr], y_all[tr]), (x_all[va], y_all[va]), (x_test, y_test)


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str],
            outputs: list[str]) -> None:
    axes = {n: {0: "batch"} for n in inputs + outputs}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=OPSET,
                              input_names=inputs, output_names=outputs, dynamic_axes=axes)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"ONNX export of {path.name} failed: {exc}") from exc


def _session(path: Path):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"{path}: onnxruntime cannot load the model: {exc}") from exc


def ort_scores(path: Path, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """[N, 3] (score, reconstruction error, latent distance) from the exported score graph."""
    sess = _session(path)
    parts = []
    for i in range(0, len(x), batch):
        parts.append(np.stack(sess.run(None, {"input": x[i:i + batch]}), axis=1))
    return np.concatenate(parts)


def _parity(expected: np.ndarray, got: np.ndarray, what: str) -> float:
    scale = max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(got - expected).max())
    if got.shape != expected.shape or not diff <= _PARITY_RTOL * scale:
        raise ExportError(f"onnxruntime and torch disagree on {what}: max |diff| {diff:.3g}")
    return diff


def _torch_parts(score_graph: ScoreGraph, x: np.ndarray, batch: int = 500) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([torch.stack(score_graph(torch.from_numpy(x[i:i + batch])), 1)
                               .numpy() for i in range(0, len(x), batch)])


def _p95_ms(fn: Callable[[], Any], runs: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 95))


def train_generative(cfg: GenConfig, *, progress: ProgressFn | None = None,
                     notify: Callable[[str], None] | None = None) -> GenResult:
    progress = progress or _noop
    notify = notify or _noop
    if cfg.kind not in ("vae", "cvae"):
        raise MLError(f"unknown generative model kind {cfg.kind!r} (use vae or cvae)")
    t_start = time.monotonic()
    out = Path(cfg.out_dir)
    run_dir, bundle_dir = out / "run", out / "bundle"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    torch.manual_seed(cfg.seed)
    threads = _free_cores()
    torch.set_num_threads(threads)

    # -- data ------------------------------------------------------------------------------
    pre = FASHION_MNIST_PREPROCESSING
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = _load(cfg)
    train_in = torch.from_numpy(preprocess_images(tr_x, pre))
    train_y = torch.from_numpy(tr_y)
    val_in = preprocess_images(va_x, pre)
    test_in = preprocess_images(te_x, pre)
    notify(f"{cfg.kind}: {len(train_in)} training images, {threads} thread(s)")

    vae = ConvVAE(latent_dim=cfg.latent_dim, width=cfg.width,
                  num_classes=len(cfg.labels) if cfg.kind == "cvae" else 0,
                  input_mean=FASHION_MNIST_MEAN, input_std=FASHION_MNIST_STD)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)

    # -- train -----------------------------------------------------------------------------
    from ..tracking import Tracker, default_tracking_uri

    tracker = (Tracker(cfg.tracking_uri or default_tracking_uri(run_dir), run_dir,
                       f"gen-{cfg.kind}") if cfg.track else None)
    run_id = None
    history: list[dict[str, float]] = []
    train_budget = (cfg.time_budget_s * _TRAIN_SHARE_OF_BUDGET if cfg.time_budget_s
                    else float("inf"))
    steps_per_epoch = int(np.ceil(len(train_in) / cfg.batch_size))
    total_steps = cfg.epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(cfg.seed)
    with tracker if tracker else _Null() as tr:
        if tr:
            run_id = tr.run_id
            tr.log_params({**asdict(cfg), "threads": threads})
        step = 0
        out_of_time = False
        for epoch in range(cfg.epochs):
            vae.train()
            perm = torch.randperm(len(train_in), generator=gen)
            sums = np.zeros(3)
            for i in range(0, len(perm), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                for g in opt.param_groups:  # cosine decay over the planned steps
                    g["lr"] = cfg.lr * 0.5 * (1 + np.cos(np.pi * min(1.0, step / total_steps)))
                loss, rec, kl = vae.loss(train_in[idx], train_y[idx], beta=cfg.beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums += [loss.item(), rec.item(), kl.item()]
                step += 1
                progress("training", step, total_steps)
                if time.monotonic() - t_start > train_budget:
                    out_of_time = True
                    break
            n_b = max(1, (i // cfg.batch_size) + 1)
            vae.eval()
            with torch.inference_mode():
                vl, vr, vk = (t.item() for t in vae.loss(torch.from_numpy(val_in[:1000]),
                                                         torch.from_numpy(va_y[:1000]),
                                                         beta=cfg.beta))
            row = {"train_loss": sums[0] / n_b, "train_rec": sums[1] / n_b,
                   "train_kl": sums[2] / n_b, "val_loss": vl, "val_rec": vr, "val_kl": vk}
            history.append(row)
            if tr:
                tr.log_metrics(row, step=epoch)
            notify(f"epoch {epoch + 1}: val loss {vl:.1f} (rec {vr:.1f}, kl {vk:.1f})")
            if out_of_time:
                notify("time budget reached; stopping training")
                break
        train_s = time.monotonic() - t_start
        vae.eval()
        from safetensors.torch import save_file

        save_file(vae.state_dict(), str(run_dir / "vae.safetensors"))

        # -- latent statistics and the score method -----------------------------------------
        progress("calibrating", 0, 3)
        with torch.inference_mode():
            k = vae.num_classes
            mus = torch.cat([vae.encode(train_in[i:i + 1000], F.one_hot(
                train_y[i:i + 1000], k).float() if k else None)[0]
                for i in range(0, min(len(train_in), 20000), 1000)])
        gauss_mean, gauss_chol = fit_latent_gaussians(mus, train_y[:len(mus)], k)
        save_file({"mean": gauss_mean.contiguous(), "chol": gauss_chol.contiguous()},
                  str(run_dir / "latent_gaussians.safetensors"))
        mean = mus.mean(0)
        cov = torch.cov((mus - mean).T) + 1e-3 * torch.eye(cfg.latent_dim)
        prec = torch.linalg.inv(cov)
        half = len(val_in) // 2
        probe = ScoreGraph(vae, latent_mean=mean, latent_prec=prec, norm=(0, 1, 0, 1),
                           method="reconstruction")
        parts = _torch_parts(probe, val_in[:half])
        norm = (float(parts[:, 1].mean()), float(parts[:, 1].std() + 1e-6),
                float(parts[:, 2].mean()), float(parts[:, 2].std() + 1e-6))
        val_ood = {k: preprocess_images(
            make_ood(k, cfg.report_n // 8, source=va_x, seed=cfg.seed + 1), pre)
            for k in OOD_KINDS}
        # One torch pass per set; the three methods are cheap functions of its two parts.
        in_parts = parts
        ood_parts = {k: _torch_parts(probe, v) for k, v in val_ood.items()}

        def by_method(p: np.ndarray, m: str) -> np.ndarray:
            if m == "reconstruction":
                return p[:, 1]
            if m == "latent":
                return p[:, 2]
            return (p[:, 1] - norm[0]) / norm[1] + (p[:, 2] - norm[2]) / norm[3]

        choose = {m: float(np.mean([auroc(by_method(in_parts, m), by_method(o, m))
                                    for o in ood_parts.values()])) for m in SCORE_METHODS}
        method = max(choose, key=choose.get)
        notify("validation mean AUROC by score: " + ", ".join(
            f"{m} {a:.3f}" for m, a in choose.items()) + f" -> {method}")
        progress("calibrating", 1, 3)

        # -- export ---------------------------------------------------------------------------
        score_graph = ScoreGraph(vae, latent_mean=mean, latent_prec=prec, norm=norm,
                                 method=method).eval()
        score_path, decoder_path = run_dir / "model.onnx", run_dir / "decoder.onnx"
        _export(score_graph, (torch.from_numpy(test_in[:2]),), score_path, ["input"],
                ["score", "recon_error", "latent_distance"])
        parity = _parity(_torch_parts(score_graph, test_in[:64]),
                         ort_scores(score_path, test_in[:64]), "the score graph")
        decoder = DecoderGraph(vae, latent_mean=gauss_mean, latent_chol=gauss_chol).eval()
        z = torch.randn(4, cfg.latent_dim, generator=gen)
        conditional = vae.num_classes > 0
        dec_args: tuple = (z, torch.eye(vae.num_classes)[:4]) if conditional else (z,)
        _export(decoder, dec_args, decoder_path, ["z", "label"] if conditional else ["z"],
                ["image"])
        with torch.inference_mode():
            expected = decoder(*dec_args).numpy()
        feeds = {"z": dec_args[0].numpy()}
        if conditional:
            feeds["label"] = dec_args[1].numpy()
        dec_sess = _session(decoder_path)
        _parity(expected, dec_sess.run(None, feeds)[0], "the decoder")
        progress("calibrating", 2, 3)

        # -- threshold (validation) and figures (test), all with onnxruntime ------------------
        val_scores = ort_scores(score_path, val_in[half:])[:, 0]
        threshold = threshold_for_fpr(val_scores, cfg.target_fpr)
        test_parts = ort_scores(score_path, test_in[:cfg.report_n])
        test_ood = {k: ort_scores(score_path, preprocess_images(
            make_ood(k, cfg.report_n // 4, source=te_x, seed=cfg.seed + 2), pre))
            for k in OOD_KINDS}
        per_kind = {}
        for name, col in (("score", 0), ("recon_error", 1), ("latent_distance", 2)):
            per_kind[name] = {k: round(auroc(test_parts[:, col], v[:, col]), 4)
                              for k, v in test_ood.items()}
        test_fpr = float((test_parts[:, 0] > threshold).mean())
        tpr = {k: round(float((v[:, 0] > threshold).mean()), 4) for k, v in test_ood.items()}
        qs = np.quantile(val_scores, [0.0, 0.25, 0.5, 0.75, 0.9])
        spread = threshold - qs[0]
        edges = np.unique(np.round(np.concatenate(
            [qs, [threshold], threshold + spread * np.array([0.5, 1.0, 2.0, 4.0])]), 6))
        one = test_in[:1]
        p95 = _p95_ms(lambda: _session_run(dec_sess, feeds, 1))
        score_sess = _session(score_path)
        p95_score = _p95_ms(lambda: score_sess.run(None, {"input": one}))
        progress("calibrating", 3, 3)

        metrics: dict[str, Any] = {
            "score_method": method,
            "val_mean_auroc_by_method": {k: round(v, 4) for k, v in choose.items()},
            "test_auroc": per_kind["score"],
            "test_mean_auroc": round(float(np.mean(list(per_kind["score"].values()))), 4),
            "test_auroc_recon_error": per_kind["recon_error"],
            "test_auroc_latent_distance": per_kind["latent_distance"],
            "threshold": threshold,
            "target_fpr": cfg.target_fpr,
            "test_fpr": round(test_fpr, 4),
            "test_detection_rate": tpr,
            "val_loss": history[-1]["val_loss"] if history else None,
            "epochs": len(history),
            "train_s": round(train_s, 1),
            "p95_score_latency_ms": round(p95_score, 2),
            "p95_decode_latency_ms": round(p95, 2),
            "onnx_parity_max_abs_diff": parity,
        }

        # -- bundle -------------------------------------------------------------------------
        golden_in = test_in[:GOLDEN_COUNT]
        golden_out = ort_scores(score_path, golden_in)[:, 0]
        name = cfg.name or f"fashion-{cfg.kind}"
        card = _card(name, cfg, metrics)
        manifest = write_bundle(
            bundle_dir, name=name, version=cfg.version, labels=cfg.labels, preprocessing=pre,
            model=score_path, golden_inputs=golden_in, golden_outputs=golden_out,
            atol=max(1e-3, 1e-3 * float(np.abs(golden_out).max())),
            max_latency_ms=max(50.0, 20 * p95_score),
            extra_files={"decoder.onnx": decoder_path, "MODEL_CARD.md": card.encode()},
            metrics=metrics,
            provenance={"data": cfg.data, "kind": cfg.kind, "mlflow_run_id": run_id,
                        "train_images": len(train_in), "beta": cfg.beta},
            kind="generator",
            detector=DetectorSpec(model="model.onnx", output="score", method=method,
                                  threshold=threshold, target_fpr=cfg.target_fpr,
                                  histogram_edges=tuple(float(e) for e in edges)),
            generator=GeneratorSpec(model="decoder.onnx", latent_dim=cfg.latent_dim,
                                    conditional=conditional),
        )
        _write_samples(dec_sess, cfg, conditional, run_dir / "samples.png")
        metrics["wall_s"] = round(time.monotonic() - t_start, 1)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if tr:
            tr.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)},
                           step=len(history))
            tr.set_tag("score_method", method)
            tr.log_artifact(bundle_dir, "bundle")
            tr.log_artifact(run_dir / "samples.png")
    return GenResult(bundle_dir=bundle_dir, manifest=manifest, metrics=metrics, run_id=run_id)


def _session_run(sess, feeds: dict[str, np.ndarray], n: int) -> Any:
    return sess.run(None, {k: v[:n] for k, v in feeds.items()})


def _write_samples(sess, cfg: GenConfig, conditional: bool, path: Path) -> None:
    rng = np.random.default_rng(cfg.seed)
    k = len(cfg.labels)
    z = rng.standard_normal((8 * k, cfg.latent_dim)).astype(np.float32)
    feeds = {"z": z}
    if conditional:
        feeds["label"] = np.eye(k, dtype=np.float32)[np.repeat(np.arange(k), 8)]
    imgs = sess.run(None, feeds)[0][:, 0]
    image_grid(imgs, cols=8).save(path)


def _card(name: str, cfg: GenConfig, m: dict[str, Any]) -> str:
    return (f"# {name} {cfg.version}\n\n"
            f"A {'class-conditional ' if cfg.kind == 'cvae' else ''}beta-VAE (beta={cfg.beta}, "
            f"latent {cfg.latent_dim}) trained on {cfg.data} for {m['epochs']} epoch(s), "
            f"{m['train_s']} s on a CPU.\n\n"
            f"- anomaly score: {m['score_method']}; threshold {m['threshold']:.4g} for a "
            f"target false-positive rate of {cfg.target_fpr:.0%} (test: {m['test_fpr']:.1%})\n"
            f"- test AUROC vs locally built OOD sets: {m['test_auroc']}\n"
            f"- p95 latency (1 thread, batch 1): score {m['p95_score_latency_ms']} ms, "
            f"decode {m['p95_decode_latency_ms']} ms\n\n"
            "Out-of-distribution sets are synthetic (rendered digits, uniform noise, rotated "
            "and inverted test images), not real-world drift.\n")


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
