"""`edgewise train`: data -> strategy -> training under a time budget -> test -> ONNX bundle.

Invariant: a run writes its resolved config before it trains, a checkpoint it can resume from
at most `_CHECKPOINT_EVERY_S` apart, and a bundle only after onnxruntime reproduced the torch
model on a batch; model selection looks at the validation split only, the test split is
touched once, at the end. With a time budget the learning-rate schedule runs on the clock
(fraction of the training time used), so a slower machine gets fewer epochs of the same
one-cycle shape instead of a cut-off schedule.

Layout of `--out DIR`: `DIR/bundle/` is the bundle (format v1: edgewise.json, model.onnx,
golden.npz, MODEL_CARD.md, plots, train_config.json); `DIR/run/` holds what only the build
machine needs (config.json, checkpoints, the MLflow store, summary.json).

Reads top to bottom in `train()`: config -> data -> strategy -> model -> tracking -> fit ->
test -> export + parity -> plots + card -> bundle -> summary.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgewise.artifacts import BundleManifest, Preprocessing, file_sha256, write_bundle

from .augment import AugmentConfig, augment_batch
from .backbones import create_backbone, get_backbone_spec, pretrained_weights_path
from .compress._torch_source import TORCH_KEY, WEIGHTS_FILE, weights_bytes
from .data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    ImageDataset,
    class_balance_warnings,
    load_dataset,
    stratified_split,
    stratified_subset,
)
from .errors import MLError
from .model import ImageClassifier
from .quick import (
    GOLDEN_ATOL,
    GOLDEN_COUNT,
    OPSET,
    _ort_run,
    _ort_session,
    _p95_latency_ms,
    _train_head,
    export_onnx,
)
from .report import confusion_matrix, model_card, plot_confusion, plot_curves
from .strategies import StrategyChoice, choose_strategy
from .tracking import Tracker, default_tracking_uri

__all__ = ["TrainConfig", "TrainResult", "parse_duration", "train"]

ProgressFn = Callable[[str, float, float], None]
NotifyFn = Callable[[str], None]

_CHECKPOINT_EVERY_S = 30.0
_EVAL_BATCH = 500
_WARMUP_FRAC = 0.15
_EMA_DECAY = 0.998
_VALIDATE_ALL_FROM = 0.5  # of the schedule; before it, every other epoch (on the clock)
# Time kept back from a budget for what follows training: the last validation, the test pass on
# onnxruntime (float32; `_ORT_TEST_COST` x the per-image time of a timed torch batch, a margin:
# measured 1.0x on the fast CNN with bf16, 2026-11-23) and a fixed part (best checkpoint, ONNX
# export, parity check, latency, plots, bundle: 1-2 s measured, kept at 8 s).
_RESERVE_FIXED_S = 8.0
_ORT_TEST_COST = 1.5
# What must stay equal for `--resume` to continue a run rather than start a different one.
_RESUME_KEYS = ("data", "strategy", "backbone", "weights_path", "resolution", "batch_size",
                "seed", "augment", "train_per_class", "val_fraction", "trainable_blocks",
                "feature_blocks", "feature_grid")


@dataclass
class TrainConfig:
    data: str = "fashion-mnist"
    out_dir: str = "model"
    name: str | None = None  # bundle name; default: from the data set
    version: str = "1.0.0"
    strategy: str = "auto"  # auto | feature-extract | fine-tune | from-scratch
    backbone: str | None = None  # default: chosen with the strategy
    weights_path: str | None = None  # local .pth/.safetensors for the backbone
    resolution: int | None = None  # backbone input size; default by strategy (CPU cost)
    time_budget_s: float | None = None  # whole run, wall clock
    epochs: int | None = None  # without a budget; default by strategy
    batch_size: int = 256
    lr: float | None = None  # peak; default by strategy
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    dropout: float = 0.0
    augment: str | None = None  # preset name (edgewise.ml.augment); default by strategy
    optimizer: str | None = None  # sgd | adamw; default by strategy
    ema: bool = True
    tta_flip: bool | None = None  # default: on for from-scratch (cheap there)
    trainable_blocks: int = 4  # fine-tune: last N blocks; <= 0 trains all
    # feature-extract: features from the backbone's first N blocks, their activation map
    # pooled to feature_grid x feature_grid, instead of its last layer; default: the
    # backbone's mid-level blocks when `auto` picks case 3, else the last layer.
    feature_blocks: int | None = None
    feature_grid: int = 4
    backbone_lr_mult: float = 0.1  # fine-tune: backbone LR relative to the head's
    val_fraction: float = 0.1
    train_per_class: int | None = None  # stratified subset of the training split
    test_per_class: int | None = None
    bf16: bool | None = None  # bfloat16 autocast; default: from-scratch only (see _fit)
    seed: int = 0
    tracking_uri: str | None = None  # default: sqlite store under DIR/run
    track: bool = True
    stop_after_epochs: int | None = None  # pause after N epochs; `resume` continues
    resume: bool = False
    threads: int | None = None  # torch threads; default: the cores other work leaves free
    # Class imbalance: none | weights (loss) | oversample | generative (cVAE samples of the
    # rare classes from `generator`) | auto (short trials, judged by balanced val accuracy).
    balance: str = "none"
    generator: str | None = None  # a `edgewise gen train --kind cvae` bundle
    train_seconds: float | None = None  # internal (balance trials): the training loop's own
    # wall-clock budget, nothing reserved for test and export

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainResult:
    out_dir: Path
    bundle_dir: Path | None
    manifest: BundleManifest | None
    choice: StrategyChoice
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None
    paused: bool = False
    warnings: list[str] = field(default_factory=list)


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '1h30m' -> seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or "".join(a + b for a, b in parts) != text.replace(" ", ""):
        raise ValueError(f"cannot read duration {text!r} (use e.g. 90s, 15m, 1h)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def _noop(*_: Any) -> None:
    pass


def _free_cores() -> int:
    """Cores not already busy (1-minute load average), at least one.

    On a shared machine torch with more threads than free cores spends its time in barrier
    waits: measured on 2 busy cores, 1 thread trained EfficientNet-Lite0 7x and evaluated it 4x
    faster than 2 threads.
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return cores
    return max(1, min(cores, int(cores - busy + 0.5)))


_PARITY_RTOL = 1e-3


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively here (AVX512-BF16 or AMX), not emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _check_parity(model: nn.Module, path: Path, batch: np.ndarray) -> float:
    """Max |onnxruntime - torch| on a batch; raises unless within 1e-3 of the logits' scale."""
    from .errors import ExportError

    with torch.inference_mode():
        expected = model(torch.from_numpy(batch)).numpy()
    got = _ort_run(_ort_session(path), batch)
    diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else math.inf
    bound = _PARITY_RTOL * max(1.0, float(np.abs(expected).max()))
    if not diff <= bound:
        raise ExportError(f"onnxruntime and torch disagree on {path.name}: max |diff| "
                          f"{diff:.3g} > {bound:.3g} (shapes {got.shape} vs {expected.shape})")
    return diff


# ---- small pieces ---------------------------------------------------------------------------

def _bundle_name(data: str) -> str:
    stem = "fashion-mnist" if data == "fashion-mnist" else Path(data).resolve().name
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"
    return name[:64]


def _lr_factor(frac: float) -> float:
    """One-cycle: linear warm-up to the peak, then linear decay to zero."""
    frac = min(max(frac, 0.0), 1.0)
    if frac < _WARMUP_FRAC:
        return 0.1 + 0.9 * frac / _WARMUP_FRAC
    return max(0.0, (1.0 - frac) / (1.0 - _WARMUP_FRAC))


class _EMA:
    """Exponential moving average of all float weights and buffers (BN statistics too)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values(),
                        strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1.0 - d)
            else:
                e.copy_(m)


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _to_nchw_u8(ds: ImageDataset) -> torch.Tensor:
    x = torch.from_numpy(np.array(ds.images, copy=True))
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


class _Inputs:
    """uint8 images -> (augmented) contract-normalised float batches, on demand."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, u8: torch.Tensor, aug: AugmentConfig | None = None,
                 gen: torch.Generator | None = None) -> torch.Tensor:
        x = u8.float().div_(255.0)
        if aug is not None:
            x = augment_batch(x, aug, gen)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def _logits(model: nn.Module, u8: torch.Tensor, inputs: _Inputs, *, bf16: bool = False,
            progress: ProgressFn = _noop, stage: str = "") -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(u8), _EVAL_BATCH):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(model(inputs(u8[i:i + _EVAL_BATCH])).float())
        if stage:
            progress(stage, min(i + _EVAL_BATCH, len(u8)), len(u8))
    return torch.cat(out)


def _trainable_split(model: ImageClassifier, n_blocks: int) -> tuple[list, list, list]:
    """(frozen modules, trainable backbone params, head params) for fine-tuning.

    EfficientNet-Lite: the last `n_blocks` MBConv blocks plus the 1x1 head conv train; other
    backbones: all of it (no block structure known). `n_blocks <= 0` trains everything.
    """
    bb = model.backbone
    head = list(model.head.parameters())
    if n_blocks > 0 and hasattr(bb, "_blocks"):
        blocks = list(bb._blocks)
        n = min(n_blocks, len(blocks))
        frozen = [bb._conv_stem, bb._bn0, *blocks[:len(blocks) - n]]
        trainable = [*blocks[len(blocks) - n:], bb._conv_head, bb._bn1]
        for m in frozen:
            for p in m.parameters():
                p.requires_grad_(False)
        for p in bb._fc.parameters():
            p.requires_grad_(False)  # the ImageNet classifier is not part of the features
        return frozen, [p for m in trainable for p in m.parameters()], head
    params = [p for n_, p in bb.named_parameters() if not n_.startswith("_fc.")]
    for p in getattr(bb, "_fc", nn.Identity()).parameters():
        p.requires_grad_(False)
    return [], params, head


# ---- the run ----------------------------------------------------------------------------

def train(config: TrainConfig, *, progress: ProgressFn | None = None,
          notify: NotifyFn | None = None) -> TrainResult:
    started = time.perf_counter()
    progress = progress or _noop
    notify = notify or _noop
    cfg = config
    torch.set_num_threads(cfg.threads or _free_cores())
    out = Path(cfg.out_dir)
    run_dir, bundle_dir = out / "run", out / "bundle"
    last_ckpt, best_ckpt = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    if cfg.resume and not last_ckpt.is_file():
        raise MLError(f"nothing to resume: {last_ckpt} does not exist")
    if not cfg.resume and last_ckpt.is_file():
        raise MLError(f"{out} holds an unfinished run; continue it with --resume or choose "
                      "another --out")
    if cfg.augment is not None:
        AugmentConfig.preset(cfg.augment)  # fail on a typo before loading any data

    # ---- data ---------------------------------------------------------------------------
    progress("load data", 0, 1)
    full, test = load_dataset(cfg.data)
    if test is None:  # an image folder without test/: hold out a stratified test split
        rest, test_idx = stratified_split(full.labels, 0.2, seed=cfg.seed + 7)
        full, test = full.subset(rest), full.subset(test_idx)
    if cfg.train_per_class:
        full = full.subset(stratified_subset(full.labels, cfg.train_per_class, cfg.seed))
    if cfg.test_per_class:
        test = test.subset(stratified_subset(test.labels, cfg.test_per_class, cfg.seed))
    train_idx, val_idx = stratified_split(full.labels, cfg.val_fraction, seed=cfg.seed)
    train_ds, val_ds = full.subset(train_idx), full.subset(val_idx)
    warnings = class_balance_warnings(train_ds)
    for w in warnings:
        notify(f"[yellow]warning:[/] {w}")
    progress("load data", 1, 1)
    num_classes = len(full.class_names)
    if full.source.startswith(str(Path("/usr/share/datasets/fashion-mnist"))) \
            or "fashion" in full.source.lower():
        mean, std = (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)
    else:
        px = train_ds.images.reshape(len(train_ds.images), -1, full.channels) / 255.0
        mean = tuple(float(v) for v in px.mean(axis=(0, 1)))
        std = tuple(max(float(v), 1e-3) for v in px.std(axis=(0, 1)))
    pre = Preprocessing(input_size=full.size, channels=full.channels, mean=mean, std=std,
                        layout="NCHW", input_name="input")

    # ---- strategy -------------------------------------------------------------------------
    per_class = len(train_ds.labels) / max(1, num_classes)
    choice = choose_strategy(images_per_class=per_class, channels=full.channels,
                             image_size=full.size, requested=cfg.strategy)
    backbone_name = cfg.backbone or choice.backbone
    spec = get_backbone_spec(backbone_name)
    pretrained = spec.has_pretrained and choice.strategy != "from-scratch" \
        or cfg.weights_path is not None
    if choice.strategy != "from-scratch" and not pretrained:
        raise MLError(f"strategy {choice.strategy} needs pretrained weights; backbone "
                      f"{backbone_name} has none (pass --weights FILE)")
    scratch = choice.strategy == "from-scratch"
    feature_blocks = cfg.feature_blocks
    if feature_blocks is None and choice.features == "middle":
        feature_blocks = spec.mid_blocks
    if feature_blocks is not None and (choice.strategy != "feature-extract"
                                       or spec.mid_blocks is None):
        raise MLError(f"--feature-blocks needs the feature-extract strategy and a backbone "
                      f"with a trunk (mid-level features); got {choice.strategy} with "
                      f"{backbone_name}")
    resolution = cfg.resolution or (full.size[0] if scratch or not spec.has_pretrained
                                    else max(64, min(full.size[0] * 2, 128)))
    # Explicit choices are written back, so the saved config reproduces this run exactly.
    # Augmentation by strategy: from scratch needs it most; fine-tuning on little data trains
    # the last blocks on cached frozen activations instead (no augmentation, many epochs).
    augment_name = cfg.augment or {"from-scratch": "default", "feature-extract": "none"}.get(
        choice.strategy, "light" if choice.case != 3 else "none")
    augment = AugmentConfig.preset(augment_name)
    cfg = TrainConfig.from_dict({
        **cfg.to_dict(), "backbone": backbone_name, "resolution": resolution,
        "name": cfg.name or _bundle_name(cfg.data),
        "optimizer": cfg.optimizer or ("sgd" if scratch else "adamw"),
        "lr": cfg.lr or (0.1 if scratch else 1e-3),
        "augment": augment_name,
        "tta_flip": cfg.tta_flip if cfg.tta_flip is not None else (scratch and augment.hflip),
        "epochs": cfg.epochs or (None if cfg.time_budget_s else (15 if scratch else 8)),
        # bfloat16 autocast speeds up dense convolutions (1.7x on the fast CNN) on CPUs with
        # native bf16 (AVX512-BF16/AMX) but slows the depthwise ones of EfficientNet down
        # (2x), so it is on for from-scratch only, and only where the CPU has it: emulated on
        # an AVX2-only CPU the fast CNN runs 20x slower (measured on an AMD EPYC, 2026-11-23).
        "bf16": cfg.bf16 if cfg.bf16 is not None else (scratch and cpu_has_native_bf16()),
        "threads": torch.get_num_threads(),
        "feature_blocks": feature_blocks,
    })
    layer = (f", features of its first {feature_blocks} blocks pooled to "
             f"{cfg.feature_grid}x{cfg.feature_grid}" if feature_blocks else "")
    notify(f"strategy: [bold]{choice.strategy}[/] with {backbone_name} at {resolution} px"
           f"{layer}, "
           f"{torch.get_num_threads()} torch thread(s): "
           f"{choice.reason}")

    # ---- model ----------------------------------------------------------------------------
    weights_file = Path(cfg.weights_path) if cfg.weights_path else (
        pretrained_weights_path(backbone_name) if pretrained else None)

    def make_model() -> ImageClassifier:
        torch.manual_seed(cfg.seed)
        in_ch = None if pretrained else full.channels
        backbone = create_backbone(backbone_name, pretrained=False, weights_path=weights_file,
                                   in_channels=in_ch)
        bspec = backbone.spec
        if scratch:  # a net trained from its initialisation learns the contract's statistics
            bspec = type(bspec)(**{**asdict(bspec), "mean": mean, "std": std})
        if cfg.feature_blocks:
            backbone = backbone.trunk(cfg.feature_blocks, cfg.feature_grid)
            bspec = type(bspec)(**{**asdict(bspec), "feature_dim": backbone.feature_dim})
        net = ImageClassifier(backbone, bspec, num_classes, input_channels=full.channels,
                              input_mean=mean, input_std=std, input_size=full.size,
                              resolution=resolution, dropout=cfg.dropout,
                              tta_flip=bool(cfg.tta_flip))
        return net.to(memory_format=torch.channels_last)

    model = make_model()
    inputs = _Inputs(mean, std)
    tr_u8, va_u8, te_u8 = _to_nchw_u8(train_ds), _to_nchw_u8(val_ds), _to_nchw_u8(test)
    tr_y, va_y, te_y = (torch.from_numpy(d.labels) for d in (train_ds, val_ds, test))
    balance = _resolve_balance(cfg, choice, make_model, augment, inputs, tr_u8, tr_y, va_u8,
                               va_y, full.class_names, run_dir, progress, notify)
    if balance.option == "generative":
        tr_u8, tr_y = _with_synthesis(cfg, tr_u8, tr_y, full.class_names, notify)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "balance": balance.option})
    if balance.option != "none" or balance.reason != "requested":
        notify(f"class balance: [bold]{balance.option}[/] ({balance.reason})")

    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {**cfg.to_dict(), "strategy_choice": choice.to_dict(),
                "balance_choice": balance.to_dict(),
                "preprocessing": pre.model_dump(mode="json"), "class_names": full.class_names,
                "augment_config": augment.to_dict()}
    _write_json(run_dir / "config.json", resolved)

    # ---- tracking -------------------------------------------------------------------------
    tracker: Tracker | None = None
    if cfg.track:
        tracker = Tracker(cfg.tracking_uri or default_tracking_uri(run_dir), run_dir,
                          run_name=f"{cfg.name}-{cfg.version}").__enter__()
        tracker.log_params({**{k: v for k, v in cfg.to_dict().items() if v is not None},
                            "chosen_strategy": choice.strategy, "case": choice.case,
                            "train_images": len(tr_y), "val_images": len(va_y),
                            "test_images": len(te_y)})
        tracker.set_tag("strategy_reason", choice.reason)
    try:
        history, paused, val_acc, extra = _fit(
            cfg, choice, model, augment, inputs, tr_u8, tr_y, va_u8, va_y,
            n_test=len(te_y), started=started, last_ckpt=last_ckpt, best_ckpt=best_ckpt,
            tracker=tracker, progress=progress, notify=notify)
        extra["balance"] = balance.to_dict()
        if paused:
            notify(f"paused after epoch {history[-1]['epoch']}; continue with --resume")
            return TrainResult(out, None, None, choice, {}, history,
                               tracker.run_id if tracker else None, paused=True,
                               warnings=warnings)
        chance = 1.0 / max(1, len(full.class_names))
        if val_acc <= 1.5 * chance:
            warnings.append(f"validation accuracy {val_acc:.1%} is near or below chance "
                            f"({chance:.1%}): this model has not learned the task (too "
                            "little training time?); do not ship it")
            notify(f"[bold red]warning:[/] {warnings[-1]}")
        result = _finish(cfg, choice, model, pre, full, test, inputs, te_u8, te_y, tr_y, va_y,
                         history, val_acc, extra, weights_file, warnings, started,
                         run_dir, bundle_dir, tracker, progress, notify)
    except BaseException:
        if tracker is not None:
            tracker.__exit__(*__import__("sys").exc_info())
        raise
    if tracker is not None:
        tracker.__exit__(None, None, None)
    if last_ckpt.is_file():
        last_ckpt.unlink()  # the run is complete; a rerun into DIR starts afresh
    return result


BALANCE_OPTIONS = ("none", "weights", "oversample", "generative", "auto")
_IMBALANCE_RATIO = 3.0  # auto leaves classes alone below this largest/smallest ratio
_TRIAL_VAL_PER_CLASS = 100
_SYNTHESIS_SHARE = 0.2  # of the time budget that generating rare-class images may take
_TRIAL_SHARE = 0.4  # of the time budget that auto's trials may spend, all together
# Generative samples are used only when they beat the best plain fix by this much
# (balanced validation accuracy): synthetic images often do not help, and cost trust.
_GENERATIVE_MARGIN = 0.005


@dataclass
class BalanceChoice:
    option: str
    reason: str
    trials: dict[str, float] = field(default_factory=dict)  # option -> balanced val accuracy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def balanced_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean per-class recall over the classes present."""
    pred = logits.argmax(1)
    recalls = [float((pred[labels == c] == c).float().mean())
               for c in range(num_classes) if int((labels == c).sum())]
    return sum(recalls) / max(1, len(recalls))


def class_weights(counts: torch.Tensor) -> torch.Tensor:
    """Loss weight per class for `--balance weights`: the square root of inverse frequency,
    scaled so the mean weight over the training images is 1.

    Full inverse frequency (100x at a 1:100 imbalance) made a from-scratch CNN memorise the few
    rare images and then predict the rare classes everywhere: balanced test accuracy fell from
    70% to 39% on Fashion-MNIST with three classes cut to 1% (bench/generative.py, 2026-11-23).
    """
    counts = counts.float().clamp(min=1)
    w = counts.rsqrt()
    return w * counts.sum() / (w * counts).sum()


def _check_generator(path: str | None, class_names: list[str], size, channels: int) -> Path:
    from .gen._augment import sample_images

    if not path:
        raise MLError("--balance generative needs --generator BUNDLE (a class-conditional VAE or "
                      "DDPM: `edgewise gen train --kind cvae` or `--kind ddpm`)")
    manifest = _validate_generator(Path(path))
    if list(manifest.labels) != list(class_names):
        raise MLError(f"the generator's classes {list(manifest.labels)} are not the data "
                      f"set's {list(class_names)}")
    probe = sample_images(path, label=class_names[0], n=1)
    if probe.shape[1:] != (channels, *size):
        raise MLError(f"the generator makes {tuple(probe.shape[1:])} images, the data set "
                      f"has {(channels, *size)}")
    return Path(path)


def _validate_generator(path: Path) -> BundleManifest:
    from edgewise.artifacts import BundleError, validate_bundle

    try:
        manifest = validate_bundle(path)
    except BundleError as exc:
        raise MLError(f"--generator {path}: {exc}") from None
    if manifest.generator is None or not manifest.generator.conditional:
        raise MLError(f"--generator {path}: {manifest.release_name} has no class-conditional "
                      "generator")
    return manifest


def _with_synthesis(cfg: TrainConfig, tr_u8: torch.Tensor, tr_y: torch.Tensor,
                    class_names: list[str], notify: NotifyFn):
    """The training set with generated images of every class below the median class size,
    up to it."""
    from .gen._augment import sample_images

    counts = torch.bincount(tr_y, minlength=len(class_names))
    target = int(counts.float().median())
    needs = {c: target - int(counts[c]) for c in range(len(class_names))
             if target > int(counts[c])}
    if not needs:
        return tr_u8, tr_y
    wanted = sum(needs.values())
    budget = cfg.time_budget_s or cfg.train_seconds
    if budget:  # a diffusion sampler costs ~25 ms an image: never let synthesis eat the run
        t0 = time.perf_counter()
        sample_images(cfg.generator, label=class_names[next(iter(needs))], n=16, seed=cfg.seed)
        fits = int(_SYNTHESIS_SHARE * budget / ((time.perf_counter() - t0) / 16))
        if fits < wanted:
            needs = {c: max(1, n * fits // wanted) for c, n in needs.items()}
    extra_x, extra_y, added = [], [], {}
    for c, need in needs.items():
        name = class_names[c]
        extra_x.append(torch.from_numpy(sample_images(cfg.generator, label=name, n=need,
                                                      seed=cfg.seed + c)))
        extra_y.append(torch.full((need,), c, dtype=tr_y.dtype))
        added[name] = need
    notify("generated training images: " + ", ".join(f"{k} +{v}" for k, v in added.items())
           + (f" ({sum(added.values())} of the {wanted} wanted: more would not fit in "
              f"{_SYNTHESIS_SHARE:.0%} of the time budget)" if sum(added.values()) < wanted
              else ""))
    return torch.cat([tr_u8, *extra_x]), torch.cat([tr_y, *extra_y])


def _resolve_balance(cfg: TrainConfig, choice: StrategyChoice, make_model, augment, inputs,
                     tr_u8, tr_y, va_u8, va_y, class_names: list[str], run_dir: Path,
                     progress: ProgressFn, notify: NotifyFn) -> BalanceChoice:
    """The class-imbalance fix to train with; `auto` measures the candidates (short runs,
    balanced validation accuracy) and says which it chose and why."""
    if cfg.balance not in BALANCE_OPTIONS:
        raise MLError(f"unknown --balance {cfg.balance!r} (one of {', '.join(BALANCE_OPTIONS)})")
    num_classes = len(class_names)
    if cfg.balance != "none" and choice.strategy == "feature-extract":
        if cfg.balance == "auto":
            return BalanceChoice("none", "feature-extract fits a regularised head on every "
                                 "embedding once; no trials")
        raise MLError("--balance needs a trained network (--strategy from-scratch or "
                      "fine-tune); feature-extract fits its head once")
    if cfg.balance == "generative" or (cfg.balance == "auto" and cfg.generator):
        _check_generator(cfg.generator, class_names, tuple(tr_u8.shape[2:]),
                         int(tr_u8.shape[1]))
    if cfg.balance != "auto":
        return BalanceChoice(cfg.balance, "requested")
    if cfg.resume:
        saved = json.loads((run_dir / "config.json").read_text())
        return BalanceChoice(**saved.get("balance_choice") or {"option": "none",
                                                                "reason": "resumed"})
    counts = torch.bincount(tr_y, minlength=num_classes)
    present = counts[counts > 0]
    ratio = float(present.max()) / float(present.min())
    if ratio < _IMBALANCE_RATIO:
        return BalanceChoice("none", f"classes are balanced enough (largest/smallest "
                             f"{ratio:.1f} < {_IMBALANCE_RATIO:g})")
    options = ["none", "weights", "oversample"] + (["generative"] if cfg.generator else [])
    trial = {"resume": False, "stop_after_epochs": None, "track": False}
    if cfg.time_budget_s:
        trial["time_budget_s"] = None
    else:
        trial["epochs"] = max(1, (cfg.epochs or 3) // 3)
    # The trials share a deadline: each gets an equal part of what is left, less the overhead
    # (model set-up, synthesis, validation) that the earlier trials measured beyond their
    # training seconds. Fixed shares overran by 80% on 2 cores (overhead is not training) and
    # left the final run 10 s, which shipped a model that predicted one class.
    deadline = time.perf_counter() + (cfg.time_budget_s or 0.0) * _TRIAL_SHARE
    overhead = 0.0
    # Trials are judged on at most _TRIAL_VAL_PER_CLASS validation images per class (rare
    # classes keep all theirs): balanced accuracy weighs classes equally anyway, and two full
    # validation passes (flip-averaged) cost a trial ~14 s of its ~18 s on 2 cores.
    gen = torch.Generator().manual_seed(cfg.seed)
    keep = torch.cat([idx[torch.randperm(len(idx), generator=gen)[:_TRIAL_VAL_PER_CLASS]]
                      for c in range(num_classes)
                      if len(idx := torch.nonzero(va_y == c).flatten())])
    keep = keep.sort().values
    va_u8, va_y = va_u8[keep], va_y[keep]
    scores: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="edgewise-balance-") as tmp:
        for i, option in enumerate(options):
            notify(f"class balance trial: {option}")
            t_trial = time.perf_counter()
            if cfg.time_budget_s:
                share = (deadline - t_trial) / (len(options) - i)
                trial["train_seconds"] = max(1.0, share - overhead)
            trial_cfg = TrainConfig.from_dict({**cfg.to_dict(), **trial, "balance": option})
            x, y = (_with_synthesis(trial_cfg, tr_u8, tr_y, class_names, _noop)
                    if option == "generative" else (tr_u8, tr_y))
            net = make_model()
            ckpt = Path(tmp) / option
            ckpt.mkdir()
            _fit(trial_cfg, choice, net, augment, inputs, x, y, va_u8, va_y, n_test=0,
                 started=time.perf_counter(), last_ckpt=ckpt / "last.pt",
                 best_ckpt=ckpt / "best.pt", tracker=None, progress=progress, notify=_noop)
            scores[option] = round(balanced_accuracy(
                _logits(net.float().eval(), va_u8, inputs), va_y, num_classes), 4)
            if cfg.time_budget_s:
                overhead = max(overhead, time.perf_counter() - t_trial
                               - trial["train_seconds"])
    plain = max((o for o in options if o != "generative"), key=lambda o: scores[o])
    best = plain
    if "generative" in scores and scores["generative"] >= scores[plain] + _GENERATIVE_MARGIN:
        best = "generative"
    listed = ", ".join(f"{o} {100 * v:.1f}%" for o, v in scores.items())
    reason = (f"largest/smallest class {ratio:.1f}x; balanced validation accuracy in short "
              f"runs: {listed}; chose {best}")
    if "generative" in scores and best != "generative":
        reason += (f" (generated images did not beat {plain} by "
                   f"{100 * _GENERATIVE_MARGIN:.1f} points)")
    return BalanceChoice(best, reason, scores)



def _fit(cfg: TrainConfig, choice: StrategyChoice, model: ImageClassifier,
         augment: AugmentConfig, inputs: _Inputs, tr_u8, tr_y, va_u8, va_y, *, n_test: int,
         started: float, last_ckpt: Path, best_ckpt: Path, tracker: Tracker | None,
         progress: ProgressFn, notify: NotifyFn):
    """Train in place; returns (history, paused, best val accuracy, extra metrics)."""
    num_classes = model.head.out_features
    if choice.strategy == "feature-extract":
        return _fit_feature_extract(cfg, model, inputs, tr_u8, tr_y, va_u8, va_y, num_classes,
                                    tracker, progress, notify=notify, started=started,
                                    n_test=n_test)

    # ---- optimiser and schedule ---------------------------------------------------------
    frozen: list[nn.Module] = []
    if choice.strategy == "fine-tune":
        frozen, bb_params, head_params = _trainable_split(model, cfg.trainable_blocks)
        groups = [{"params": head_params, "base_lr": cfg.lr},
                  {"params": bb_params, "base_lr": cfg.lr * cfg.backbone_lr_mult}]
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "base_lr": cfg.lr}]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=max(cfg.weight_decay, 1e-2))
    ema = _EMA(model, _EMA_DECAY) if cfg.ema else None
    n = len(tr_y)
    counts = torch.bincount(tr_y, minlength=num_classes).clamp(min=1).float()
    class_w = class_weights(counts) if cfg.balance == "weights" else None
    sample_w = (1.0 / counts)[tr_y] if cfg.balance == "oversample" else None
    batch = cfg.batch_size if n >= 16 * cfg.batch_size else \
        max(16, 2 ** int(math.log2(max(16, n // 16))))
    steps_per_epoch = max(1, n // batch)
    gen = torch.Generator().manual_seed(cfg.seed)

    # Frozen activations are cached when nothing random happens before them (no
    # augmentation): the frozen blocks then run once per image instead of once per epoch.
    cache = None
    if frozen and augment.is_identity:
        cache = _cache_frozen(model, frozen, inputs, tr_u8, va_u8, progress)
        notify(f"cached frozen activations: {tuple(cache[0].shape[1:])} per image")

    state = {"epoch": 0, "step": 0, "train_s": 0.0, "best_val": -1.0, "best_epoch": 0,
             "history": [], "train_budget_s": None}
    if cfg.resume:
        ck = torch.load(last_ckpt, map_location="cpu", weights_only=True)
        saved = json.loads(ck["config_json"])
        diff = [k for k in _RESUME_KEYS if saved.get(k) != cfg.to_dict().get(k)]
        if diff:
            raise MLError(f"cannot resume: the run was started with other settings ({diff})")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ema is not None and "ema" in ck:
            ema.module.load_state_dict(ck["ema"])
            ema.updates = int(ck["ema_updates"])
        gen.set_state(ck["gen_state"])
        state.update(json.loads(ck["state_json"]))
        notify(f"resumed after epoch {state['epoch']} ({state['train_s']:.0f} s trained)")

    total_steps = (cfg.epochs * steps_per_epoch) if cfg.epochs and not cfg.train_seconds \
        else None
    budget = cfg.time_budget_s
    train_budget = state["train_budget_s"] or cfg.train_seconds
    if budget and train_budget is None:
        # The schedule runs on the wall clock of the training loop (validation passes
        # included); what stays outside is the last validation, the test pass (float32, on
        # onnxruntime) and the export, estimated from a timed evaluation batch now.
        probe = va_u8[:128]
        judge = ema.module if ema else model
        _logits(judge, probe[:16], inputs, bf16=cfg.bf16)  # first call builds the kernels
        t_probe = time.perf_counter()
        _logits(judge, probe, inputs, bf16=cfg.bf16)
        per_image = (time.perf_counter() - t_probe) / len(probe)
        reserve_s = _RESERVE_FIXED_S + per_image * (len(va_y) + _ORT_TEST_COST * n_test)
        train_budget = budget - (time.perf_counter() - started) - reserve_s
        if train_budget <= 5:
            raise MLError(f"time budget {budget:.0f} s leaves no time to train (evaluation and "
                          f"export alone need about {reserve_s:.0f} s)")
        state["train_budget_s"] = train_budget
        notify(f"time budget {budget:.0f} s: {train_budget:.0f} s for training, "
               f"{reserve_s:.0f} s kept for the test pass and export")
    epoch_started = time.perf_counter()

    def frac() -> float:
        parts = []
        if total_steps:
            parts.append(state["step"] / total_steps)
        if train_budget:
            parts.append((state["train_s"] + time.perf_counter() - epoch_started) / train_budget)
        return max(parts)

    def forward(idx: torch.Tensor, *, train: bool) -> torch.Tensor:
        if cache is not None:
            feats = cache[0 if train else 1][idx].float()
            h = _effnet_tail(model.backbone, feats, cache[2])
            return model.head(model.dropout(h) if train else h)
        u8 = tr_u8[idx] if train else va_u8[idx]
        return model(inputs(u8, augment if train else None, gen))

    paused = False
    last_save = time.perf_counter()

    while frac() < 1.0:
        epoch = state["epoch"] + 1
        model.train()
        for m in frozen:
            m.eval()
        perm = (torch.multinomial(sample_w, n, replacement=True, generator=gen)
                if sample_w is not None else torch.randperm(n, generator=gen))
        t_epoch = epoch_started = time.perf_counter()
        loss_sum = correct = seen = 0
        stage = f"epoch {epoch}" + (f"/{cfg.epochs}" if cfg.epochs else "")
        for s in range(steps_per_epoch):
            f = frac()
            if f >= 1.0:
                break
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * _lr_factor(f)
            idx = perm[s * batch:(s + 1) * batch]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = forward(idx, train=True)
            loss = F.cross_entropy(logits.float(), tr_y[idx], weight=class_w,
                                   label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update(model)
            state["step"] += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == tr_y[idx]).sum())
            seen += len(idx)
            progress(stage, s + 1, steps_per_epoch)
            if budget:
                progress("time budget", min(time.perf_counter() - started, budget), budget)
        epoch_s = time.perf_counter() - t_epoch
        # ---- validate (the EMA weights when kept: they are what ships) ------------------
        # On the clock, the first half of the one-cycle schedule (high learning rate, weights
        # far from their best) is validated every other epoch: a flip-averaged pass over the
        # validation split costs about a tenth of a fast-CNN epoch. The second half, the last
        # epoch and an epoch before a pause are always validated.
        f_end = frac()
        judged = ema.module if ema is not None else model
        if train_budget and f_end < _VALIDATE_ALL_FROM and epoch % 2 and not (
                cfg.stop_after_epochs and epoch >= cfg.stop_after_epochs):
            va_logits = None
        elif cache is not None:
            with torch.inference_mode():
                judged.eval()
                va_logits = torch.cat([
                    judged.head(_effnet_tail(judged.backbone,
                                             cache[1][i:i + _EVAL_BATCH].float(), cache[2]))
                    for i in range(0, len(va_y), _EVAL_BATCH)])
        else:
            va_logits = _logits(judged, va_u8, inputs, bf16=cfg.bf16)
        val_loss = val_acc = None
        if va_logits is not None:
            val_loss = float(F.cross_entropy(va_logits, va_y))
            val_acc = float((va_logits.argmax(1) == va_y).float().mean())
        state["train_s"] += time.perf_counter() - epoch_started
        epoch_started = time.perf_counter()
        state["epoch"] = epoch
        row = {"epoch": epoch, "train_loss": loss_sum / max(1, seen),
               "train_accuracy": correct / max(1, seen), "val_loss": val_loss,
               "val_accuracy": val_acc, "lr": opt.param_groups[0]["lr"], "epoch_s": epoch_s,
               "images_per_s": seen / max(epoch_s, 1e-9)}
        state["history"].append(row)
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch" and v is not None},
                                step=epoch)
        val_txt = "not validated" if val_acc is None else f"val acc {val_acc:.4f}"
        notify(f"epoch {epoch}: train loss {row['train_loss']:.3f} acc "
               f"{row['train_accuracy']:.3f}, {val_txt}, "
               f"{row['images_per_s']:.0f} img/s, {epoch_s:.0f} s")
        if val_acc is not None and val_acc > state["best_val"]:
            state["best_val"], state["best_epoch"] = val_acc, epoch
            _save_atomic({"model": judged.state_dict(), "epoch": epoch,
                          "val_accuracy": val_acc}, best_ckpt)
        done = frac() >= 1.0
        if cfg.stop_after_epochs and epoch >= cfg.stop_after_epochs and not done:
            paused = True
        if paused or done or time.perf_counter() - last_save > _CHECKPOINT_EVERY_S:
            ck = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                  "gen_state": gen.get_state(), "config_json": json.dumps(cfg.to_dict()),
                  "state_json": json.dumps(state)}
            if ema is not None:
                ck["ema"], ck["ema_updates"] = ema.module.state_dict(), ema.updates
            _save_atomic(ck, last_ckpt)
            last_save = time.perf_counter()
        if paused:
            break
    # The shipped weights: the best validation epoch.
    best = torch.load(best_ckpt, map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    extra = {"epochs": state["epoch"], "best_epoch": state["best_epoch"],
             "train_s": round(state["train_s"], 1), "batch_size": batch}
    return state["history"], paused, state["best_val"], extra


def _effnet_tail(bb: nn.Module, x: torch.Tensor, n_frozen: int) -> torch.Tensor:
    """The trainable part of an EfficientNet-Lite after its first `n_frozen` blocks."""
    for block in list(bb._blocks)[n_frozen:]:
        x = block(x)
    return F.relu6(bb._bn1(bb._conv_head(x))).mean(dim=(2, 3))


def _cache_frozen(model: ImageClassifier, frozen: list[nn.Module], inputs: _Inputs, tr_u8,
                  va_u8, progress: ProgressFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    """bfloat16 activations of the frozen stem + blocks for train and val, and their count."""
    bb = model.backbone
    n_frozen = len(frozen) - 2  # stem conv + bn, then the frozen MBConv blocks

    @torch.inference_mode()
    def run(u8: torch.Tensor, stage: str) -> torch.Tensor:
        out = []
        for i in range(0, len(u8), _EVAL_BATCH):
            x = model.adapt(inputs(u8[i:i + _EVAL_BATCH]))
            x = F.relu6(bb._bn0(bb._conv_stem(x)))
            for block in list(bb._blocks)[:n_frozen]:
                x = block(x)
            out.append(x.to(torch.bfloat16))
            progress(stage, min(i + _EVAL_BATCH, len(u8)), len(u8))
        return torch.cat(out)

    model.eval()
    return run(tr_u8, "cache train activations"), run(va_u8, "cache val activations"), n_frozen


def _budgeted_subset(cfg, model: ImageClassifier, inputs: _Inputs, tr_u8, tr_y, n_val: int,
                     n_test: int, num_classes: int, started: float, notify: NotifyFn):
    """Under a time budget, the training images the backbone can embed in time (stratified,
    seeded), after keeping time for the validation embedding, the head fit, the test pass and
    the export; all of them when they fit."""
    budget = cfg.time_budget_s
    n = len(tr_y)
    if not budget:
        return tr_u8, tr_y
    with torch.inference_mode():
        model.features(inputs(tr_u8[:8]))  # the first call builds the kernels
        t = time.perf_counter()
        model.features(inputs(tr_u8[:64]))
        per_image = (time.perf_counter() - t) / min(64, n)
    reserve_s = 25.0 + per_image * (n_val + 3.0 * n_test)
    fits = int((budget - (time.perf_counter() - started) - reserve_s) / per_image)
    if fits >= n:
        return tr_u8, tr_y
    if fits < 5 * num_classes:
        raise MLError(f"time budget {budget:.0f} s leaves no time to embed training images "
                      f"(validation, test and export alone need about {reserve_s:.0f} s)")
    gen = torch.Generator().manual_seed(cfg.seed)
    keep = []
    for c in range(num_classes):
        idx = torch.nonzero(tr_y == c).flatten()
        take = max(1, round(fits * len(idx) / n))
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:take]])
    keep = torch.sort(torch.cat(keep)).values
    notify(f"time budget {budget:.0f} s: embedding {len(keep)} of {n} training images "
           f"({per_image * 1000:.1f} ms each), {reserve_s:.0f} s kept for validation, test "
           "and export")
    return tr_u8[keep], tr_y[keep]


def _fit_feature_extract(cfg, model: ImageClassifier, inputs: _Inputs, tr_u8, tr_y, va_u8, va_y,
                         num_classes: int, tracker: Tracker | None, progress: ProgressFn, *,
                         notify: NotifyFn, started: float, n_test: int):
    """Frozen backbone: embed every image once, fit the head on the cached embeddings."""
    t0 = time.perf_counter()
    model.eval()
    model.tta_flip = False  # the head is fit on unflipped embeddings
    tr_u8, tr_y = _budgeted_subset(cfg, model, inputs, tr_u8, tr_y, len(va_y), n_test,
                                   num_classes, started, notify)
    with torch.inference_mode():
        def embed(u8: torch.Tensor, stage: str) -> torch.Tensor:
            feats = []
            for i in range(0, len(u8), _EVAL_BATCH):
                feats.append(model.features(inputs(u8[i:i + _EVAL_BATCH])))
                progress(stage, min(i + _EVAL_BATCH, len(u8)), len(u8))
            return torch.cat(feats)

        tr_x, va_x = embed(tr_u8, "embed train"), embed(va_u8, "embed val")
    head, val_acc, l2 = _train_head(tr_x, tr_y, va_x, va_y, num_classes=num_classes,
                                    progress=progress)
    model.head = head
    with torch.no_grad():
        tr_logits, va_logits = head(tr_x), head(va_x)
    row = {"epoch": 1, "train_loss": float(F.cross_entropy(tr_logits, tr_y)),
           "train_accuracy": float((tr_logits.argmax(1) == tr_y).float().mean()),
           "val_loss": float(F.cross_entropy(va_logits, va_y)), "val_accuracy": val_acc,
           "lr": 0.0, "epoch_s": time.perf_counter() - t0,
           "images_per_s": len(tr_y) / max(time.perf_counter() - t0, 1e-9)}
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=1)
    return [row], False, val_acc, {"epochs": 1, "best_epoch": 1, "head_l2": l2,
                                   "train_s": round(row["epoch_s"], 1),
                                   "train_images_used": len(tr_y)}


def _torch_spec(model: ImageClassifier, cfg: TrainConfig, input_size: tuple[int, int]) -> dict:
    """How `edgewise compress` rebuilds this model in torch (pruning, distillation): the
    architecture, its constructor's arguments and the weights file shipped beside the ONNX."""
    flat = lambda t: [float(v) for v in t.flatten()]  # noqa: E731
    return {"arch": "image-classifier", "weights": WEIGHTS_FILE, "config": {
        "backbone": cfg.backbone, "num_classes": model.head.out_features,
        "input_channels": model.in_channels, "input_mean": flat(model.in_mean),
        "input_std": flat(model.in_std), "input_size": [int(v) for v in input_size],
        "resolution": model.resolution, "tta_flip": bool(model.tta_flip),
        "backbone_in_channels": model.out_channels, "backbone_mean": flat(model.bb_mean),
        "backbone_std": flat(model.bb_std),
        **({"feature_blocks": cfg.feature_blocks, "feature_grid": cfg.feature_grid}
           if cfg.feature_blocks else {})}}


def _finish(cfg: TrainConfig, choice: StrategyChoice, model: ImageClassifier, pre: Preprocessing,
            full: ImageDataset, test: ImageDataset, inputs: _Inputs, te_u8, te_y, tr_y, va_y,
            history, val_acc: float, extra: dict, weights_file: Path | None,
            warnings: list[str], started: float, run_dir: Path, bundle_dir: Path,
            tracker: Tracker | None, progress: ProgressFn, notify: NotifyFn) -> TrainResult:
    import onnxruntime

    model = model.float().eval().to(memory_format=torch.contiguous_format)
    num_classes = len(full.class_names)
    # ---- test with torch, export, parity, test again with onnxruntime (what ships) --------
    # The test split is scored once, by onnxruntime on the exported graph: the figure in the
    # bundle is what devices get. torch and onnxruntime agree on a batch first.
    te_x = inputs(te_u8).contiguous().numpy()
    golden_inputs = te_x[:GOLDEN_COUNT]
    with tempfile.TemporaryDirectory(prefix="edgewise-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        progress("export", 0, 3)
        export_onnx(model, torch.from_numpy(golden_inputs[:2]), path)
        progress("export", 1, 3)
        parity = _check_parity(model, path, te_x[:32])
        progress("export", 2, 3)
        session = _ort_session(path, threads=torch.get_num_threads())
        ort_logits = np.concatenate([_ort_run(session, te_x[i:i + 2000])
                                     for i in range(0, len(te_x), 2000)
                                     if progress("test (onnxruntime)", i, len(te_x)) or True])
        progress("test (onnxruntime)", len(te_x), len(te_x))
        golden_outputs = ort_logits[:GOLDEN_COUNT]
        p95_ms = _p95_latency_ms(path, golden_inputs[:1])
        model_bytes = path.read_bytes()
        progress("export", 3, 3)
    preds = ort_logits.argmax(1)
    test_acc = float((preds == te_y.numpy()).mean())
    cm = confusion_matrix(te_y.numpy(), preds, num_classes)
    per_class = {n: float(cm[i, i] / max(1, cm[i].sum())) for i, n in enumerate(full.class_names)}

    # ---- plots, card, bundle -------------------------------------------------------------
    wall_s = time.perf_counter() - started
    n_train = extra.get("train_images_used", len(tr_y))  # a time budget may embed fewer
    metrics = {"test_accuracy": round(test_acc, 4),
               "val_accuracy": round(val_acc, 4), "train_images": n_train,
               "val_images": len(va_y), "test_images": len(te_y),
               "p95_latency_ms": round(p95_ms, 2), "onnx_torch_max_diff": parity,
               "wall_s": round(wall_s, 1), "resolution": cfg.resolution, **extra}
    with tempfile.TemporaryDirectory(prefix="edgewise-report-") as tmp:
        curves, conf = Path(tmp) / "learning_curves.png", Path(tmp) / "confusion_matrix.png"
        plot_curves(history, curves)
        plot_confusion(cm, full.class_names, conf)
        weights_sha = file_sha256(weights_file)[0] if weights_file else None
        origin = f"pretrained: {weights_file.name}" if weights_file else "from scratch"
        bal = extra.get("balance") or {"option": "none", "reason": "requested"}
        recipe = {"strategy": f"{choice.strategy} ({choice.reason})",
                  "class balance": f"{bal['option']} ({bal['reason']})",
                  "backbone": f"{cfg.backbone} ({origin})",
                  "input resolution": f"{cfg.resolution} px", "augmentation": cfg.augment,
                  "optimizer": f"{cfg.optimizer}, peak LR {cfg.lr}, one-cycle, weight decay "
                               f"{cfg.weight_decay}, label smoothing {cfg.label_smoothing}",
                  "EMA of weights": cfg.ema, "test-time flip averaging (in the graph)":
                  cfg.tta_flip, "epochs": extra.get("epochs"),
                  "time budget": f"{cfg.time_budget_s:.0f} s" if cfg.time_budget_s else "none",
                  "export": f"ONNX opset {OPSET}, torch {torch.__version__}, checked with "
                            f"onnxruntime {onnxruntime.__version__}"}
        if choice.strategy == "feature-extract":
            for key in ("optimizer", "EMA of weights", "test-time flip averaging (in the graph)",
                        "augmentation", "epochs"):
                recipe.pop(key, None)
            recipe["head"] = (f"L2-regularised logistic regression (L-BFGS) on cached "
                              f"embeddings, L2 {extra.get('head_l2')} chosen on the validation "
                              "split, refit on training + validation")
        data = {"source": full.source, "image_size": full.size,
                "channels_txt": "grayscale" if full.channels == 1 else "RGB",
                "train_images": n_train, "val_images": len(va_y), "test_images": len(te_y),
                "test_source": test.source}
        card = model_card(name=cfg.name, version=cfg.version, class_names=full.class_names,
                          data=data, recipe=recipe, metrics=metrics, per_class=per_class,
                          warnings=warnings)
        provenance = {"recipe": "edgewise.ml.train", "strategy": choice.strategy,
                      "balance": bal["option"], "balance_trials": bal.get("trials") or {},
                      "strategy_case": choice.case, "strategy_reason": choice.reason,
                      "backbone": cfg.backbone,
                      "backbone_weights_file": weights_file.name if weights_file else None,
                      "backbone_weights_sha256": weights_sha, "dataset": cfg.data,
                      "seed": cfg.seed, "torch_version": torch.__version__,
                      "onnxruntime_version": onnxruntime.__version__, "onnx_opset": OPSET,
                      "python_version": platform.python_version(),
                      "torch_threads": torch.get_num_threads(),
                      "mlflow_run_id": tracker.run_id if tracker else None}
        config_bytes = (run_dir / "config.json").read_bytes()
        progress("write bundle", 0, 1)
        if bundle_dir.exists():
            import shutil

            shutil.rmtree(bundle_dir)
        manifest = write_bundle(
            bundle_dir, name=cfg.name, version=cfg.version, labels=full.class_names,
            preprocessing=pre, model=model_bytes, golden_inputs=golden_inputs,
            golden_outputs=golden_outputs, atol=GOLDEN_ATOL,
            max_latency_ms=max(250.0, 10.0 * p95_ms),
            extra_files={"MODEL_CARD.md": card.encode(), "learning_curves.png": curves,
                         "confusion_matrix.png": conf, "train_config.json": config_bytes,
                         WEIGHTS_FILE: weights_bytes(model)},
            metrics=metrics,
            provenance={**provenance, TORCH_KEY: _torch_spec(model, cfg, full.size)})
        progress("write bundle", 1, 1)
    summary = {"metrics": metrics, "strategy": choice.to_dict(), "bundle": str(bundle_dir),
               "history": history, "warnings": warnings,
               "mlflow_run_id": tracker.run_id if tracker else None,
               "tracking_uri": tracker.uri if tracker else None}
    _write_json(run_dir / "summary.json", summary)
    if tracker is not None:
        tracker.log_metrics({"test_accuracy": test_acc,
                             "p95_latency_ms": p95_ms, "wall_s": wall_s},
                            step=extra.get("epochs", 1))
        tracker.log_artifact(bundle_dir, "bundle")
        tracker.log_artifact(run_dir / "config.json")
        tracker.log_artifact(run_dir / "summary.json")
    return TrainResult(run_dir.parent, bundle_dir, manifest, choice, metrics, history,
                       tracker.run_id if tracker else None, warnings=warnings)
