"""`compress` for object detector bundles: int8 and fp16 candidates judged by mAP.

A detector's graph is two parts: the network (backbone, feature pyramid, heads: convolutions
and their activations, residual adds, upsampling) and the post-processing (sigmoid, 3x3
peak max-pool, top-k, gathers, box arithmetic, the class-aware NMS). Only the network is
compressed; the post-processing stays float32 as exported, because its top-k, comparisons and
pixel arithmetic are where int8 or fp16 would change *which* boxes come out rather than how
precise they are. The network is found structurally: every node that is a convolution or
feeds one; everything else is post-processing.

Invariant: the candidates are measured exactly as the classifier's are (same process,
interleaved latency, peak RSS in a fresh process, one guard policy), with mAP@0.5 (guarded)
and mAP@0.5:0.95 (reported) from pycocotools on held-out images run through the bundle's
preprocessing contract; calibration images never overlap them. A written candidate is a
detector bundle whose golden boxes are its own graph's, with the source's detection spec, so
the device's health check judges the candidate on what it will really find.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgewise.artifacts import BundleManifest, file_sha256

from ..data import FASHION_MNIST_ROOT
from ..errors import MLError
from ._decide import BASELINE, CandidateFigures, assess
from ._errors import CompressError, NotApplicableError
from ._measure import measure_latency, peak_rss
from ._recipes import Candidate, CompressContext, _compact, _pre_process
from ._registry import create_recipe, list_recipes, register_recipe
from ._report import PARETO_PNG, REPORT_JSON, REPORT_MD, CompressReport, plot_pareto

__all__ = ["compress_detector", "head_outputs", "network_nodes"]


# ---- which nodes are the network ---------------------------------------------------------------

def _named(model) -> None:
    """Give every node a unique name (the quantizer and fp16 converter select by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def network_nodes(model) -> set[str]:
    """Names of the nodes that are convolutions or feed one (the network, not the
    post-processing)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    keep: set[str] = set()
    stack = [n for n in model.graph.node if n.op_type == "Conv"]
    while stack:
        node = stack.pop()
        if node.name in keep:
            continue
        keep.add(node.name)
        stack.extend(producer[x] for x in node.input if x in producer)
    return keep


def head_outputs(model, net: set[str]) -> set[str]:
    """The network's last convolutions: their outputs go only to post-processing."""
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node.name)
    return {n.name for n in model.graph.node if n.op_type == "Conv" and not any(
        c in net for out in n.output for c in consumers.get(out, []))}


def _load_named(path: Path, out: Path):
    import onnx

    model = onnx.load(str(path))
    _named(model)
    onnx.save(model, str(out))
    return model


# ---- recipes -----------------------------------------------------------------------------------

@register_recipe("fp16", task="detect",
                 description="network in float16; post-processing (peaks, top-k, NMS) and "
                             "inputs/outputs float32")
def _fp16(ctx: CompressContext) -> Candidate:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    d = ctx.out_dir("fp16")
    model = _load_named(ctx.source_model, d / "named.onnx")
    net = network_nodes(model)
    post = [n.name for n in model.graph.node if n.name not in net]
    try:
        half = convert_float_to_float16(model, keep_io_types=True, node_block_list=post)
    except Exception as exc:  # the converter raises bare Exceptions/ValueErrors
        raise CompressError(f"float16 conversion failed: {exc}") from exc
    out = d / "model.onnx"
    onnx.save(half, str(out))
    (d / "named.onnx").unlink()
    return Candidate(out, notes=[f"{len(net)} network nodes in float16, {len(post)} "
                                 "post-processing nodes kept float32; onnxruntime's CPU "
                                 "provider has few fp16 kernels: expect Casts"])


@register_recipe("int8-dynamic", task="detect",
                 description="network convolutions with int8 weights, activations quantized at "
                             "run time (ConvInteger); post-processing float32")
def _int8_dynamic(ctx: CompressContext, per_channel: bool = False) -> Candidate:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    d = ctx.out_dir("int8-dynamic")
    pre = _pre_process(ctx, d)
    net = network_nodes(_load_named(pre, pre))
    out = d / "model.onnx"
    try:
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8,
                         per_channel=per_channel, nodes_to_quantize=sorted(net))
    except Exception as exc:
        raise CompressError(f"dynamic quantization failed: {exc}") from exc
    pre.unlink()
    _compact(out)
    return Candidate(out, quantized=True,
                     notes=[f"int8 weights ({'per-channel' if per_channel else 'per-tensor'}) "
                            f"in {len(net)} network nodes; post-processing float32"])


class _Reader:
    def __init__(self, name: str, inputs: np.ndarray) -> None:
        self._it = iter([{name: inputs[i:i + 1]} for i in range(len(inputs))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - part of the reader protocol
        raise CompressError("calibration data can be read once")


@register_recipe("int8-static", task="detect",
                 description="int8 QDQ of the network (backbone, pyramid, heads), per-channel "
                             "weights, activations calibrated on images apart from the test "
                             "set (percentile, else min/max: the one that holds mAP on the "
                             "calibration images); post-processing float32")
def _int8_static(ctx: CompressContext, activation: str = "auto", per_channel: bool = True,
                 method: str = "percentile", calibration_images: int = 128,
                 exclude_depthwise: bool = False, float_heads: bool = True,
                 float_stem: bool = True, float_strided_depthwise: bool = False,
                 fallback: bool = True) -> Candidate:
    """Quantize; with `fallback`, if the result loses more than the allowed mAP@0.5 on the
    calibration images, retry with the other calibration method and keep the first that holds
    (else the better)."""
    from onnxruntime.quantization import QuantType

    if activation == "auto":
        activation = "uint8" if ctx.cpu.is_x86 else "int8"
    act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}.get(activation)
    if act is None:
        raise CompressError(f"activation must be auto, uint8 or int8, not {activation!r}")
    calib = ctx.calib_inputs[:calibration_images]
    if not len(calib):
        raise NotApplicableError("no calibration images")
    d = ctx.out_dir("int8-static")
    pre = _pre_process(ctx, d)
    model = _load_named(pre, pre)
    net = network_nodes(model)
    depthwise = {n.name for n in model.graph.node if n.op_type == "Conv" and any(
        a.name == "group" and a.i > 1 for a in n.attribute)}
    # The heads' last 1x1 convs are a sliver of the work, and their outputs (centre logits,
    # offsets, log sizes) are what post-processing turns into boxes: kept float, they are not
    # rounded to 256 levels before decoding.
    heads = head_outputs(model, net) if float_heads else set()
    # The stem (3 input channels) gains nothing from int8 kernels: ~7% of int8's p50 at 160 px.
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    image = model.graph.input[0].name
    stem = {n.name for n in convs if n.input[0] == image} if float_stem else set()
    strided = {n.name for n in convs if n.name in depthwise and any(
        a.name == "strides" and max(a.ints) > 1 for a in n.attribute)
        } if float_strided_depthwise else set()
    chosen = net - heads - stem - strided - (depthwise if exclude_depthwise else set())
    reduce_range = ctx.cpu.is_x86 and not ctx.cpu.int8_dot and act == QuantType.QUInt8

    methods = [method] + ([m for m in ("percentile", "minmax") if m != method]
                          if fallback and ctx.check_map50 is not None else [])
    base = ctx.check_map50(ctx.source_model) if len(methods) > 1 else None
    tried: list[tuple[float, Path, str]] = []
    for i, meth in enumerate(methods):
        out = d / f"attempt{i}.onnx"
        _quantize(ctx, pre, out, calib, act, per_channel, reduce_range, chosen, meth)
        if base is None:
            tried.append((0.0, out, meth))
            break
        tried.append((round(100 * (base - ctx.check_map50(out)), 2), out, meth))
        if tried[-1][0] <= ctx.max_drop_pt:
            break
    drop, best, kept = min(tried, key=lambda t: t[0])
    final = d / "model.onnx"
    best.replace(final)
    pre.unlink()
    notes = [
        f"{len(chosen)} network nodes int8 (QDQ; activations {activation}, weights int8 "
        f"{'per-channel' if per_channel else 'per-tensor'}"
        f"{', 7-bit (reduce_range)' if reduce_range else ''}), {kept} calibration on "
        f"{len(calib)} images"
        + (f", {len(depthwise)} depthwise convs kept float32" if exclude_depthwise else "")
        + (f", the {len(heads)} output convs of the heads float32" if heads else "")
        + (", the stem conv float32" if stem else "")
        + (f", {len(strided)} strided depthwise convs float32" if strided else "")
        + "; post-processing float32"]
    if base is not None:
        notes.append("mAP@0.5 check on the calibration images: "
                     + "; ".join(f"{m}: drop {t:.2f} pt" for t, _, m in tried)
                     + (f"; kept {kept}" if len(tried) > 1 else ""))
    return Candidate(final, quantized=True, notes=notes)


def _quantize(ctx: CompressContext, pre: Path, out: Path, calib: np.ndarray, act,
              per_channel: bool, reduce_range: bool, nodes: set[str], method: str) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calib_method = {"minmax": CalibrationMethod.MinMax,
                    "percentile": CalibrationMethod.Percentile,
                    "entropy": CalibrationMethod.Entropy}.get(method)
    if calib_method is None:
        raise CompressError(f"unknown calibration method {method!r}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print progress
            quantize_static(str(pre), str(out), _Reader(ctx.input_name, calib),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=act, weight_type=QuantType.QInt8,
                            reduce_range=reduce_range, nodes_to_quantize=sorted(nodes),
                            calibrate_method=calib_method)
    except Exception as exc:
        raise CompressError(f"static quantization failed: {exc}") from exc
    _compact(out)


# ---- data --------------------------------------------------------------------------------------

def _load_detection_data(manifest: BundleManifest, config) -> tuple[Any, Any, str]:
    """(calibration set, test set, description) at the bundle's input size; the two never
    share an image."""
    from ..detect import detection_split, load_detection_dataset, resize_dataset

    if Path(config.data_root) == FASHION_MNIST_ROOT:
        raise CompressError(f"{manifest.release_name} is an object detector: its candidates "
                            "are measured by mAP on a detection data set; pass --data DIR (a "
                            "COCO, YOLO or VOC folder of held-out images, e.g. from `edgewise "
                            "detect synth`)")
    side = manifest.preprocessing.input_size[0]
    data = load_detection_dataset(config.data_root)
    if config.calib_root is not None:
        calib = load_detection_dataset(config.calib_root)
        n_test = len(data) if config.test_images is None else min(config.test_images,
                                                                  len(data))
        test = data.subset(range(n_test))
        where = f"{len(test)} images of {config.data_root}; calibration from {config.calib_root}"
    else:
        if len(data) < 4:
            raise CompressError(f"{config.data_root}: {len(data)} images are too few to "
                                "split into calibration and test images")
        n_test = len(data) // 2 if config.test_images is None else min(config.test_images,
                                                                       len(data) // 2)
        calib_idx, test_idx = detection_split(data, n_test / len(data), config.seed)
        calib, test = data.subset(calib_idx), data.subset(test_idx)
        where = (f"{len(test)} images of {config.data_root} (a stratified split; the other "
                 f"{len(calib)} are calibration images)")
    calib = calib.subset(range(min(config.calib_images, len(calib))))
    return resize_dataset(calib, side), resize_dataset(test, side), where


def _golden_images(bundle_dir: Path, manifest: BundleManifest, test) -> list[np.ndarray]:
    """The source bundle's golden images (PNG), else the first test images."""
    from PIL import Image

    h, w = manifest.preprocessing.input_size
    images = []
    for rel in sorted(r for r in manifest.files if r.startswith("golden/")
                      and r.endswith(".png")):
        with Image.open(bundle_dir / rel) as im:
            image = np.asarray(im.convert("RGB"))
        if image.shape == (h, w, 3):
            images.append(image)
    return images or list(test.images[:32])


# ---- the run -----------------------------------------------------------------------------------

def _write_candidate(dest: Path, bundle_dir: Path, manifest: BundleManifest, name: str,
                     cand: Candidate, fig: CandidateFigures, cpu, options: dict[str, Any],
                     golden: list[np.ndarray]) -> None:
    from ..detect import write_detector_bundle

    spec = manifest.detection
    contract = json.loads((bundle_dir / spec.contract).read_text())
    extra: dict[str, Path | bytes] = {}
    card = bundle_dir / "MODEL_CARD.md"
    if card.is_file():
        extra["MODEL_CARD.md"] = (card.read_text() + f"\n## Compression\n{name}: "
                                  + "; ".join(cand.notes) + "\n").encode()
    if dest.exists():
        shutil.rmtree(dest)
    write_detector_bundle(
        dest, model=cand.model_path, contract=contract, images=golden, name=manifest.name,
        version=f"{manifest.version}+{_slug(name)}"[:64], min_score=spec.min_score,
        iou_threshold=spec.iou_threshold, min_recall=spec.min_recall,
        min_precision=spec.min_precision, extra_files=extra,
        metrics={"test_map50": round(fig.accuracy, 4),
                 "test_map50_95": None if fig.map50_95 is None else round(fig.map50_95, 4),
                 "map50_drop_pt": fig.accuracy_drop_pt, "size_ratio": fig.size_ratio,
                 "p50_ms": {str(k): v for k, v in fig.p50_ms.items()},
                 "p50_ratio": {str(k): v for k, v in fig.p50_ratio.items()}},
        provenance={"recipe": f"edgewise.ml.compress:{name}", "recipe_config": options,
                    "compressed_from": {"name": manifest.name, "version": manifest.version,
                                        "model_sha256": manifest.files[manifest.model].sha256},
                    "measured_on_cpu": cpu.as_dict(),
                    "source_provenance": manifest.provenance})


def _slug(name: str) -> str:
    from ._pipeline import _slug as slug

    return slug(name)


def compress_detector(bundle_dir: Path, out_dir: Path, manifest: BundleManifest, config,
                      progress, context_overrides: dict[str, Any] | None,
                      load_start: list[float]) -> CompressReport:
    """`compress_bundle` for a validated object-detector bundle (see the module docstring)."""
    import onnxruntime

    from ..detect import evaluate_detector_model
    from ..quick import preprocess_images
    from ._cpu import detect_cpu
    from ._pipeline import _load_avg, build_candidates, parse_recipe_entry

    cpu = detect_cpu()
    known = list_recipes("detect")
    names = config.recipes or tuple(known)
    for entry in names:  # refuse a classifier-only recipe before any work
        create_recipe(parse_recipe_entry(entry)[0], task="detect")

    # ---- data ---------------------------------------------------------------------------------
    progress("load data", 0, 1)
    try:
        calib, test, where = _load_detection_data(manifest, config)
    except MLError as exc:
        raise CompressError(str(exc)) from exc
    pre = manifest.preprocessing
    calib_x = preprocess_images(np.stack(calib.images), pre)
    progress("load data", 1, 1)
    work = out_dir / ".work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    empty = np.zeros((0, *calib_x.shape[1:]), np.float32)

    def check_map50(model_path: Path) -> float:
        return evaluate_detector_model(model_path, pre, manifest.labels, calib)["map50"]

    fields = {"bundle_dir": bundle_dir, "manifest": manifest, "work_dir": work,
              "calib_inputs": calib_x, "train_inputs": empty,
              "train_labels": np.zeros(0, np.int64), "cpu": cpu, "seed": config.seed,
              "progress": progress, "max_drop_pt": config.policy.max_drop_pt,
              "check_map50": check_map50}
    ctx = CompressContext(**{**fields, **(context_overrides or {})})

    # ---- recipes ------------------------------------------------------------------------------
    built, failed = build_candidates(names, config, ctx, work, progress, task="detect")

    # ---- measure ------------------------------------------------------------------------------
    models = {BASELINE: ctx.source_model, **{k: c.model_path for k, (c, _) in built.items()}}
    figures: dict[str, CandidateFigures] = {}
    for i, (name, path) in enumerate(models.items()):
        progress("mAP", i, len(models))
        try:
            m = evaluate_detector_model(path, pre, manifest.labels, test, threads=None)
        except MLError as exc:  # a graph onnxruntime cannot run: no figures, no candidate
            if name == BASELINE:
                raise CompressError(str(exc)) from exc
            failed[name] = f"failed: {exc}"
            continue
        rss = peak_rss(path, threads=1)
        cand = built.get(name, (None, None))[0]
        figures[name] = CandidateFigures(
            name=name, size_bytes=path.stat().st_size, peak_rss_mb=rss["peak_rss_mb"],
            p50_ms={}, p95_ms={}, accuracy=m["map50"], params=None,
            notes=list(cand.notes) if cand else [], metric="map50",
            map50_95=m["map50_95"])
    progress("mAP", len(models), len(models))
    one = preprocess_images(test.images[0][None], pre)
    for j, threads in enumerate(config.threads):
        progress("latency", j, len(config.threads))
        stats = measure_latency({k: models[k] for k in figures}, one, threads=threads,
                                rounds=config.latency_rounds,
                                runs_per_round=config.runs_per_round)
        for name, s in stats.items():
            figures[name].p50_ms[threads] = round(s.p50_ms, 3)
            figures[name].p95_ms[threads] = round(s.p95_ms, 3)
    progress("latency", len(config.threads), len(config.threads))

    # ---- guards and bundles -------------------------------------------------------------------
    golden = _golden_images(bundle_dir, manifest, test)
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
        try:
            _write_candidate(dest, bundle_dir, manifest, name, cand, fig, cpu, options, golden)
        except MLError as exc:  # e.g. finds no confident box on the golden images
            fig.refused.append(f"no valid bundle: {exc}")
            shutil.rmtree(dest, ignore_errors=True)
            continue
        fig.bundle = str(dest)
    shutil.rmtree(work, ignore_errors=True)

    # ---- report -------------------------------------------------------------------------------
    import platform
    from dataclasses import asdict

    sha, _ = file_sha256(bundle_dir / manifest.model)
    report = CompressReport(
        source={"name": manifest.name, "version": manifest.version, "bundle": str(bundle_dir),
                "model_sha256": sha, "kind": manifest.kind},
        cpu=cpu.as_dict(),
        run={"load_avg_start": load_start, "load_avg_end": _load_avg(),
             "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
             "test_images": len(test), "calibration_images": len(calib),
             "data": str(config.data_root), "test_set": where,
             "threads": list(config.threads),
             "latency_samples": config.latency_rounds * config.runs_per_round,
             "spinning": False, "policy": asdict(config.policy), "metric": "map50"},
        candidates=list(figures.values()), failed=failed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_JSON).write_text(report.to_json())
    (out_dir / REPORT_MD).write_text(report.markdown())
    plot_pareto(report, out_dir / PARETO_PNG)
    return report
