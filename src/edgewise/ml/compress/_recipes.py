"""The registered recipes: fp16, int8 dynamic, int8 static (QDQ), structured pruning, distillation.

Invariant: every recipe writes one ONNX file into its own directory under `ctx.work_dir` that
takes the source bundle's input contract and returns logits of the same classes; recipes that
train (prune, distill) also return the torch weights and the config that rebuild the result.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgewise.artifacts import BundleManifest

from ._cpu import CpuInfo
from ._errors import CompressError, NotApplicableError
from ._registry import register_recipe

__all__ = ["Candidate", "CompressContext"]

ProgressFn = Callable[[str, int, int], None]


def _noop(stage: str, done: int, total: int) -> None:
    pass


@dataclass
class CompressContext:
    """Everything a recipe may use; built once per `compress` run and passed in."""

    bundle_dir: Path
    manifest: BundleManifest
    work_dir: Path
    calib_inputs: np.ndarray  # preprocessed training images for calibration
    train_inputs: np.ndarray  # preprocessed training images for fine-tuning / distillation
    train_labels: np.ndarray
    cpu: CpuInfo
    seed: int = 0
    progress: ProgressFn = _noop
    max_drop_pt: float = 1.0  # the guard's limit, for recipes that can retry to stay within it
    # Object detectors: mAP@0.5 of a graph on the calibration side's images (never the test
    # images), for recipes that retry to stay within the guard.
    check_map50: Callable[[Path], float] | None = None
    _teacher: np.ndarray | None = field(default=None, repr=False)
    _torch: Any = field(default=None, repr=False)

    @property
    def source_model(self) -> Path:
        return self.bundle_dir / self.manifest.model

    @property
    def input_name(self) -> str:
        return self.manifest.preprocessing.input_name

    def teacher_logits(self) -> np.ndarray:
        """The fp32 bundle's logits on the training inputs, run with onnxruntime (cached)."""
        if self._teacher is None:
            from ._measure import ort_session, run_batched

            session = ort_session(self.source_model, threads=None)
            self._teacher = run_batched(session, self.train_inputs, progress=self.progress,
                                        stage="teacher logits")
        return self._teacher

    def torch_model(self):
        """A fresh copy of the bundle's torch model (see `_torch_source`); cached load."""
        if self._torch is None:
            from ._torch_source import load_torch_model

            self._torch = load_torch_model(self.bundle_dir, self.manifest)
        return copy.deepcopy(self._torch)

    def out_dir(self, name: str) -> Path:
        d = self.work_dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d


@dataclass
class Candidate:
    model_path: Path
    notes: list[str] = field(default_factory=list)
    params: int | None = None
    torch_arch: str | None = None
    torch_config: dict[str, Any] | None = None
    torch_weights: bytes | None = None
    quantized: bool = False
    build_s: float = 0.0


# ---- ONNX-level recipes ------------------------------------------------------------------------

def _pre_process(ctx: CompressContext, out: Path) -> Path:
    """onnxruntime's `quant_pre_process`: shape inference + graph optimisation before quantizing.

    Without it the quantizer sees unfused Conv/BatchNorm/Clip patterns and inserts QDQ pairs
    that onnxruntime cannot fuse into integer kernels, which is how int8 ends up slower.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = out / "pre.onnx"
    try:
        quant_pre_process(str(ctx.source_model), str(path), skip_symbolic_shape=True)
    except Exception as exc:  # onnx/onnxruntime raise many types here
        raise CompressError(f"quant_pre_process failed: {exc}") from exc
    return path


@register_recipe("fp16", description="weights and activations in float16 (inputs/outputs fp32)")
def _fp16(ctx: CompressContext) -> Candidate:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out = ctx.out_dir("fp16") / "model.onnx"
    model = convert_float_to_float16(onnx.load(str(ctx.source_model)), keep_io_types=True)
    onnx.save(model, str(out))
    return Candidate(out, notes=["onnxruntime's CPU provider has few fp16 kernels: expect Casts"])


@register_recipe("int8-dynamic", description="int8 weights, activations quantized at run time")
def _int8_dynamic(ctx: CompressContext, per_channel: bool = False) -> Candidate:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    d = ctx.out_dir("int8-dynamic")
    pre = _pre_process(ctx, d)
    out = d / "model.onnx"
    try:
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8,
                         per_channel=per_channel)
    except Exception as exc:
        raise CompressError(f"dynamic quantization failed: {exc}") from exc
    pre.unlink()
    _compact(out)
    return Candidate(out, quantized=True)


class _Reader:
    """Calibration data for the quantizer, one image per batch."""

    def __init__(self, name: str, inputs: np.ndarray) -> None:
        self._it = iter([{name: inputs[i:i + 1]} for i in range(len(inputs))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - part of the reader protocol
        raise CompressError("calibration data can be read once")


def _depthwise_convs(model_path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(model_path)).graph.node if n.op_type == "Conv"
            and any(a.name == "group" and a.i > 1 for a in n.attribute)]


def _compact(path: Path) -> None:
    """Drop all-zero zero points (an optional input) and shorten tensor names.

    The quantizer stores an explicit zero point for every symmetric int8 weight and int32 bias
    and long generated names; on a small network that is several percent of the file.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if (node.op_type == "DequantizeLinear" and len(node.input) == 3
                and node.input[2] in inits):
            zp = numpy_helper.to_array(inits[node.input[2]])
            if zp.dtype in (np.int8, np.int32) and not zp.any():
                del node.input[2]
    used = {x for n in graph.node for x in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in graph.node for a in n.attribute):
        onnx.save(model, str(path))  # subgraphs refer to outer names: keep them all
        return
    fixed = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in fixed:
            return name
        return names.setdefault(name, format(len(names), "x"))

    for t in graph.initializer:
        t.name = short(t.name)
    for node in graph.node:
        node.name = ""
        for i, x in enumerate(node.input):
            node.input[i] = short(x)
        for i, x in enumerate(node.output):
            node.output[i] = short(x)
    del graph.value_info[:]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _quantize_static(ctx: CompressContext, pre: Path, out: Path, *, activation: str,
                     per_channel: bool, exclude_depthwise: bool, calib: np.ndarray,
                     method: str) -> str:
    """One static QDQ quantization of `pre` into `out`; returns a one-line description."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}.get(activation)
    if act is None:
        raise CompressError(f"activation must be auto, uint8 or int8, not {activation!r}")
    calib_method = {"minmax": CalibrationMethod.MinMax,
                    "percentile": CalibrationMethod.Percentile,
                    "entropy": CalibrationMethod.Entropy}.get(method)
    if calib_method is None:
        raise CompressError(f"unknown calibration method {method!r}")
    # Without a VNNI-class instruction, u8s8 products can saturate the 16-bit intermediate
    # (VPMADDUBSW); onnxruntime's remedy is 7-bit weights.
    reduce_range = ctx.cpu.is_x86 and not ctx.cpu.int8_dot and act == QuantType.QUInt8
    excluded = _depthwise_convs(pre) if exclude_depthwise else []
    try:
        # The calibrators print() progress; stdout must stay clean for --json output.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(pre), str(out), _Reader(ctx.input_name, calib),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=act, weight_type=QuantType.QInt8,
                            reduce_range=reduce_range, nodes_to_exclude=excluded,
                            calibrate_method=calib_method)
    except Exception as exc:
        raise CompressError(f"static quantization failed: {exc}") from exc
    _compact(out)
    granularity = "per-channel" if per_channel else "per-tensor"
    return (f"activations {activation}, weights int8 {granularity}"
            f"{', 7-bit (reduce_range)' if reduce_range else ''}, {method} calibration on "
            f"{len(calib)} training images"
            + (f", {len(excluded)} depthwise convs kept in fp32" if excluded else ""))


@register_recipe("int8-static",
                 description="int8 QDQ, per-channel weights, activations calibrated on training "
                             "images after quant_pre_process; falls back if accuracy drops")
def _int8_static(ctx: CompressContext, activation: str = "auto", per_channel: bool = True,
                 exclude_depthwise: bool = False, calibration_images: int = 256,
                 method: str = "minmax", fallback: bool = True,
                 check_images: int = 500) -> Candidate:
    """Quantize; if the result loses more than the allowed accuracy on held-out *training*
    images (the test split stays untouched), retry with depthwise convs in fp32, then with
    percentile calibration, and keep the first that holds (else the most accurate)."""
    from ._measure import accuracy

    if activation == "auto":
        # x86 integer kernels multiply unsigned activations by signed weights (u8s8, what
        # VPDPBUSD/VPMADDUBSW take); Arm's SDOT wants s8s8.
        activation = "uint8" if ctx.cpu.is_x86 else "int8"
    d = ctx.out_dir("int8-static")
    pre = _pre_process(ctx, d)
    calib = ctx.calib_inputs[:calibration_images]
    attempts = [(exclude_depthwise, method)]
    if fallback:
        attempts += [a for a in ((True, method), (exclude_depthwise, "percentile"))
                     if a not in attempts]
    check_x = ctx.train_inputs[:check_images]
    check_y = ctx.train_labels[:check_images]
    base_acc = accuracy(ctx.source_model, check_x, check_y)[0] if fallback else 0.0
    tried: list[tuple[float, Path, str]] = []
    descs: dict[Path, str] = {}
    for i, (exclude, meth) in enumerate(attempts):
        out = d / f"attempt{i}.onnx"
        desc = _quantize_static(ctx, pre, out, activation=activation, per_channel=per_channel,
                                exclude_depthwise=exclude, calib=calib, method=meth)
        if not fallback:
            tried.append((0.0, out, meth))
            descs[out] = desc
            break
        drop = 100 * (base_acc - accuracy(out, check_x, check_y)[0])
        tried.append((drop, out, f"{meth}{' + depthwise fp32' if exclude else ''}"))
        descs[out] = desc
        if drop <= ctx.max_drop_pt:
            break
    drop, best, label = min(tried, key=lambda t: t[0])
    final = d / "model.onnx"
    best.replace(final)
    pre.unlink()
    notes = [descs[best]]
    if fallback:
        notes.append(f"accuracy check on {len(check_y)} held-out training images: "
                     + "; ".join(f"{t[2]}: drop {t[0]:.2f} pt" for t in tried)
                     + (f"; kept {label}" if len(tried) > 1 else ""))
    return Candidate(final, notes=notes, quantized=True)


# ---- torch recipes -----------------------------------------------------------------------------

def _recalibrate_bn(model, inputs: np.ndarray, batch: int = 64, limit: int = 1024) -> None:
    """Re-estimate BatchNorm statistics after channels were removed (no gradient step)."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for i in range(0, min(limit, len(inputs)), batch):
            model(torch.from_numpy(inputs[i:i + batch]))
    model.eval()


def _train_kd(model, inputs: np.ndarray, labels: np.ndarray, teacher: np.ndarray, *,
              epochs: float, batch: int, lr: float, temperature: float, alpha: float,
              seed: int, train_bn: bool, progress: ProgressFn, stage: str) -> float:
    """Knowledge distillation: alpha * T^2 KL(teacher_T || student_T) + (1 - alpha) * CE."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    steps = max(1, math.ceil(epochs * len(inputs) / batch))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.15)
    # channels_last roughly halves depthwise-conv time on CPU; the exporter reverts it.
    model.to(memory_format=torch.channels_last)
    x_all, y_all = torch.from_numpy(inputs), torch.from_numpy(labels)
    t_all = torch.from_numpy(teacher)
    order = np.concatenate([rng.permutation(len(inputs))
                            for _ in range(math.ceil(epochs) + 1)])
    loss_v = 0.0
    for step in range(steps):
        model.train(train_bn)
        idx = torch.from_numpy(order[step * batch:(step + 1) * batch])
        x, y, t = x_all[idx].contiguous(memory_format=torch.channels_last), y_all[idx], t_all[idx]
        out = model(x)
        kd = F.kl_div(F.log_softmax(out / temperature, 1), F.log_softmax(t / temperature, 1),
                      reduction="batchmean", log_target=True) * temperature ** 2
        loss = alpha * kd + (1 - alpha) * F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        progress(stage, step + 1, steps)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return loss_v


def _export(ctx: CompressContext, model, name: str) -> Path:
    import torch

    from ..quick import export_onnx

    out = ctx.out_dir(name) / "model.onnx"
    example = torch.from_numpy(ctx.calib_inputs[:2])
    export_onnx(model, example, out, input_name=ctx.input_name)
    return out


@register_recipe("prune", needs_torch=True,
                 description="structured channel pruning (channels removed), BatchNorm "
                             "re-estimated, brief fine-tune distilled from the fp32 model")
def _prune(ctx: CompressContext, keep: float = 0.5, epochs: float = 1.0, batch: int = 64,
           lr: float = 5e-4, temperature: float = 2.0, alpha: float = 0.7) -> Candidate:
    from ._archs import count_params, prune_arch
    from ._torch_source import weights_bytes

    started = time.perf_counter()
    source = ctx.torch_model()
    before = count_params(source.module)
    model, config = prune_arch(source.arch, source.module, source.config, keep)
    after = count_params(model)
    _recalibrate_bn(model, ctx.train_inputs)
    teacher = ctx.teacher_logits()
    loss = _train_kd(model, ctx.train_inputs, ctx.train_labels, teacher, epochs=epochs,
                     batch=batch, lr=lr, temperature=temperature, alpha=alpha, seed=ctx.seed,
                     train_bn=False, progress=ctx.progress, stage="prune fine-tune")
    path = _export(ctx, model, "prune")
    return Candidate(path, params=after, torch_arch=source.arch, torch_config=config,
                     torch_weights=weights_bytes(model), build_s=time.perf_counter() - started,
                     notes=[f"torch weights: {source.source}",
                            f"params {before:,} -> {after:,} (keep {keep:.0%} of prunable "
                            "channels)",
                            f"fine-tuned {epochs:g} epoch(s) on {len(ctx.train_inputs)} training "
                            f"images, final loss {loss:.3f}"])


@register_recipe("distill",
                 description="a small CNN student trained on the fp32 model's soft labels "
                             "(teacher run with onnxruntime: works on any bundle)")
def _distill(ctx: CompressContext, widths: tuple[int, ...] = (16, 32, 64), epochs: float = 6.0,
             batch: int = 128, lr: float = 3e-3, temperature: float = 4.0,
             alpha: float = 0.7) -> Candidate:
    import torch

    from ._archs import CNNClassifier, count_params
    from ._torch_source import weights_bytes

    started = time.perf_counter()
    torch.manual_seed(ctx.seed)
    pre = ctx.manifest.preprocessing
    if pre.layout != "NCHW":
        raise NotApplicableError("the CNN student takes NCHW input")
    config = {"in_channels": pre.channels, "widths": list(widths),
              "num_classes": len(ctx.manifest.labels)}
    model = CNNClassifier(pre.channels, tuple(widths), len(ctx.manifest.labels))
    teacher = ctx.teacher_logits()
    loss = _train_kd(model, ctx.train_inputs, ctx.train_labels, teacher, epochs=epochs,
                     batch=batch, lr=lr, temperature=temperature, alpha=alpha, seed=ctx.seed,
                     train_bn=True, progress=ctx.progress, stage="distill")
    path = _export(ctx, model, "distill")
    return Candidate(path, params=count_params(model), torch_arch="cnn-classifier",
                     torch_config=config, torch_weights=weights_bytes(model),
                     build_s=time.perf_counter() - started,
                     notes=[f"student cnn-classifier widths {list(widths)}, "
                            f"{count_params(model):,} params, {epochs:g} epochs on "
                            f"{len(ctx.train_inputs)} training images, T={temperature}, "
                            f"alpha={alpha}, final loss {loss:.3f}"])
