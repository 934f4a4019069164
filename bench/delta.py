"""Delta benchmark: edgewise delta format (v2) against generic diff tools, on real model pairs.

    python bench/delta.py [--workdir DIR] [--skip-1gb] [--pairs a,b,c,d,e] > delta.jsonl

Prints one JSON line per (pair, method) on stdout:
    {"pair", "method", "bytes", "encode_s", "decode_s", "decode_peak_rss_mb", "exact"}
plus, per pair, "zstd-19-changed-tensors-only" (the (a)/(b) reference) and, for the dense
pairs (c)/(c2), "iid-entropy-floor" (an estimate, see iid_floor_bytes: what no per-weight code
can beat on that pair), and a human summary (ratios, targets held or not, load average) on
stderr.

Pairs, all built here from the shipped EfficientNet-Lite0 ImageNet weights and real training
steps on Fashion-MNIST (28x28 grey, upsampled to 112x112 RGB, inception scaling):
    (a) head:     shipped weights (1000-class head) -> same backbone, new trained 10-class head
    (b) last:     (a)'s result -> last two blocks + conv head + 10-class head fine-tuned (Adam)
    (c) all:      (a)'s result -> every layer fine-tuned (Adam lr 1e-4, 4 steps, BatchNorm in
                  train mode)
    (c2) all-sgd: the same with SGD (lr 1e-2, momentum 0.9, 4 steps) instead of Adam
    (d) int8:     (a)'s result fp32 -> int8 weights + fp32 per-tensor scales (report only)
    (e) gguf:     (a) -> (c) as GGUF v3 files with F16 tensors (written by our GGUF writer)
    1gb:          a synthetic 1 GiB safetensors file, 1/8 of its tensors perturbed: only our
                  decoder's peak RSS and time matter there.
Every decode runs in a fresh subprocess; its peak RSS comes from wait4()'s rusage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zstandard
from safetensors.numpy import save_file as save_numpy
from torch import nn

from edgewise.artifacts.delta import apply_delta, encode_delta, write_gguf  # noqa: F401
from edgewise.ml.backbones import pretrained_weights_path
from edgewise.ml.backbones._efficientnet_lite import EfficientNetLite
from edgewise.ml.data import load_idx_dataset

PY = sys.executable
torch.manual_seed(0)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# 1. Model pairs from real training
# ---------------------------------------------------------------------------------------------

def fashion_batch(n: int, offset: int = 0, size: int = 112) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_idx_dataset(split="train")
    x = torch.from_numpy(images[offset:offset + n].astype(np.float32)).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - 127.0) / 128.0).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(labels[offset:offset + n])


def state_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().contiguous().numpy().copy() for k, v in model.state_dict().items()}


def build_pairs(work: Path) -> dict[str, tuple[Path, Path]]:
    shipped = torch.load(pretrained_weights_path("efficientnet-lite0"), weights_only=True)
    model = EfficientNetLite()
    model.load_state_dict(shipped, strict=True)
    save_numpy({k: v.contiguous().numpy() for k, v in shipped.items()},
               str(work / "shipped.safetensors"))

    # (a) a new 10-class head on frozen features.
    x, y = fashion_batch(512)
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model(x[i:i + 64]) for i in range(0, len(x), 64)])
    model._fc = nn.Linear(model.feature_dim, 10)
    opt = torch.optim.Adam(model._fc.parameters(), lr=1e-3)
    for _ in range(60):
        idx = torch.randint(0, len(feats), (64,))
        loss = F.cross_entropy(model._fc(feats[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    log(f"(a) head trained, loss {loss.item():.3f}")
    v1 = state_numpy(model)
    save_numpy(v1, str(work / "v1.safetensors"))

    # (b) last blocks fine-tuned: cache the frozen trunk's output, train the tail.
    tail_model = EfficientNetLite()
    tail_model._fc = nn.Linear(tail_model.feature_dim, 10)
    tail_model.load_state_dict({k: torch.from_numpy(v) for k, v in v1.items()})
    n_blocks = len(tail_model._blocks)
    tail = [tail_model._blocks[n_blocks - 2], tail_model._blocks[n_blocks - 1],
            tail_model._conv_head, tail_model._bn1, tail_model._fc]
    tail_model.eval()
    xb, yb = fashion_batch(128, offset=512)
    with torch.no_grad():
        h = F.relu6(tail_model._bn0(tail_model._conv_stem(xb)))
        for block in tail_model._blocks[:n_blocks - 2]:
            h = block(h)
    params = [p for m in tail for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=1e-4)
    for m in tail:
        m.train()
    for step in range(5):
        idx = torch.arange(step * 32, step * 32 + 32) % len(h)
        z = h[idx]
        for block in tail_model._blocks[n_blocks - 2:]:
            z = block(z)
        z = F.relu6(tail_model._bn1(tail_model._conv_head(z))).mean(dim=(2, 3))
        loss = F.cross_entropy(tail_model._fc(z), yb[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    log(f"(b) tail fine-tuned, loss {loss.item():.3f}")
    save_numpy(state_numpy(tail_model), str(work / "v2_last.safetensors"))

    # (c) every layer fine-tuned.
    full = EfficientNetLite()
    full._fc = nn.Linear(full.feature_dim, 10)
    full.load_state_dict({k: torch.from_numpy(v) for k, v in v1.items()})
    full.train()
    opt = torch.optim.Adam(full.parameters(), lr=1e-4)
    for step in range(4):
        xs, ys = fashion_batch(32, offset=1024 + 32 * step)
        loss = F.cross_entropy(full.classify(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
    log(f"(c) all layers fine-tuned, loss {loss.item():.3f}")
    v2_all = state_numpy(full)
    save_numpy(v2_all, str(work / "v2_all.safetensors"))

    # (c2) every layer fine-tuned with SGD + momentum: updates proportional to the gradient
    # (many weights move much less than with Adam's per-weight normalisation).
    full.load_state_dict({k: torch.from_numpy(v) for k, v in v1.items()})
    full.train()
    opt = torch.optim.SGD(full.parameters(), lr=1e-2, momentum=0.9)
    for step in range(4):
        xs, ys = fashion_batch(32, offset=1024 + 32 * step)
        loss = F.cross_entropy(full.classify(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
    log(f"(c2) all layers fine-tuned (SGD), loss {loss.item():.3f}")
    save_numpy(state_numpy(full), str(work / "v2_all_sgd.safetensors"))

    # (d) fp32 -> int8 weights + per-tensor scales (a re-quantized release of v1).
    quant: dict[str, np.ndarray] = {}
    for k, v in v1.items():
        if v.dtype == np.float32 and v.ndim >= 2:
            scale = np.float32(max(np.abs(v).max(), 1e-12) / 127.0)
            quant[k] = np.clip(np.round(v / scale), -127, 127).astype(np.int8)
            quant[k + ".scale"] = np.array([scale], dtype=np.float32)
        else:
            quant[k] = v
    save_numpy(quant, str(work / "v1_int8.safetensors"))

    # (e) GGUF, F16 tensors, (a) -> (c).
    def gguf(state: dict[str, np.ndarray], path: Path, version: str) -> None:
        tensors = [(k, v.astype(np.float16) if v.dtype == np.float32 else v)
                   for k, v in state.items()]
        write_gguf(path, tensors, {"general.name": "efficientnet-lite0-fashion",
                                   "general.version": version,
                                   "edgewise.labels": [str(i) for i in range(10)]})
    gguf(v1, work / "v1.gguf", "1")
    gguf(v2_all, work / "v2_all.gguf", "2")

    return {
        "a_new_head": (work / "shipped.safetensors", work / "v1.safetensors"),
        "b_last_blocks": (work / "v1.safetensors", work / "v2_last.safetensors"),
        "c_all_layers": (work / "v1.safetensors", work / "v2_all.safetensors"),
        "c2_all_layers_sgd": (work / "v1.safetensors", work / "v2_all_sgd.safetensors"),
        "d_int8_requant": (work / "v1.safetensors", work / "v1_int8.safetensors"),
        "e_gguf_f16": (work / "v1.gguf", work / "v2_all.gguf"),
    }


def changed_tensors_bytes(old: Path, new: Path) -> bytes:
    """The raw bytes of every tensor of `new` that is not byte-identical in `old`."""
    from safetensors.numpy import load_file

    a, b = load_file(str(old)), load_file(str(new))
    return b"".join(v.tobytes() for k, v in b.items()
                    if k not in a or a[k].shape != v.shape or a[k].tobytes() != v.tobytes())


def iid_floor_bytes(old: Path, new: Path, top_bits: int = 4) -> int:
    """An estimate of the least any per-weight lossless code of `new`'s changed float tensors
    given `old` can take, if the moves are independent (what the analysis of pairs (c)/(c2)
    found: no correlation between neighbours, channels or old values): per tensor, the empirical
    conditional entropy of (bit length, `top_bits` bits below the leading one) of the residual
    in units of the old value's last place, given the old value's exponent, plus the bits below
    those as raw bits, no tables counted. Other changed tensors count as their zstd -19 size.
    Our format's bit-length coding is this with top_bits=1 and lengths and exponents folded
    into one symbol. More top bits lower the plug-in entropy of small tensors by bias more than
    by information (on (c), 2026-12-06: 56.20/55.97/55.71/55.06% of the file for 1/2/4/8 bits;
    with the bits below the first one counted over all tensors together, where the bias is
    small, 8 bits give 55.73%), so 4 is the figure reported."""
    from safetensors.numpy import load_file

    from edgewise.artifacts.delta._bits import _bit_length, exponents
    from edgewise.artifacts.delta._format import T_FSUB
    from edgewise.artifacts.delta._planes import apply_transform

    def entropy_bits(keys: np.ndarray) -> float:
        counts = np.unique(keys, return_counts=True)[1].astype(np.float64)
        return float(-(counts * np.log2(counts / counts.sum())).sum())

    a, b = load_file(str(old)), load_file(str(new))
    bits, other = 0.0, []
    for k, v in b.items():
        if k in a and a[k].shape == v.shape and a[k].tobytes() == v.tobytes():
            continue
        if k not in a or a[k].shape != v.shape or v.dtype not in (np.float32, np.float16):
            other.append(v.tobytes())
            continue
        elem, mantissa = v.dtype.itemsize, 23 if v.dtype == np.float32 else 10
        o = a[k].tobytes()
        z = apply_transform(T_FSUB, o, v.tobytes(), elem).view(
            np.uint32 if elem == 4 else np.uint16).astype(np.int64)
        e = exponents(o, elem, mantissa).astype(np.int64)
        length = _bit_length(z)
        shift = np.maximum(length - 1 - top_bits, 0)
        top = (z >> shift) & ((1 << top_bits) - 1)  # with length: the leading bits of z
        joint = (e * 64 + length) << top_bits | top
        bits += entropy_bits(joint) - entropy_bits(e) + float(shift.sum())
    rest = b"".join(other)
    return math.ceil(bits / 8) + (len(zstandard.ZstdCompressor(level=19).compress(rest))
                                  if rest else 0)


# ---------------------------------------------------------------------------------------------
# 2. Methods: encode here, decode in a fresh subprocess (peak RSS from wait4)
# ---------------------------------------------------------------------------------------------

# Peak RSS must be the decoder's own: a child forked from this (torch-sized) process inherits
# its high-water mark, so a tiny interpreter (-S -I) forks and execs the decoder and reports
# wait4()'s rusage for it.
_WRAPPER = """
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print("WRAPPED", usage.ru_maxrss, time.perf_counter() - t0, os.waitstatus_to_exitcode(status))
"""


def run_measured(argv: list[str]) -> tuple[float, float]:
    """Run a command; return (seconds it reported, else wall seconds; peak RSS in MB)."""
    proc = subprocess.run([PY, "-S", "-I", "-c", _WRAPPER, *argv], capture_output=True,
                          text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("WRAPPED"):
        raise RuntimeError(f"{argv[:3]}: wrapper failed: {proc.stderr[-2000:]}")
    _, rss_kb, wall, code = lines[-1].split()
    if int(code) != 0:
        raise RuntimeError(f"{argv[:3]} failed: {proc.stderr[-2000:]}")
    seconds = float(wall)
    if len(lines) > 1:
        with contextlib.suppress(ValueError):
            seconds = float(lines[-2])
    return seconds, int(rss_kb) / 1024.0


def py_decoder(body: str) -> list[str]:
    # The subprocess prints its own decode time so interpreter start-up is not counted.
    return [PY, "-c", "import sys, time\n" + body.replace("START", "t0 = time.perf_counter()")
            + "\nprint(time.perf_counter() - t0)"]


def patch_from_params(old_size: int, new_size: int) -> zstandard.ZstdCompressionParameters:
    wlog = min(31, max(20, math.ceil(math.log2(old_size + new_size + 1))))
    return zstandard.ZstdCompressionParameters.from_level(19, window_log=wlog)


def encode_method(method: str, old: Path, new: Path, patch: Path) -> None:
    if method == "edgewise-delta":
        encode_delta(old, new, patch)
    elif method == "zstd-19":
        patch.write_bytes(zstandard.ZstdCompressor(level=19).compress(new.read_bytes()))
    elif method == "zstd-patch-from":
        o, n = old.read_bytes(), new.read_bytes()
        d = zstandard.ZstdCompressionDict(o, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        patch.write_bytes(zstandard.ZstdCompressor(
            dict_data=d, compression_params=patch_from_params(len(o), len(n))).compress(n))
    elif method == "xdelta3":
        subprocess.run(["xdelta3", "-e", "-9", "-f", "-s", str(old), str(new), str(patch)],
                       check=True)
    elif method == "bsdiff4":
        import bsdiff4

        bsdiff4.file_diff(str(old), str(new), str(patch))
    elif method.startswith("hdiffpatch"):
        import hdiffpatch

        config = (hdiffpatch.ZStdConfig(level=19, window=24) if method.endswith("zstd")
                  else hdiffpatch.Lzma2Config(level=9, window=24))
        patch.write_bytes(hdiffpatch.diff(old.read_bytes(), new.read_bytes(), config,
                                          validate=False))
    else:
        raise ValueError(method)


def decode_argv(method: str, old: Path, patch: Path, out: Path) -> list[str]:
    o, p, n = repr(str(old)), repr(str(patch)), repr(str(out))
    if method == "edgewise-delta":
        return py_decoder(f"from edgewise.artifacts.delta import apply_delta\nSTART\n"
                          f"apply_delta({o}, {p}, {n})")
    if method == "zstd-19":
        return py_decoder(f"import zstandard\nSTART\nwith open({p},'rb') as f, "
                          f"open({n},'wb') as g:\n zstandard.ZstdDecompressor()"
                          f".copy_stream(f, g)")
    if method == "zstd-patch-from":
        return py_decoder(f"import zstandard\nSTART\no = open({o},'rb').read()\n"
                          f"d = zstandard.ZstdCompressionDict(o, dict_type=zstandard."
                          f"DICT_TYPE_RAWCONTENT)\nopen({n},'wb').write(zstandard."
                          f"ZstdDecompressor(dict_data=d, max_window_size=1<<31).decompress("
                          f"open({p},'rb').read()))")
    if method == "xdelta3":
        return ["xdelta3", "-d", "-f", "-s", str(old), str(patch), str(out)]
    if method == "bsdiff4":
        return py_decoder(f"import bsdiff4\nSTART\nbsdiff4.file_patch({o}, {n}, {p})")
    if method.startswith("hdiffpatch"):
        return py_decoder(f"import hdiffpatch\nSTART\nopen({n},'wb').write(hdiffpatch.apply("
                          f"open({o},'rb').read(), open({p},'rb').read()))")
    raise ValueError(method)


METHODS = ["zstd-19", "zstd-patch-from", "xdelta3", "bsdiff4", "hdiffpatch-zstd",
           "hdiffpatch-lzma2", "edgewise-delta"]


def measure(pair: str, method: str, old: Path, new: Path, work: Path) -> dict:
    patch, out = work / f"{pair}.{method}.patch", work / f"{pair}.{method}.out"
    t0 = time.perf_counter()
    encode_method(method, old, new, patch)
    encode_s = time.perf_counter() - t0
    decode_s, rss = run_measured(decode_argv(method, old, patch, out))
    exact = out.read_bytes() == new.read_bytes()
    row = {"pair": pair, "method": method, "bytes": patch.stat().st_size,
           "encode_s": round(encode_s, 3), "decode_s": round(decode_s, 3),
           "decode_peak_rss_mb": round(rss, 1), "exact": exact}
    out.unlink()
    return row


# ---------------------------------------------------------------------------------------------
# 3. The 1 GiB file: decoder memory must not grow with the file
# ---------------------------------------------------------------------------------------------

def big_pair(work: Path, total_bytes: int = 1 << 30) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    n_tensors, per = 256, total_bytes // 256 // 4
    old_t, new_t = {}, {}
    for i in range(n_tensors):
        w = rng.standard_normal(per, dtype=np.float32) * np.float32(0.02)
        old_t[f"layers.{i:03d}.weight"] = w
        if i % 8 == 0:  # fine-tuned tensors
            w = w + rng.standard_normal(per, dtype=np.float32) * np.float32(1e-4)
        new_t[f"layers.{i:03d}.weight"] = w
    new_t["extra.bias"] = np.zeros(10, np.float32)
    save_numpy(old_t, str(work / "big_old.safetensors"))
    del old_t
    save_numpy(new_t, str(work / "big_new.safetensors"))
    return work / "big_old.safetensors", work / "big_new.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--pairs", default="a,b,c,c2,d,e")
    ap.add_argument("--skip-1gb", action="store_true")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgewise-delta-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"workdir {work}; load average at start {os.getloadavg()}")

    pairs = build_pairs(work)
    wanted = set(args.pairs.split(","))
    rows = []
    for pair, (old, new) in pairs.items():
        if pair.split("_")[0] not in wanted:
            continue
        new_size = new.stat().st_size
        if pair[0] in "abc":  # the changed tensors alone, zstd -19: the (a)/(b) reference
            changed = changed_tensors_bytes(old, new)
            ref = len(zstandard.ZstdCompressor(level=19).compress(changed))
            rows.append({"pair": pair, "method": "zstd-19-changed-tensors-only", "bytes": ref,
                         "encode_s": None, "decode_s": None, "decode_peak_rss_mb": None,
                         "exact": None})
            print(json.dumps(rows[-1]), flush=True)
        if pair[0] == "c":  # dense fine-tunes: how far any per-weight code could go
            rows.append({"pair": pair, "method": "iid-entropy-floor",
                         "bytes": iid_floor_bytes(old, new), "encode_s": None,
                         "decode_s": None, "decode_peak_rss_mb": None, "exact": None})
            print(json.dumps(rows[-1]), flush=True)
            log(f"  {pair:15s} {'iid-entropy-floor':28s} {rows[-1]['bytes']:>10d} B "
                f"{100 * rows[-1]['bytes'] / new_size:6.2f}%")
        for method in METHODS:
            row = measure(pair, method, old, new, work)
            rows.append(row)
            print(json.dumps(row), flush=True)
            log(f"  {pair:15s} {method:28s} {row['bytes']:>10d} B "
                f"{100 * row['bytes'] / new_size:6.2f}% enc {row['encode_s']:.2f}s "
                f"dec {row['decode_s']:.2f}s rss {row['decode_peak_rss_mb']} MB")
    if not args.skip_1gb:
        old, new = big_pair(work)
        for method in ("edgewise-delta",):
            row = measure("1gb_synthetic", method, old, new, work)
            print(json.dumps(row), flush=True)
            rows.append(row)
        old.unlink()
        new.unlink()
    summarize(rows)
    log(f"load average at end {os.getloadavg()}")


def summarize(rows: list[dict]) -> None:
    by = {(r["pair"], r["method"]): r["bytes"] for r in rows}
    generic = ["zstd-19", "zstd-patch-from", "xdelta3", "bsdiff4"]
    hdiff = ["hdiffpatch-zstd", "hdiffpatch-lzma2"]

    def best(pair: str, methods: list[str]) -> int:
        return min(by[(pair, m)] for m in methods if (pair, m) in by)

    checks, notes = [], []
    for pair in ("c_all_layers", "c2_all_layers_sgd"):
        if (pair, "edgewise-delta") in by:
            ours = by[(pair, "edgewise-delta")]
            tag = pair.split("_")[0]
            checks.append((f"({tag}) <= 0.6x best of zstd/xdelta3/bsdiff",
                           ours / best(pair, generic), 0.6))
            checks.append((f"({tag}) <= 0.75x HDiffPatch", ours / best(pair, hdiff), 0.75))
            if (pair, "iid-entropy-floor") in by:  # below 0.6 only if the floor is
                floor = by[(pair, "iid-entropy-floor")]
                notes.append(f"({tag}) iid entropy floor / best of zstd/xdelta3/bsdiff: "
                             f"{floor / best(pair, generic):.3f}; ours / floor: "
                             f"{ours / floor:.3f}")
    for pair in ("a_new_head", "b_last_blocks"):
        if (pair, "edgewise-delta") in by:
            ours = by[(pair, "edgewise-delta")]
            checks.append((f"({pair[0]}) <= best baseline", ours / best(pair, generic + hdiff),
                           1.0))
            checks.append((f"({pair[0]}) <= 1.02x zstd of changed tensors",
                           ours / by[(pair, "zstd-19-changed-tensors-only")], 1.02))
    for r in rows:
        if r["pair"] == "1gb_synthetic":
            checks.append(("1 GiB decode peak RSS < 100 MB", r["decode_peak_rss_mb"], 100.0))
    for name, value, limit in checks:
        log(f"{'HOLDS' if value <= limit else 'FAILS'}  {name}: {value:.3f} (limit {limit})")
    for note in notes:
        log(f"       {note}")
    bad = [r for r in rows if r.get("exact") is False]
    if bad:
        log(f"NOT EXACT: {[(r['pair'], r['method']) for r in bad]}")


if __name__ == "__main__":
    main()
