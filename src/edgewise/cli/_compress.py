"""`edgewise compress`, `edgewise fit` and `edgewise llm size`: thin wrappers over
`edgewise.ml.compress` (imported lazily so the CLI starts without torch)."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import console, fail, out, print_json

__all__ = ["register"]

llm_app = typer.Typer(help="LLMs: GGUF bundles (build), llama.cpp quantization, memory sizing.",
                      no_args_is_help=True)


def _parse_options(items: list[str]) -> dict[str, dict[str, object]]:
    """RECIPE.KEY=VALUE items -> {recipe: {key: value}} (values parsed as JSON when possible)."""
    import json

    options: dict[str, dict[str, object]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        recipe, dot, opt = key.partition(".")
        if not sep or not dot or not opt:
            fail(f"--option {item!r}: expected RECIPE.KEY=VALUE, e.g. prune.keep=0.6")
        try:
            value: object = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options.setdefault(recipe, {})[opt] = value
    return options


def compress(
    bundle: Path = typer.Argument(..., help="bundle directory to compress"),
    out_dir: Path = typer.Option(None, "--out", help="where candidates and the report go "
                                 "(default: BUNDLE-compressed)"),
    recipe: list[str] = typer.Option(None, "--recipe", "-r", help="recipe to run (repeat), "
                                     "optionally a variant NAME:KEY=VALUE,...; default: all"),
    option: list[str] = typer.Option(None, "--option", "-o",
                                     help="recipe option RECIPE.KEY=VALUE (repeat)"),
    data: Path = typer.Option(Path("/usr/share/datasets/fashion-mnist"),
                              help="IDX dataset (MNIST layout) for calibration, "
                                   "fine-tuning and test accuracy; for an object detector a "
                                   "COCO, YOLO or VOC folder of held-out images (mAP)"),
    calib_data: Path = typer.Option(None, "--calib-data",
                                    help="object detectors: calibration images (COCO, YOLO "
                                         "or VOC folder); default: a split of --data"),
    max_drop: float = typer.Option(1.0, help="refuse candidates losing more accuracy (points)"),
    allow_slower: bool = typer.Option(False, help="do not refuse candidates slower than fp32"),
    keep_refused: bool = typer.Option(False, help="write refused candidates' bundles too"),
    test_images: int = typer.Option(2000, help="test images for accuracy or mAP (0: whole "
                                    "split)"),
    train_images: int = typer.Option(4000, help="training images for fine-tuning/distillation"),
    rounds: int = typer.Option(30, help="latency rounds (x5 runs each, interleaved)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON lines, not the table"),
) -> None:
    """Build compressed candidates of BUNDLE, measure them, refuse bad ones, write a report."""
    from edgewise.artifacts import ArtifactError
    from edgewise.ml import MLError
    from edgewise.ml.compress import (
        CompressConfig,
        CompressError,
        GuardPolicy,
        list_recipes,
        parse_recipe_entry,
    )

    known = list_recipes(None)  # which apply is checked against the bundle's kind
    for entry in recipe or []:
        try:
            name, _ = parse_recipe_entry(entry)
        except CompressError as exc:
            fail(str(exc))
        if name not in known:
            fail(f"unknown recipe {name!r} (known: {', '.join(known)})")
    out_dir = out_dir or bundle.with_name(bundle.name + "-compressed")
    config = CompressConfig(
        recipes=tuple(recipe or ()), recipe_options=_parse_options(option or []),
        data_root=data, calib_root=calib_data, test_images=test_images or None,
        train_images=train_images,
        latency_rounds=rounds,
        policy=GuardPolicy(max_drop_pt=max_drop, allow_slower=allow_slower),
        keep_refused=keep_refused)
    from rich.progress import Progress

    from edgewise.ml.compress import compress_bundle

    try:
        with Progress(console=console, transient=True) as bar:
            tasks: dict[str, int] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done, total=total)

            report = compress_bundle(bundle, out_dir, config, progress=progress)
    except (MLError, ArtifactError) as exc:
        fail(str(exc))
    if json_out:
        for line in report.json_lines():
            print_json(line)
    else:
        out.print(report.markdown())
    console.print(f"report: {out_dir / 'report.md'}, plot: {out_dir / 'pareto.png'}")


def fit(
    bundle: Path = typer.Argument(..., help="the bundle that was compressed"),
    max_ram: float = typer.Option(None, "--max-ram", help="peak RSS budget, MB"),
    max_latency_ms: float = typer.Option(None, "--max-latency-ms", help="latency budget, ms"),
    min_accuracy: float = typer.Option(None, "--min-accuracy",
                                       help="minimum test accuracy (0.85 or 85)"),
    threads: int = typer.Option(None, help="threads the device gives the model [default: 1]"),
    stat: str = typer.Option(None, help="latency statistic the budget bounds: p50 or p95 "
                             "[default: p95]"),
    slowdown: float = typer.Option(None, help="device latency / this machine's latency "
                                   "[default: 1.0]"),
    max_size_mb: float = typer.Option(None, help="model file size budget, MB"),
    min_tok_s: float = typer.Option(None, "--min-tok-s", help="LLMs: generation tokens/s "
                                    "the device needs"),
    report_path: Path = typer.Option(None, "--report", help="compression report (default: "
                                     "BUNDLE-compressed/report.json; for an LLM bundle "
                                     "BUNDLE-quantized/report.json)"),
    json_out: bool = typer.Option(False, "--json", help="print the decision as JSON"),
    group: str = typer.Option(None, help="take the device profile stored for this group on "
                              "the server (options given here override its fields)"),
    variant_of: str = typer.Option(None, "--variant-of", help="publish the chosen candidate "
                                   "as this release's variant for the group's hardware"),
    server: str = typer.Option(None, envvar="EDGEWISE_SERVER", help="update server URL"),
    token: str = typer.Option(None, envvar="EDGEWISE_TOKEN", help="operator API token"),
    keys: Path = typer.Option(Path("keys"), help="directory with root.json and targets keys "
                              "(for --variant-of)"),
) -> None:
    """Pick the best measured candidate of BUNDLE for a device profile, and say why."""
    from edgewise.ml.compress import CompressError, DeviceProfile, fit_bundle, load_report

    if _is_llm_bundle(bundle):
        image_only = {"--max-latency-ms": max_latency_ms, "--min-accuracy": min_accuracy,
                      "--threads": threads, "--stat": stat, "--group": group,
                      "--variant-of": variant_of}
        given_image_only = [name for name, value in image_only.items() if value is not None]
        if given_image_only:
            fail(f"{', '.join(given_image_only)}: not for LLM bundles (their profile is "
                 "--max-ram, --min-tok-s, --max-size-mb and --slowdown)")
        _fit_llm(bundle, report_path, max_ram=max_ram, min_tok_s=min_tok_s,
                 max_size_mb=max_size_mb, slowdown=slowdown, json_out=json_out)
        return

    given = {"max_ram_mb": max_ram, "max_latency_ms": max_latency_ms,
             "min_accuracy": min_accuracy, "max_size_mb": max_size_mb, "threads": threads,
             "latency_stat": stat, "slowdown": slowdown}
    fields: dict = {"threads": 1, "latency_stat": "p95", "slowdown": 1.0}
    hardware: list[str] = []
    if (group or variant_of) and not (server and token):
        fail("--group and --variant-of need --server and --token (or EDGEWISE_SERVER/TOKEN)")
    if variant_of and not group:
        fail("--variant-of needs --group: the variant goes to that group's hardware")
    if group:
        stored = _server_call(server, token, lambda c: c.request(
            "GET", f"/api/v1/groups/{group}/profile").json())
        hardware = stored.pop("hardware", [])
        stored.pop("group", None)
        fields.update(stored)
    fields.update({k: v for k, v in given.items() if v is not None})
    if fields["latency_stat"] not in ("p50", "p95"):
        fail("--stat must be p50 or p95")
    if fields.get("min_accuracy") is not None and fields["min_accuracy"] > 1:
        fields["min_accuracy"] /= 100.0
    profile = DeviceProfile(**fields)
    try:
        report = load_report(report_path or bundle.with_name(bundle.name + "-compressed"))
        decision = fit_bundle(report, profile)
    except CompressError as exc:
        fail(str(exc))
    published = None
    if variant_of:
        published = _publish_choice(decision, variant_of, hardware, server, token, keys)
    if json_out:
        print_json({"chosen": decision.chosen.name, "bundle": decision.chosen.bundle,
                    "fitting": decision.fitting, "explanation": decision.explanation,
                    "profile": profile.as_dict(), "group": group, "hardware": hardware,
                    "variant": published})
        return
    out.print(f"[bold]{decision.chosen.name}[/] -> {decision.chosen.bundle}")
    for line in decision.explanation:
        out.print(f"  {line}")
    if published:
        out.print(f"published as the variant of {variant_of} for {', '.join(hardware)}: "
                  f"{published['version']}")


def _is_llm_bundle(bundle: Path) -> bool:
    from edgewise.artifacts import BundleError, LlmManifest, read_manifest

    try:
        return isinstance(read_manifest(bundle), LlmManifest)
    except (BundleError, OSError):
        return False


def _fit_llm(bundle: Path, report_path: Path | None, *, max_ram: float | None,
             min_tok_s: float | None, max_size_mb: float | None, slowdown: float | None,
             json_out: bool) -> None:
    """The quant of an LLM bundle for a device: best quality that fits, never a collapsed
    one (`edgewise llm quantize` measured them)."""
    from edgewise.ml.errors import MLError
    from edgewise.ml.llm import fit_llm, load_llm_report

    try:
        report = load_llm_report(report_path or
                                 bundle.with_name(bundle.name + "-quantized") / "report.json")
        decision = fit_llm(report, max_ram_mb=max_ram, min_gen_tok_s=min_tok_s,
                           max_size_mb=max_size_mb, slowdown=slowdown or 1.0)
    except MLError as exc:
        fail(str(exc))
    if json_out:
        print_json({"chosen": decision.chosen.quant, "bundle": decision.chosen.bundle,
                    "fitting": decision.fitting, "explanation": decision.explanation})
        return
    out.print(f"[bold]{decision.chosen.quant}[/] -> {decision.chosen.bundle}")
    for line in decision.explanation:
        out.print(f"  {line}")


def _server_call(server: str, token: str, call):
    from ._ops import _api_errors, _client

    try:
        with _client(server, token) as client:
            return call(client)
    except _api_errors() as exc:
        fail(str(exc))


def _publish_choice(decision, release_id: str, hardware: list[str], server: str, token: str,
                    keys: Path) -> dict | None:
    """The chosen candidate becomes the release's build for the group's hardware (nothing to
    publish when the release's own build is the one that fits)."""
    from edgewise.ml.compress import BASELINE
    from edgewise.server.client import publish_variant
    from edgewise.trust import role_key_files

    if not hardware:
        fail("the group's profile names no hardware ids (edgewise groups profile GROUP "
             "--hardware ...)")
    if decision.chosen.name == BASELINE or not decision.chosen.bundle:
        console.print("the release's own build fits this profile: no variant needed")
        return None
    release = _server_call(server, token, lambda c: publish_variant(
        c, release_id, Path(decision.chosen.bundle), hardware=hardware,
        root_path=keys / "root.json", targets_key_path=role_key_files(keys, "targets")))
    return next(v for v in release["variants"] if v["hardware"] == hardware[0])


@llm_app.command("size")
def llm_size(
    params: float = typer.Option(None, help="parameter count, e.g. 7e9 (Llama-like shape "
                                 "assumed unless --preset or shape options)"),
    bits: int = typer.Option(None, help="bits per weight: picks 3=Q3_K_M 4=Q4_K_M 5=Q5_K_M "
                             "6=Q6_K 8=Q8_0 16=F16 32=F32"),
    quant: str = typer.Option(None, "--quant", "-q", help="GGUF type, e.g. Q4_0, Q4_K_M, Q8_0"),
    context: int = typer.Option(4096, help="context length (tokens)"),
    batch: int = typer.Option(1, help="parallel sequences"),
    kv_type: str = typer.Option("F16", help="KV cache type: F16, F32, Q8_0, Q4_0"),
    preset: str = typer.Option(None, help="known shape: llama-2-7b, llama-3-8b, mistral-7b, ..."),
    layers: int = typer.Option(None), hidden: int = typer.Option(None),
    ffn: int = typer.Option(None), heads: int = typer.Option(None),
    kv_heads: int = typer.Option(None), vocab: int = typer.Option(None),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Memory to run a GGUF model: weights (exact block arithmetic) + KV cache + overhead."""
    from dataclasses import replace

    from edgewise.ml.compress import (
        BITS_DEFAULT_FTYPE,
        PRESETS,
        LLMShape,
        estimate_memory,
        shape_from_params,
    )

    if quant is None:
        if bits is None:
            fail("give --bits or --quant")
        if bits not in BITS_DEFAULT_FTYPE:
            fail(f"--bits must be one of {sorted(BITS_DEFAULT_FTYPE)}")
        quant = BITS_DEFAULT_FTYPE[bits]
    if preset:
        if preset not in PRESETS:
            fail(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        shape = PRESETS[preset]
    elif params:
        shape = shape_from_params(params)
    elif layers and hidden:
        shape = LLMShape(layers, hidden, ffn or round(2.6875 * hidden), heads or hidden // 128,
                         kv_heads or heads or hidden // 128, vocab or 32000)
    else:
        fail("give --params, --preset or --layers/--hidden")
    overrides = {k: v for k, v in {"n_layers": layers, "d_model": hidden, "d_ff": ffn,
                                   "n_heads": heads, "n_kv_heads": kv_heads,
                                   "vocab": vocab}.items() if v}
    shape = replace(shape, **overrides)
    try:
        est = estimate_memory(ftype=quant, shape=shape, context=context, batch=batch,
                              kv_type=kv_type)
    except ValueError as exc:
        fail(str(exc))
    if json_out:
        print_json(est.as_dict())
        return
    gib = 2.0 ** 30
    out.print(f"{est.ftype}: {est.n_params / 1e9:.2f}B params at {est.bits_per_weight:.2f} "
              f"bits/weight (shape {est.shape})")
    out.print(f"  weights   {est.weights_bytes / gib:8.2f} GiB  ({est.weights_bytes / 1e9:.2f} GB)")
    out.print(f"  KV cache  {est.kv_cache_bytes / gib:8.2f} GiB  ({context} tokens x {batch}, "
              f"{est.kv_type})")
    out.print(f"  overhead  {est.overhead_bytes / gib:8.2f} GiB  (estimate)")
    out.print(f"  total     {est.total_bytes / gib:8.2f} GiB")
    out.print(f"  {est.formula}")


def register(app: typer.Typer) -> None:
    app.command()(compress)
    app.command()(fit)
    app.add_typer(llm_app, name="llm")
