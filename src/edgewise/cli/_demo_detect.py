"""`edgewise demo --detect`: an object detector through the whole loop, on embedded defaults.

Reads top to bottom: render SYNTHETIC scenes (Fashion-MNIST items on generated textures; the
demo says so), train the CenterNet detector for a short budget (`edgewise detect train`'s
code), compress it (`edgewise compress`: int8, measured by mAP on held-out scenes), make a
broken v2 (the class rows of the heatmap head rolled: every box gets another label), start a
real server and agents, ship v1 (all commit), ask a device for boxes on a held-out scene,
ship the int8 build when the guards accepted it (all commit after checking its own golden
boxes), ship v2 (all roll back by themselves), and print a summary table and the JSON
summary.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import typer

from ._common import console, fail, print_json, stage_progress
from ._demo import _next_major, _print_table, _summary, _wait, demo_fleet, demo_workdir

NAME = "scenes"
SIZE = 128


def run_detect_demo(*, workdir: str | None, n_devices: int, budget_s: float) -> None:
    from ..ml.detect import DetectConfig, SynthConfig, synth_scenes, train_detector, write_coco
    from ..server.client import publish_bundle

    work = demo_workdir(workdir)
    started = time.monotonic()

    # ---- 1. build: synthetic scenes, a detector trained on them, its int8 build, a bad v2 --
    synth = SynthConfig(scenes=400, size_px=SIZE, max_objects=3, min_object_frac=0.25,
                        max_object_frac=0.5, seed=0)
    scenes = synth_scenes(synth)
    held_out = synth_scenes(replace(synth, scenes=60, seed=1000, split="test"))
    write_coco(held_out, work / "held-out")
    console.print(f"[yellow]SYNTHETIC data[/]: {len(scenes)} scenes of Fashion-MNIST items on "
                  f"generated textures at {SIZE} px (and {len(held_out)} held-out scenes of "
                  "test-split items); figures on them are not figures on photographs")
    cfg = DetectConfig(data="synthetic", out_dir=str(work / f"{NAME}.run"), input_size=SIZE,
                       time_budget_s=budget_s, val_every_s=max(30.0, budget_s / 3), name=NAME,
                       version="1.0.0")
    with stage_progress() as (report, out_console):
        result = train_detector(cfg, progress=report, notify=out_console.print, dataset=scenes)
    if result.bundle_dir is None:
        fail(f"the detector found nothing confident after {budget_s:.0f} s of training; "
             "give it longer (--detect-budget)")
    v1_dir = result.bundle_dir
    console.print(f"[green]built[/] {NAME}@1.0.0: validation mAP@0.5 "
                  f"{result.metrics['val_map50']:.3f} after {result.metrics['steps']} steps")
    int8_dir = _compress(v1_dir, work)
    v2_version = _next_major("1.0.0")
    v2_dir = work / f"{NAME}-{v2_version}"
    _make_mislabelled_release(v1_dir, v2_dir, version=v2_version)
    console.print(f"[yellow]built[/] {NAME}@{v2_version}: the same detector with its class "
                  "rows rolled (every box another label), which its golden boxes must catch")

    # ---- 2-3. keys, a real server over TLS, real agents ---------------------------------
    with demo_fleet(work, n_devices) as (client, keys, states):
        def ship(bundle: Path) -> dict:
            release = publish_bundle(client, bundle, root_path=keys.root_json,
                                     targets_key_path=keys.targets_key)
            client.assign(release["id"])
            console.print(f"[green]published[/] {release['name']}@{release['version']} as "
                          f"{release['id']} and assigned it to all devices")
            return release

        # ---- 4. ship v1: every device checks its golden boxes and commits ----------------
        v1 = ship(v1_dir)
        _wait(client, lambda d: d["state"] == "committed" and d["release_id"] == v1["id"],
              "installing v1")
        # ---- 5. boxes on a device, from an image that never leaves it ----------------------
        _detect_on_device(states[0], work, held_out)
        versions = {v1["id"]: v1["version"]}
        current = v1
        # ---- 6. the int8 build, when the guards accepted it ---------------------------------
        if int8_dir is not None:
            int8 = ship(int8_dir)
            versions[int8["id"]] = int8["version"]
            _wait(client, lambda d: d["state"] == "committed" and d["release_id"] == int8["id"],
                  "installing int8")
            if any(d["release_id"] != int8["id"] for d in client.devices()):
                _print_table(_summary(client, versions))
                fail("the int8 build did not commit everywhere: see the table")
            current = int8
        # ---- 7. ship the broken v2: every device rolls back by itself -----------------------
        v2 = ship(v2_dir)
        versions[v2["id"]] = v2["version"]
        _wait(client, lambda d: d["state"] == "rolled-back" and d["release_id"] == current["id"],
              "v2 health checks")
        summary = _summary(client, versions)

    # ---- 8. summary -----------------------------------------------------------------------
    _print_table(summary)
    names = {k: f"{NAME}@{v}" for k, v in versions.items()}
    final = names[current["id"]]
    ok = sum(1 for d in summary if d["release"] == final and d["state"] == "rolled-back")
    console.print(f"{final} runs on {ok}/{n_devices} devices after the mislabelled v2 rolled "
                  f"back on each; {time.monotonic() - started:.0f} s in all")
    print_json({"devices": summary, "releases": list(names.values()),
                "int8_shipped": int8_dir is not None})
    if ok != n_devices:
        raise typer.Exit(1)


def _compress(v1_dir: Path, work: Path) -> Path | None:
    """int8 of v1, measured on the held-out scenes; its bundle when the guards accepted it."""
    from ..ml.compress import CompressConfig, compress_bundle

    with console.status("compressing v1 (int8, calibrated on part of the held-out scenes, "
                        "mAP on the rest) ..."):
        report = compress_bundle(v1_dir, work / "compressed", CompressConfig(
            recipes=("int8-static",), data_root=work / "held-out", calib_images=30,
            test_images=30, threads=(1,), latency_rounds=10))
    fp32, int8 = report.candidate("fp32"), report.candidate("int8-static")
    line = (f"int8: mAP@0.5 {int8.accuracy:.3f} vs fp32 {fp32.accuracy:.3f}, p50 "
            f"{int8.p50_ms[1]:.2f} ms vs {fp32.p50_ms[1]:.2f} ms at 1 thread, "
            f"{int8.size_bytes / 1e6:.1f} MB vs {fp32.size_bytes / 1e6:.1f} MB")
    if int8.bundle is None:
        console.print(f"[yellow]not shipping int8[/] ({line}): " + "; ".join(int8.refused))
        return None
    console.print(f"[green]compressed[/] {line}; its golden boxes are its own")
    return Path(int8.bundle)


def _make_mislabelled_release(good: Path, out_dir: Path, *, version: str) -> None:
    """A bad release like a botched export: the heatmap head's class rows are rolled, so every
    box comes out with another class, while the golden set holds what v1 finds."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from ..artifacts import load_golden, read_manifest, write_bundle

    manifest = read_manifest(good)
    model = onnx.load(str(good / manifest.model))
    n = len(manifest.labels)
    # The head's last convolution: weight [C, W, 1, 1] and bias [C], the last such pair.
    head = [t for t in model.graph.initializer if tuple(t.dims)[:1] == (n,)
            and len(t.dims) in (1, 4)]
    if len(head) < 2:
        raise RuntimeError("cannot find the heatmap head in the ONNX graph")
    for tensor in head[-2:]:
        tensor.CopyFrom(numpy_helper.from_array(np.roll(numpy_helper.to_array(tensor), 1, 0),
                                                tensor.name))
    golden = load_golden(good, manifest)
    extra = {rel: good / rel for rel in manifest.files
             if rel not in (manifest.model, manifest.golden.file)}
    write_bundle(out_dir, name=manifest.name, version=version, labels=manifest.labels,
                 preprocessing=manifest.preprocessing, model=model.SerializeToString(),
                 golden_inputs=golden.inputs, golden_outputs=golden.outputs,
                 atol=manifest.golden.atol, max_latency_ms=manifest.golden.max_latency_ms,
                 extra_files=extra, metrics=manifest.metrics, kind=manifest.kind,
                 detection=manifest.detection,
                 provenance={**manifest.provenance, "deliberately_broken": True,
                             "note": "class rows rolled for the rollback demo"})


def _detect_on_device(state: Path, work: Path, held_out) -> None:
    from PIL import Image

    from ..sim import edgewise_command

    path = work / "scene.png"
    Image.fromarray(held_out.images[0]).save(path)
    result = subprocess.run(edgewise_command("agent", "predict", str(path), "--state",
                                             str(state), "--draw", str(work / "drawn")),
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        console.print(f"[red]local detection failed:[/] {result.stderr.strip()}")
        return
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    found = ", ".join(f"{d['label']} {d['score']:.2f}" for d in answer["detections"]) or "none"
    truth = ", ".join(held_out.class_names[int(c)] for c in held_out.labels[0])
    console.print(f"[green]local detection[/] on {state.name}: {path.name} -> {found}; truth: "
                  f"{truth}; boxes drawn in {answer.get('drawn')}; the image never left the "
                  "device")
