"""Generative-model benchmark: one-class anomaly detection, class-imbalance fixes, sampling
latency and on-device `learn-normal` time, on Fashion-MNIST with the shipped code paths.

    python bench/generative.py [--one-class-budget 60] [--imbalance-budget 120] [--only ...]

Prints JSON lines on stdout:
  {"bench": "one_class", "method": ..., "mean_auroc": ..., "per_class": [...]}
      one VAE per class (`edgewise gen train --kind vae` on that class's training images),
      the bundle's own score (what the device computes) on the whole test split, AUROC of
      "not this class"; anchors: Deep SVDD 0.892, GeoTrans 0.935, ESAD 0.940; goal >= 0.93.
  {"bench": "imbalance", "fix": ..., "balanced_accuracy": ..., "minority_recall": ...}
      three classes cut to 1% of their training images; `edgewise train` from scratch with
      the same backbone and time budget for none / weights / oversample / generative (a cVAE
      trained on the same imbalanced data), then the choice `--balance auto` makes.
      `--imbalance-ddpm` adds a "generative" line whose samples come from a DDPM instead.
  {"bench": "sampling", ...}      generator latency per image (onnxruntime, 1 thread): the cVAE
                                  decoder, the DDPM's unrolled DDIM sampler
  {"bench": "learn_normal", ...}  agent `learn-normal` on 1,000 images, 2 cores
  {"bench": "ddpm", ...}          `gen train --kind ddpm` on all of Fashion-MNIST: training
                                  steps and seconds, anomaly AUROC on the OOD sets
  {"bench": "denoise", "method": ..., "psnr_db": ..., "gain_db": ...}
      1,000 test images plus Gaussian noise of std 0.2 (pixels in [0, 1], not clipped): the
      noisy input, the best Gaussian blur (its width chosen on 200 other test images), and the
      DDPM bundle's denoiser run by the agent's own `denoise_images`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgewise.ml.data import FASHION_MNIST_LABELS, load_idx_dataset, write_idx_dataset

MINORITY = (2, 4, 6)  # Pullover, Coat, Shirt: the classes most confused with each other


def emit(line: dict) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def bundle_scores(bundle: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    from edgewise.artifacts import validate_bundle
    from edgewise.ml.quick import preprocess_images

    manifest = validate_bundle(bundle)
    sess = ort.InferenceSession(str(bundle / manifest.model), providers=["CPUExecutionProvider"])
    x = preprocess_images(images, manifest.preprocessing)
    name = manifest.preprocessing.input_name
    return np.concatenate([sess.run(None, {name: x[i:i + 1000]})[0].reshape(-1)
                           for i in range(0, len(x), 1000)])


def one_class(work: Path, budget_s: float, classes: list[int]) -> None:
    from sklearn.metrics import roc_auc_score

    from edgewise.ml.gen import GenConfig, train_generative

    x, y = load_idx_dataset(split="train")
    xt, yt = load_idx_dataset(split="test")
    aucs = []
    for c in classes:
        data = work / f"one-class-{c}"
        write_idx_dataset(data, "train", x[y == c], y[y == c])
        write_idx_dataset(data, "test", xt, yt)
        t0 = time.perf_counter()
        result = train_generative(GenConfig(kind="vae", data=str(data), out_dir=str(
            work / f"vae-{c}"), time_budget_s=budget_s, epochs=200, val_limit=1000,
            report_n=500, track=False))
        scores = bundle_scores(result.bundle_dir, xt)
        auc = float(roc_auc_score(yt != c, scores))
        aucs.append(round(auc, 4))
        log(f"class {c} ({FASHION_MNIST_LABELS[c]}): AUROC {auc:.4f}, "
            f"{time.perf_counter() - t0:.0f} s, score {result.metrics.get('score_method')}")
    emit({"bench": "one_class", "method": "vae (bundle score)", "budget_s_per_class": budget_s,
          "mean_auroc": round(float(np.mean(aucs)), 4), "per_class": aucs,
          "classes": classes, "anchors": {"Deep SVDD": 0.892, "GeoTrans": 0.935,
                                          "ESAD": 0.940}, "goal": 0.93})


FIXES = ("none", "weights", "oversample", "generative", "auto")


def imbalance(work: Path, budget_s: float, gen_budget_s: float,
              ddpm_budget_s: float | None = None, fixes: tuple[str, ...] = FIXES) -> None:
    import torch

    from edgewise.ml.gen import GenConfig, train_generative
    from edgewise.ml.train import TrainConfig, train

    x, y = load_idx_dataset(split="train")
    xt, yt = load_idx_dataset(split="test")
    rng = np.random.default_rng(0)
    keep = np.concatenate([
        rng.choice(np.nonzero(y == c)[0], len(np.nonzero(y == c)[0]) // 100 if c in MINORITY
                   else len(np.nonzero(y == c)[0]), replace=False) for c in range(10)])
    data = work / "fashion-imbalanced"
    write_idx_dataset(data, "train", x[keep], y[keep])
    write_idx_dataset(data, "test", xt, yt)
    log(f"imbalanced train split: {np.bincount(y[keep]).tolist()}")
    needs_cvae = bool({"generative", "auto"} & set(fixes))
    gen = train_generative(GenConfig(kind="cvae", data=str(data), out_dir=str(work / "cvae"),
                                     time_budget_s=gen_budget_s, epochs=200, track=False)
                           ) if needs_cvae else None

    def run(fix: str, generator: Path | None = gen.bundle_dir if gen else None) -> dict:
        source = generator.parent.name if generator else "-"
        out = work / f"train-{fix}-{source}"
        t0 = time.perf_counter()
        result = train(TrainConfig(data=str(data), out_dir=str(out), strategy="from-scratch",
                                   time_budget_s=budget_s, balance=fix, track=False,
                                   generator=str(generator) if generator else None))
        import onnxruntime as ort

        from edgewise.ml.quick import preprocess_images

        manifest = result.manifest
        sess = ort.InferenceSession(str(result.bundle_dir / manifest.model),
                                    providers=["CPUExecutionProvider"])
        xin = preprocess_images(xt, manifest.preprocessing)
        logits = np.concatenate([sess.run(None, {manifest.preprocessing.input_name:
                                                 xin[i:i + 1000]})[0]
                                 for i in range(0, len(xin), 1000)])
        pred = logits.argmax(1)
        recall = [float((pred[yt == c] == c).mean()) for c in range(10)]
        return {"bench": "imbalance", "fix": fix, "chosen": manifest.provenance.get("balance"),
                "generator": source if fix in ("generative", "auto") else None,
                "balanced_accuracy": round(float(np.mean(recall)), 4),
                "minority_recall": round(float(np.mean([recall[c] for c in MINORITY])), 4),
                "accuracy": round(float((pred == yt).mean()), 4),
                "budget_s": budget_s, "wall_s": round(time.perf_counter() - t0, 1),
                "trials": manifest.provenance.get("balance_trials") or {}}

    torch.manual_seed(0)
    for fix in fixes:
        line = run(fix)
        emit(line)
        log(f"{fix}: balanced accuracy {line['balanced_accuracy']:.4f}, minority recall "
            f"{line['minority_recall']:.4f} (chosen: {line['chosen']})")
    if ddpm_budget_s:
        diffusion = train_generative(GenConfig(kind="ddpm", data=str(data),
                                               out_dir=str(work / "ddpm-imbalanced"),
                                               time_budget_s=ddpm_budget_s, epochs=200,
                                               track=False))
        line = run("generative", diffusion.bundle_dir)
        emit(line)
        log(f"generative (ddpm): balanced accuracy {line['balanced_accuracy']:.4f}")
    if gen:
        sampling(gen.bundle_dir)
        learn_normal_time(work, gen.bundle_dir)


def sampling(bundle: Path, model: str = "cvae decoder") -> None:
    import onnxruntime as ort

    from edgewise.artifacts import validate_bundle

    manifest = validate_bundle(bundle)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle / manifest.generator.model), opts,
                                providers=["CPUExecutionProvider"])
    z = np.random.default_rng(0).standard_normal((16, manifest.generator.latent_dim)).astype(
        np.float32)
    onehot = np.eye(len(manifest.labels), dtype=np.float32)[np.arange(16) % len(manifest.labels)]
    feed = {"z": z, "label": onehot} if manifest.generator.conditional else {"z": z}
    times = []
    warm, runs = (10, 60) if manifest.generator.denoiser is None else (3, 15)
    for i in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        if i >= warm:
            times.append((time.perf_counter() - t0) * 1000)
    emit({"bench": "sampling", "model": model, "batch": 16, "threads": 1,
          "p50_ms_per_image": round(float(np.median(times)) / 16, 4),
          "p50_ms_batch": round(float(np.median(times)), 3)})


def learn_normal_time(work: Path, bundle: Path) -> None:
    from PIL import Image

    from edgewise.agent._anomaly import learn_normal
    from edgewise.agent._runtime import OnnxModel

    x, _ = load_idx_dataset(split="test")
    images = work / "device-images"
    images.mkdir(exist_ok=True)
    for i in range(1000):
        Image.fromarray(x[i]).save(images / f"{i:04d}.png")
    state = work / "device-state"
    state.mkdir(exist_ok=True)
    model = OnnxModel(bundle)
    t0 = time.perf_counter()
    result = learn_normal(state, model, images, target_fpr=0.05, time_budget_s=600)
    emit({"bench": "learn_normal", "images": result.get("images", 1000),
          "wall_s": round(time.perf_counter() - t0, 2), "cores": os.cpu_count(),
          "threshold": result.get("threshold")})


def _blur(images: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur of [N, H, W] images (reflect padding)."""
    r = max(1, int(3 * sigma_px + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2)
    k /= k.sum()
    out = np.pad(images, ((0, 0), (r, r), (0, 0)), mode="reflect")
    out = sum(k[i] * out[:, i:i + images.shape[1]] for i in range(2 * r + 1))
    out = np.pad(out, ((0, 0), (0, 0), (r, r)), mode="reflect")
    return sum(k[i] * out[:, :, i:i + images.shape[2]] for i in range(2 * r + 1))


def ddpm(work: Path, budget_s: float) -> Path:
    from edgewise.ml.gen import GenConfig, train_generative

    t0 = time.perf_counter()
    result = train_generative(GenConfig(kind="ddpm", out_dir=str(work / "ddpm"),
                                        time_budget_s=budget_s, epochs=200, track=False),
                              notify=log)
    m = result.metrics
    emit({"bench": "ddpm", "budget_s": budget_s, "wall_s": round(time.perf_counter() - t0, 1),
          "train_s": m["train_s"], "train_steps": m["train_steps"],
          "score_method": m["score_method"], "test_auroc": m["test_auroc"],
          "test_mean_auroc": m["test_mean_auroc"], "p95_score_latency_ms":
          m["p95_score_latency_ms"], "sampling_steps": m["sampling_steps"]})
    return result.bundle_dir


def denoise(bundle: Path, sigma: float = 0.2, n: int = 1000) -> None:
    from edgewise.agent import denoise_images
    from edgewise.artifacts import validate_bundle
    from edgewise.ml.gen import psnr

    x, _ = load_idx_dataset(split="test")
    clean = x[:n].reshape(n, 28, 28).astype(np.float32) / 255.0
    val = x[-200:].reshape(200, 28, 28).astype(np.float32) / 255.0
    rng = np.random.default_rng(0)
    noisy = clean + sigma * rng.standard_normal(clean.shape).astype(np.float32)
    noisy_val = val + sigma * rng.standard_normal(val.shape).astype(np.float32)
    base = float(psnr(clean, noisy).mean())
    widths = (0.5, 0.75, 1.0, 1.25, 1.5)
    best = max(widths, key=lambda w: float(psnr(val, _blur(noisy_val, w)).mean()))
    manifest = validate_bundle(bundle)
    est, ms = denoise_images(bundle, manifest, noisy, sigma=sigma)
    for method, out, extra in (
            ("noisy input", noisy, {}),
            ("gaussian blur", np.clip(_blur(noisy, best), 0, 1), {"blur_sigma_px": best}),
            ("ddpm denoiser", est, {"ms_per_image": round(ms / n, 3), "threads": 1})):
        p = float(psnr(clean, out).mean())
        emit({"bench": "denoise", "sigma": sigma, "images": n, "method": method,
              "psnr_db": round(p, 2), "gain_db": round(p - base, 2), **extra})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--only", default="one_class,imbalance,ddpm")
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--one-class-budget", type=float, default=60.0)
    ap.add_argument("--imbalance-budget", type=float, default=180.0)
    ap.add_argument("--generator-budget", type=float, default=120.0)
    ap.add_argument("--ddpm-budget", type=float, default=300.0)
    ap.add_argument("--imbalance-fixes", default=",".join(FIXES))
    ap.add_argument("--imbalance-ddpm", action="store_true",
                    help="also synthesise the rare classes with a DDPM (trained on the same "
                         "imbalanced data, --ddpm-budget)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgewise-bench-gen-"))
    only = set(args.only.split(","))
    emit({"bench": "machine", "cpus": os.cpu_count(), "load_avg": os.getloadavg()})
    if "one_class" in only:
        one_class(work, args.one_class_budget, [int(c) for c in args.classes.split(",")])
    if "imbalance" in only:
        imbalance(work, args.imbalance_budget, args.generator_budget,
                  args.ddpm_budget if args.imbalance_ddpm else None,
                  tuple(f for f in args.imbalance_fixes.split(",") if f))
    if "ddpm" in only:
        bundle = ddpm(work, args.ddpm_budget)
        denoise(bundle)
        sampling(bundle, "ddpm sampler (DDIM, 25 steps, guidance 1)")
    emit({"bench": "done", "load_avg": os.getloadavg()})


if __name__ == "__main__":
    main()
