"""`edgewise gen train`: a beta-VAE, a class-conditional VAE or a small DDPM trained on this CPU,
exported to ONNX (anomaly-score graph + decoder or sampler, and the DDPM's denoiser) with a
calibrated threshold, written as a bundle.

Invariant: the threshold and the figures in the manifest are measured with onnxruntime on the
exported score graph (what the device runs), never with the torch model; the score method is
chosen on validation-derived data and reported on test-derived data.
"""

from __future__ import annotations

import copy
import json
import math
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
from ..train import _free_cores, _save_atomic
from ._ddpm import (
    DDPM_SCORE_METHODS,
    SIDE,
    DenoiseGraph,
    DiffusionScoreGraph,
    SamplerGraph,
    TinyUNet,
    ddpm_loss,
)
from ._model import SCORE_METHODS, ConvVAE, DecoderGraph, ScoreGraph, fit_latent_gaussians
from ._ood import OOD_KINDS, auroc, make_ood, threshold_for_fpr

__all__ = ["KINDS", "GenConfig", "GenResult", "image_grid", "psnr", "train_generative"]

KINDS = ("vae", "cvae", "ddpm")

ProgressFn = Callable[[str, float, float], None]
OPSET = 17
GOLDEN_COUNT = 8
_PARITY_RTOL = 1e-3
_TRAIN_SHARE_OF_BUDGET = 0.65  # the rest: calibration, export, checks (cVAE scores 10 classes)
LAST_CHECKPOINT = "last.pt"  # model, EMA, optimiser, RNG and history after every epoch
# Settings a resumed run must share with the one it continues (epochs may grow).
_RESUME_KEYS = ("kind", "data", "latent_dim", "width", "beta", "batch_size", "lr", "train_limit",
                "val_limit", "seed", "labels", "unet_width", "ema_decay")
_EXPORT_S = 10.0  # ONNX export and parity checks, roughly, on a small CPU


@dataclass
class GenConfig:
    kind: str = "vae"  # vae | cvae | ddpm
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
    # DDPM only
    unet_width: int = 16
    sample_steps: int = 25  # DDIM steps unrolled into the sampler graph
    guidance: float = 1.0  # classifier-free guidance weight when sampling a class
    ema_decay: float = 0.995  # the exported network is an exponential moving average
    denoise_sigma: float = 0.2  # noise level the denoising figures are measured at
    resume: bool = False  # continue from OUT/run/last.pt (the budget applies to this call)


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


def psnr(clean: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """Per-image peak signal-to-noise ratio in dB for images in [0, 1]."""
    mse = ((clean - estimate) ** 2).reshape(len(clean), -1).mean(1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


class _Family:
    """What differs between the VAE and the DDPM in the one training pipeline: the network,
    its loss, the score graph (and the names of its two parts), the generator graph."""

    def __init__(self, cfg: GenConfig) -> None:
        self.cfg = cfg
        self.ddpm = cfg.kind == "ddpm"
        k = len(cfg.labels)
        if self.ddpm:
            self.net = TinyUNet(num_classes=k, width=cfg.unet_width)
            self.ema = copy.deepcopy(self.net).requires_grad_(False)
            self.methods, self.parts = DDPM_SCORE_METHODS, ("fine_error", "coarse_error")
        else:
            self.net = ConvVAE(latent_dim=cfg.latent_dim, width=cfg.width,
                               num_classes=k if cfg.kind == "cvae" else 0,
                               input_mean=FASHION_MNIST_MEAN, input_std=FASHION_MNIST_STD)
            self.ema = self.net
            self.methods, self.parts = SCORE_METHODS, ("recon_error", "latent_distance")
        self.latent_dim = SIDE * SIDE if self.ddpm else cfg.latent_dim
        self.conditional = self.ddpm or cfg.kind == "cvae"

    def loss(self, x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.ddpm:
            x01 = (x * FASHION_MNIST_STD + FASHION_MNIST_MEAN).clamp(0, 1)
            loss = ddpm_loss(model or self.net, x01, y)
            return loss, {"loss": loss.item()}
        loss, rec, kl = self.net.loss(x, y, beta=self.cfg.beta)
        return loss, {"loss": loss.item(), "rec": rec.item(), "kl": kl.item()}

    def after_step(self, step: int) -> None:
        if self.ddpm:  # EMA with a warm-up, so a short run is not dominated by its first steps
            decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.net.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)

    def val_loss(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)  # the same noise every epoch: comparable figures
            return self.loss(x, y, self.ema)[1]

    def score_graph(self, method: str, norm: tuple[float, float, float, float],
                    latent: tuple[torch.Tensor, torch.Tensor] | None) -> torch.nn.Module:
        if self.ddpm:
            return DiffusionScoreGraph(self.ema, input_mean=FASHION_MNIST_MEAN,
                                       input_std=FASHION_MNIST_STD, norm=norm, method=method,
                                       seed=self.cfg.seed).eval()
        assert latent is not None
        return ScoreGraph(self.net, latent_mean=latent[0], latent_prec=latent[1], norm=norm,
                          method=method).eval()

    def generator_graph(self, gauss: tuple[torch.Tensor, torch.Tensor] | None
                        ) -> torch.nn.Module:
        if self.ddpm:
            return SamplerGraph(self.ema, steps=self.cfg.sample_steps,
                                guidance=self.cfg.guidance).eval()
        assert gauss is not None
        return DecoderGraph(self.net, latent_mean=gauss[0], latent_chol=gauss[1]).eval()


def train_generative(cfg: GenConfig, *, progress: ProgressFn | None = None,
                     notify: Callable[[str], None] | None = None) -> GenResult:
    progress = progress or _noop
    notify = notify or _noop
    if cfg.kind not in KINDS:
        raise MLError(f"unknown generative model kind {cfg.kind!r} (use vae, cvae or ddpm)")
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

    fam = _Family(cfg)
    opt = torch.optim.Adam(fam.net.parameters(), lr=cfg.lr)

    # -- train -----------------------------------------------------------------------------
    from ..tracking import Tracker, default_tracking_uri

    tracker = (Tracker(cfg.tracking_uri or default_tracking_uri(run_dir), run_dir,
                       f"gen-{cfg.kind}") if cfg.track else None)
    run_id = None
    history: list[dict[str, float]] = []
    train_budget = _train_budget(cfg, fam, val_in[:64], len(val_in))
    steps_per_epoch = int(np.ceil(len(train_in) / cfg.batch_size))
    total_steps = cfg.epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(cfg.seed)
    val_x, val_y = torch.from_numpy(val_in[:1000]), torch.from_numpy(va_y[:1000])
    from safetensors.torch import save_file
    with tracker if tracker else _Null() as tr:
        if tr:
            run_id = tr.run_id
            tr.log_params({**asdict(cfg), "threads": threads})
        step = start_epoch = 0
        out_of_time = False
        best_loss, best_epoch, best_state = float("inf"), 0, None
        last_path = run_dir / LAST_CHECKPOINT
        if cfg.resume:
            state = _load_last(last_path, cfg, fam, opt, gen)
            start_epoch, step, history = state["epoch"], state["step"], state["history"]
            best_loss, best_epoch = state["best_loss"], state["best_epoch"]
            if best_epoch and (run_dir / "best.safetensors").is_file():
                from safetensors.torch import load_file

                best_state = load_file(str(run_dir / "best.safetensors"))
            notify(f"resuming after epoch {start_epoch} (step {step})")
        for epoch in range(start_epoch, cfg.epochs):
            fam.net.train()
            perm = torch.randperm(len(train_in), generator=gen)
            sums: dict[str, float] = {}
            n_b = 0
            for i in range(0, len(perm), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                for g in opt.param_groups:  # cosine decay over the planned steps
                    g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps)))
                loss, parts = fam.loss(train_in[idx], train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                fam.after_step(step)
                for key, v in parts.items():
                    sums[key] = sums.get(key, 0.0) + v
                step += 1
                n_b += 1
                progress("training", step, total_steps)
                if time.monotonic() - t_start > train_budget:
                    out_of_time = True
                    break
            fam.net.eval()
            val = fam.val_loss(val_x, val_y)
            row = {**{f"train_{k}": v / max(1, n_b) for k, v in sums.items()},
                   **{f"val_{k}": v for k, v in val.items()}}
            history.append(row)
            if tr:
                tr.log_metrics(row, step=epoch)
            if val["loss"] < best_loss:  # the best epoch is what gets exported
                best_loss, best_epoch = val["loss"], epoch + 1
                best_state = {k: v.detach().clone() for k, v in fam.ema.state_dict().items()}
                save_file(best_state, str(run_dir / "best.safetensors"))
            notify(f"epoch {epoch + 1}: val loss " + (
                f"{val['loss']:.4f}" if fam.ddpm else
                f"{val['loss']:.1f} (rec {val['rec']:.1f}, kl {val['kl']:.1f})"))
            _save_atomic({"net": fam.net.state_dict(), "ema": fam.ema.state_dict(),
                          "opt": opt.state_dict(), "gen_state": gen.get_state(),
                          "config_json": json.dumps(asdict(cfg)),
                          "state_json": json.dumps({"epoch": epoch + 1, "step": step,
                                                    "history": history, "best_loss": best_loss,
                                                    "best_epoch": best_epoch})}, last_path)
            if out_of_time:
                notify("time budget reached; stopping training (continue with --resume)")
                break
        train_s = time.monotonic() - t_start
        if best_state is not None and best_epoch < len(history):
            notify(f"restoring epoch {best_epoch} (best validation loss {best_loss:.4g})")
            fam.ema.load_state_dict(best_state)
        fam.net.eval()
        fam.ema.eval()
        save_file(fam.ema.state_dict(),
                  str(run_dir / ("unet-ema.safetensors" if fam.ddpm else "vae.safetensors")))

        # -- score statistics and the score method ------------------------------------------
        progress("calibrating", 0, 3)
        latent = gauss = None
        if not fam.ddpm:
            vae = fam.net
            with torch.inference_mode():
                k = vae.num_classes
                mus = torch.cat([vae.encode(train_in[i:i + 1000], F.one_hot(
                    train_y[i:i + 1000], k).float() if k else None)[0]
                    for i in range(0, min(len(train_in), 20000), 1000)])
            gauss = fit_latent_gaussians(mus, train_y[:len(mus)], k)
            save_file({"mean": gauss[0].contiguous(), "chol": gauss[1].contiguous()},
                      str(run_dir / "latent_gaussians.safetensors"))
            mean = mus.mean(0)
            cov = torch.cov((mus - mean).T) + 1e-3 * torch.eye(cfg.latent_dim)
            latent = (mean, torch.linalg.inv(cov))
        half = len(val_in) // 2
        probe = fam.score_graph(fam.methods[0], (0, 1, 0, 1), latent)
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
            if m == fam.methods[0]:
                return p[:, 1]
            if m == fam.methods[1]:
                return p[:, 2]
            return (p[:, 1] - norm[0]) / norm[1] + (p[:, 2] - norm[2]) / norm[3]

        choose = {m: float(np.mean([auroc(by_method(in_parts, m), by_method(o, m))
                                    for o in ood_parts.values()])) for m in fam.methods}
        method = max(choose, key=choose.get)
        notify("validation mean AUROC by score: " + ", ".join(
            f"{m} {a:.3f}" for m, a in choose.items()) + f" -> {method}")
        progress("calibrating", 1, 3)

        # -- export ---------------------------------------------------------------------------
        score_graph = fam.score_graph(method, norm, latent)
        score_path = run_dir / "model.onnx"
        gen_name = "sampler.onnx" if fam.ddpm else "decoder.onnx"
        decoder_path = run_dir / gen_name
        _export(score_graph, (torch.from_numpy(test_in[:2]),), score_path, ["input"],
                ["score", *fam.parts])
        parity = _parity(_torch_parts(score_graph, test_in[:64]),
                         ort_scores(score_path, test_in[:64]), "the score graph")
        decoder = fam.generator_graph(gauss)
        z = torch.randn(4, fam.latent_dim, generator=gen)
        conditional = fam.conditional
        dec_args: tuple = (z, torch.eye(len(cfg.labels))[:4]) if conditional else (z,)
        _export(decoder, dec_args, decoder_path, ["z", "label"] if conditional else ["z"],
                ["image"])
        with torch.inference_mode():
            expected = decoder(*dec_args).numpy()
        feeds = {"z": dec_args[0].numpy()}
        if conditional:
            feeds["label"] = dec_args[1].numpy()
        dec_sess = _session(decoder_path)
        _parity(expected, dec_sess.run(None, feeds)[0], "the " + gen_name[:-5])
        extra_files: dict[str, Any] = {gen_name: decoder_path}
        denoise_metrics: dict[str, Any] = {}
        if fam.ddpm:
            denoiser_path = run_dir / "denoiser.onnx"
            denoiser = DenoiseGraph(fam.ema).eval()
            d_args = (torch.rand(2, 1, SIDE, SIDE, generator=gen), torch.full((2,), 0.2))
            _export(denoiser, d_args, denoiser_path, ["noisy", "sigma"], ["clean"])
            with torch.inference_mode():
                expected = denoiser(*d_args).numpy()
            den_sess = _session(denoiser_path)
            _parity(expected, den_sess.run(None, {"noisy": d_args[0].numpy(),
                                                  "sigma": d_args[1].numpy()})[0],
                    "the denoiser")
            extra_files["denoiser.onnx"] = denoiser_path
            denoise_metrics = _denoise_figures(den_sess, te_x[:cfg.report_n // 4] / 255.0,
                                               cfg.denoise_sigma, cfg.seed)
            notify(f"denoising at sigma {cfg.denoise_sigma}: PSNR "
                   f"{denoise_metrics['denoise_psnr_noisy_db']:.2f} -> "
                   f"{denoise_metrics['denoise_psnr_db']:.2f} dB")
        progress("calibrating", 2, 3)

        # -- threshold (validation) and figures (test), all with onnxruntime ------------------
        val_scores = ort_scores(score_path, val_in[half:])[:, 0]
        threshold = threshold_for_fpr(val_scores, cfg.target_fpr)
        test_parts = ort_scores(score_path, test_in[:cfg.report_n])
        test_ood = {k: ort_scores(score_path, preprocess_images(
            make_ood(k, cfg.report_n // 4, source=te_x, seed=cfg.seed + 2), pre))
            for k in OOD_KINDS}
        per_kind = {}
        for name, col in (("score", 0), (fam.parts[0], 1), (fam.parts[1], 2)):
            per_kind[name] = {k: round(auroc(test_parts[:, col], v[:, col]), 4)
                              for k, v in test_ood.items()}
        test_fpr = float((test_parts[:, 0] > threshold).mean())
        tpr = {k: round(float((v[:, 0] > threshold).mean()), 4) for k, v in test_ood.items()}
        qs = np.quantile(val_scores, [0.0, 0.25, 0.5, 0.75, 0.9])
        spread = threshold - qs[0]
        edges = np.unique(np.round(np.concatenate(
            [qs, [threshold], threshold + spread * np.array([0.5, 1.0, 2.0, 4.0])]), 6))
        one = test_in[:1]
        p95 = _p95_ms(lambda: _session_run(dec_sess, feeds, 1), runs=10 if fam.ddpm else 30)
        score_sess = _session(score_path)
        p95_score = _p95_ms(lambda: score_sess.run(None, {"input": one}))
        progress("calibrating", 3, 3)

        metrics: dict[str, Any] = {
            "score_method": method,
            "val_mean_auroc_by_method": {k: round(v, 4) for k, v in choose.items()},
            "test_auroc": per_kind["score"],
            "test_mean_auroc": round(float(np.mean(list(per_kind["score"].values()))), 4),
            f"test_auroc_{fam.parts[0]}": per_kind[fam.parts[0]],
            f"test_auroc_{fam.parts[1]}": per_kind[fam.parts[1]],
            "threshold": threshold,
            "target_fpr": cfg.target_fpr,
            "test_fpr": round(test_fpr, 4),
            "test_detection_rate": tpr,
            "val_loss": best_loss if history else None,  # of the exported epoch
            "epochs": len(history),
            "best_epoch": best_epoch,
            "train_steps": step,
            "train_s": round(train_s, 1),
            "p95_score_latency_ms": round(p95_score, 2),
            "p95_decode_latency_ms": round(p95, 2),
            "onnx_parity_max_abs_diff": parity,
            **denoise_metrics,
        }
        if fam.ddpm:
            metrics["sampling_steps"] = cfg.sample_steps

        # -- bundle -------------------------------------------------------------------------
        golden_in = test_in[:GOLDEN_COUNT]
        golden_out = ort_scores(score_path, golden_in)[:, 0]
        name = cfg.name or f"fashion-{cfg.kind}"
        card = _card(name, cfg, metrics)
        provenance: dict[str, Any] = {"data": cfg.data, "kind": cfg.kind,
                                      "mlflow_run_id": run_id, "train_images": len(train_in)}
        if fam.ddpm:
            provenance.update(schedule="cosine", sampler=f"DDIM, {cfg.sample_steps} steps",
                              guidance=cfg.guidance, unet_width=cfg.unet_width)
        else:
            provenance["beta"] = cfg.beta
        manifest = write_bundle(
            bundle_dir, name=name, version=cfg.version, labels=cfg.labels, preprocessing=pre,
            model=score_path, golden_inputs=golden_in, golden_outputs=golden_out,
            atol=max(1e-3, 1e-3 * float(np.abs(golden_out).max())),
            max_latency_ms=max(50.0, 20 * p95_score),
            extra_files={**extra_files, "MODEL_CARD.md": card.encode()},
            metrics=metrics,
            provenance=provenance,
            kind="generator",
            detector=DetectorSpec(model="model.onnx", output="score", method=method,
                                  threshold=threshold, target_fpr=cfg.target_fpr,
                                  histogram_edges=tuple(float(e) for e in edges)),
            generator=GeneratorSpec(model=gen_name, latent_dim=fam.latent_dim,
                                    conditional=conditional,
                                    denoiser="denoiser.onnx" if fam.ddpm else None),
        )
        _write_samples(dec_sess, cfg, conditional, fam.latent_dim, run_dir / "samples.png")
        metrics["wall_s"] = round(time.monotonic() - t_start, 1)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if tr:
            tr.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)},
                           step=len(history))
            tr.set_tag("score_method", method)
            tr.log_artifact(bundle_dir, "bundle")
            tr.log_artifact(run_dir / "samples.png")
    (run_dir / LAST_CHECKPOINT).unlink(missing_ok=True)  # complete: a rerun starts afresh
    return GenResult(bundle_dir=bundle_dir, manifest=manifest, metrics=metrics, run_id=run_id)


def _load_last(path: Path, cfg: GenConfig, fam: _Family, opt: torch.optim.Optimizer,
               gen: torch.Generator) -> dict[str, Any]:
    """Restore an interrupted run's weights, optimiser and RNG; its progress as a dict."""
    if not path.is_file():
        raise MLError(f"nothing to resume: {path} does not exist (the run finished, or never "
                      "completed an epoch)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(ck["config_json"])
        state = json.loads(ck["state_json"])
    except Exception as exc:  # torch raises many types for a damaged file
        raise MLError(f"cannot resume from {path}: {exc}") from None
    now = json.loads(json.dumps(asdict(cfg)))
    diff = [k for k in _RESUME_KEYS if saved.get(k) != now.get(k)]
    if diff:
        raise MLError(f"cannot resume: the run was started with other settings "
                      f"({', '.join(diff)})")
    fam.net.load_state_dict(ck["net"])
    fam.ema.load_state_dict(ck["ema"])
    opt.load_state_dict(ck["opt"])
    gen.set_state(ck["gen_state"])
    return state


def _train_budget(cfg: GenConfig, fam: _Family, probe: np.ndarray, n_val: int) -> float:
    """Seconds of the budget training may use. A VAE's calibration is cheap (a fixed share is
    left for it); a DDPM's runs the network six times an image, so its cost is measured on a
    probe batch and set aside."""
    if not cfg.time_budget_s:
        return float("inf")
    if not fam.ddpm:
        return cfg.time_budget_s * _TRAIN_SHARE_OF_BUDGET
    graph = fam.score_graph(fam.methods[0], (0, 1, 0, 1), None)
    t0 = time.perf_counter()
    _torch_parts(graph, probe)
    per_image = (time.perf_counter() - t0) / len(probe)
    scored = n_val + cfg.report_n // 2 + cfg.report_n * 2 + cfg.report_n // 4  # val, OOD, test
    reserve = 1.3 * per_image * scored + _EXPORT_S
    return max(0.3 * cfg.time_budget_s, cfg.time_budget_s - reserve)


def _denoise_figures(sess, clean: np.ndarray, sigma: float, seed: int) -> dict[str, Any]:
    """PSNR of noisy test images (Gaussian noise of std `sigma`, not clipped) and of the
    denoiser's estimates, measured with onnxruntime."""
    clean = clean.astype(np.float32)[:, None]
    rng = np.random.default_rng(seed + 3)
    noisy = (clean + sigma * rng.standard_normal(clean.shape)).astype(np.float32)
    est = np.concatenate([sess.run(None, {"noisy": noisy[i:i + 250], "sigma": np.full(
        len(noisy[i:i + 250]), sigma, np.float32)})[0] for i in range(0, len(noisy), 250)])
    before, after = float(psnr(clean, noisy).mean()), float(psnr(clean, est).mean())
    return {"denoise_sigma": sigma, "denoise_psnr_noisy_db": round(before, 2),
            "denoise_psnr_db": round(after, 2), "denoise_psnr_gain_db": round(after - before, 2),
            "denoise_images": len(clean)}


def _session_run(sess, feeds: dict[str, np.ndarray], n: int) -> Any:
    return sess.run(None, {k: v[:n] for k, v in feeds.items()})


def _write_samples(sess, cfg: GenConfig, conditional: bool, latent_dim: int, path: Path
                   ) -> None:
    rng = np.random.default_rng(cfg.seed)
    k = len(cfg.labels)
    z = rng.standard_normal((8 * k, latent_dim)).astype(np.float32)
    feeds = {"z": z}
    if conditional:
        feeds["label"] = np.eye(k, dtype=np.float32)[np.repeat(np.arange(k), 8)]
    imgs = sess.run(None, feeds)[0][:, 0]
    image_grid(imgs, cols=8).save(path)


def _card(name: str, cfg: GenConfig, m: dict[str, Any]) -> str:
    if cfg.kind == "ddpm":
        what = (f"A class-conditional DDPM (UNet width {cfg.unet_width}, cosine schedule, "
                f"sampled with {cfg.sample_steps} DDIM steps, guidance {cfg.guidance})")
        extra = (f"- denoising at sigma {m['denoise_sigma']}: PSNR {m['denoise_psnr_noisy_db']} "
                 f"-> {m['denoise_psnr_db']} dB\n")
        latency = f"sample one image {m['p95_decode_latency_ms']} ms"
    else:
        what = (f"A {'class-conditional ' if cfg.kind == 'cvae' else ''}beta-VAE "
                f"(beta={cfg.beta}, latent {cfg.latent_dim})")
        extra = ""
        latency = f"decode {m['p95_decode_latency_ms']} ms"
    return (f"# {name} {cfg.version}\n\n"
            f"{what} trained on {cfg.data} for {m['epochs']} epoch(s) ({m['train_steps']} "
            f"steps), {m['train_s']} s on a CPU.\n\n"
            f"- anomaly score: {m['score_method']}; threshold {m['threshold']:.4g} for a "
            f"target false-positive rate of {cfg.target_fpr:.0%} (test: {m['test_fpr']:.1%})\n"
            f"- test AUROC vs locally built OOD sets: {m['test_auroc']}\n"
            f"{extra}"
            f"- p95 latency (1 thread, batch 1): score {m['p95_score_latency_ms']} ms, "
            f"{latency}\n\n"
            "Out-of-distribution sets are synthetic (rendered digits, uniform noise, rotated "
            "and inverted test images), not real-world drift.\n")


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
