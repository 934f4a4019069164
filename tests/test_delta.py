"""Delta format v1/v2: byte-exact round trips per file format, and refusal of bad patches."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgewise.artifacts import ArtifactError
from edgewise.artifacts.delta import (
    FORMAT_VERSION,
    DeltaBaseError,
    DeltaError,
    DeltaFormatError,
    DeltaResultError,
    DeltaTruncatedError,
    DeltaVersionError,
    apply_delta,
    encode_delta,
    parse_layout,
    read_delta_header,
    write_gguf,
)
from edgewise.artifacts.delta._bits import decode_bits, encode_bits
from edgewise.artifacts.delta._format import HEADER_SIZE, T_FSUB, T_NONE, T_SUB, T_XOR
from edgewise.artifacts.delta._planes import (
    apply_transform,
    group_order,
    join_planes,
    split_planes,
    unapply_transform,
)
from edgewise.artifacts.delta._rans import choose_lanes, quantize_freqs, rans_decode, rans_encode

_ST_DTYPE = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
             np.dtype(np.int64): "I64", np.dtype(np.int8): "I8"}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
                      ) -> bytes:
    """A safetensors file, written by hand so the test does not depend on the library."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": _ST_DTYPE[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def fine_tune(w: np.ndarray, rng: np.random.Generator, step: float = 1e-4) -> np.ndarray:
    return (w + rng.normal(scale=step, size=w.shape)).astype(w.dtype)


def roundtrip(tmp_path: Path, old: bytes, new: bytes, **kwargs):
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    info = encode_delta(tmp_path / "old", tmp_path / "new", tmp_path / "patch", **kwargs)
    result = apply_delta(tmp_path / "old", tmp_path / "patch", tmp_path / "out",
                         expected_sha256=hashlib.sha256(new).hexdigest())
    assert (tmp_path / "out").read_bytes() == new
    assert info.patch_size == (tmp_path / "patch").stat().st_size
    assert result.result_sha256 == info.result_sha256 == hashlib.sha256(new).hexdigest()
    assert info.base_sha256 == hashlib.sha256(old).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old", "out", "patch"]
    return info


@pytest.fixture
def model_pair() -> tuple[bytes, bytes]:
    rng = np.random.default_rng(0)
    old = {"conv.weight": rng.normal(scale=0.05, size=(64, 32, 3, 3)).astype(np.float32),
           "bn.running_mean": rng.normal(size=64).astype(np.float32),
           "bn.num_batches_tracked": np.array([100], dtype=np.int64),
           "fc.weight": rng.normal(scale=0.02, size=(1000, 64)).astype(np.float32),
           "emb.weight": rng.normal(scale=0.1, size=(300, 64)).astype(np.float16)}
    new = {"conv.weight": fine_tune(old["conv.weight"], rng),
           "bn.running_mean": old["bn.running_mean"],
           "bn.num_batches_tracked": np.array([104], dtype=np.int64),
           "fc.weight": rng.normal(scale=0.02, size=(10, 64)).astype(np.float32),  # new head
           "embedding.weight": old["emb.weight"]}  # renamed, same bytes
    return (safetensors_bytes(old, {"version": "1"}),
            safetensors_bytes(new, {"version": "2"}))


# --- round trips ------------------------------------------------------------------------------


def test_safetensors_roundtrip_is_tensor_aware(tmp_path: Path, model_pair) -> None:
    import zstandard

    old, new = model_pair
    info = roundtrip(tmp_path, old, new)
    assert info.layout == "safetensors" and info.version == FORMAT_VERSION
    methods = info.methods
    # The renamed tensor is found by content, the unchanged one by name: both copied.
    assert methods["copy"]["in_bytes"] >= 300 * 64 * 2 + 64 * 4
    assert any(m.startswith(("planes-", "bits-")) for m in methods), methods
    # A dense small change must cost clearly less than compressing the new file.
    assert info.patch_size < 0.8 * len(zstandard.ZstdCompressor(level=19).compress(new))


def test_tensors_are_matched_by_name_not_offset(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=4096).astype(np.float32)
    b = rng.normal(size=4096).astype(np.float32)
    old = safetensors_bytes({"a": a, "b": b})
    new = safetensors_bytes({"b": fine_tune(b, rng), "a": fine_tune(a, rng)})  # swapped order
    info = roundtrip(tmp_path, old, new)
    swapped = safetensors_bytes({"b": fine_tune(a, rng), "a": fine_tune(b, rng)})
    (tmp_path / "out").unlink()
    worse = roundtrip(tmp_path, old, swapped)  # same offsets, contents mismatched by name
    assert info.patch_size < 0.8 * worse.patch_size


def test_large_tensor_is_cut_into_pieces(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(scale=0.05, size=600_000).astype(np.float32)  # 2.4 MB
    w2 = w.copy()
    w2[:200_000] = fine_tune(w[:200_000], rng)  # only the first piece changes
    info = roundtrip(tmp_path, safetensors_bytes({"w": w}), safetensors_bytes({"w": w2}),
                     piece_bytes=1 << 20)
    assert info.methods["copy"]["in_bytes"] >= (1 << 20)


def test_onnx_initializers_roundtrip(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    def model(weights: dict[str, np.ndarray]) -> bytes:
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
                 helper.make_node("Add", ["h", "b1"], ["h2"]),
                 helper.make_node("MatMul", ["h2", "W2"], ["y"])]
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
            [numpy_helper.from_array(v, k) for k, v in weights.items()])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(m)
        return m.SerializeToString()

    rng = np.random.default_rng(3)
    w = {"W1": rng.normal(scale=0.05, size=(256, 512)).astype(np.float32),
         "b1": rng.normal(size=512).astype(np.float32),
         "W2": rng.normal(scale=0.05, size=(512, 10)).astype(np.float32)}
    old = model(w)
    new = model({k: fine_tune(v, rng) for k, v in w.items()})
    layout = parse_layout(new)
    assert layout.kind == "onnx"
    assert {s.name for s in layout.spans} == {"W1", "b1", "W2"}
    assert all(s.elem == 4 and s.is_float for s in layout.spans)
    info = roundtrip(tmp_path, old, new)
    assert info.layout == "onnx"
    assert {"planes-fsub-grouped", "planes-fsub", "bits-fsub"} & set(info.methods)


def test_gguf_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    tensors = {"tok_embd.weight": rng.normal(size=(256, 64)).astype(np.float16),
               "blk.0.attn_q.weight": rng.normal(scale=0.05, size=(64, 64)).astype(np.float32),
               "blk.0.ffn.q8": rng.integers(0, 256, size=34 * 40, dtype=np.uint8)}
    raw_types = {"blk.0.ffn.q8": 8}  # Q8_0 blocks: opaque bytes to us
    write_gguf(tmp_path / "a.gguf", tensors, {"general.name": "tiny"}, raw_types=raw_types)
    changed = dict(tensors)
    changed["blk.0.attn_q.weight"] = fine_tune(tensors["blk.0.attn_q.weight"], rng)
    changed["tok_embd.weight"] = fine_tune(tensors["tok_embd.weight"], rng, step=1e-2)
    write_gguf(tmp_path / "b.gguf", changed, {"general.name": "tiny v2"}, raw_types=raw_types)
    old, new = (tmp_path / "a.gguf").read_bytes(), (tmp_path / "b.gguf").read_bytes()
    layout = parse_layout(new)
    assert layout.kind == "gguf"
    assert [s.name for s in layout.spans] == list(tensors)
    assert [s.elem for s in layout.spans] == [2, 4, 1]
    sub = tmp_path / "rt"
    sub.mkdir()
    info = roundtrip(sub, old, new)
    assert info.layout == "gguf"
    assert info.methods["copy"]["in_bytes"] >= 34 * 40


def test_generic_file_uses_the_old_file_as_dictionary(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    old = rng.integers(0, 256, size=3 << 20, dtype=np.uint8).tobytes()  # incompressible
    new = old[:1000] + b"inserted bytes shift everything" + old[1000:2_000_000] + old[2_100_000:]
    info = roundtrip(tmp_path, old, new)
    assert info.layout == "opaque"
    assert info.patch_size < 20_000  # vs ~3 MB for zstd alone


def test_empty_files(tmp_path: Path) -> None:
    roundtrip(tmp_path, b"", b"")
    for p in tmp_path.iterdir():
        p.unlink()
    roundtrip(tmp_path, b"", b"something new")
    for p in tmp_path.iterdir():
        p.unlink()
    roundtrip(tmp_path, b"something old", b"")


_edits = st.lists(st.tuples(st.sampled_from(["insert", "delete", "replace"]),
                            st.integers(0, 1 << 16), st.binary(max_size=64)), max_size=6)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(old=st.binary(max_size=5000) | st.builds(lambda n, s: np.random.default_rng(s).bytes(n),
                                                 st.integers(0, 200_000), st.integers(0, 9)),
       edits=_edits)
def test_arbitrary_binary_roundtrip(tmp_path: Path, old: bytes, edits) -> None:
    new = bytearray(old)
    for kind, pos, data in edits:
        pos = pos % (len(new) + 1)
        if kind == "insert":
            new[pos:pos] = data
        elif kind == "delete":
            del new[pos:pos + len(data)]
        else:
            new[pos:pos + len(data)] = data
    for p in tmp_path.iterdir():
        p.unlink()
    roundtrip(tmp_path, old, bytes(new), level=1)


@settings(max_examples=60, deadline=None)
@given(elem=st.sampled_from([1, 2, 4, 8]),
       transform=st.sampled_from([T_NONE, T_XOR, T_SUB, T_FSUB]),
       grouped=st.booleans(), data=st.data())
def test_transforms_are_exact_inverses(elem: int, transform: int, grouped: bool, data) -> None:
    n = data.draw(st.integers(0, 64)) * elem
    old = data.draw(st.binary(min_size=n, max_size=n))
    new = data.draw(st.binary(min_size=n, max_size=n))
    residual = apply_transform(transform, old, new, elem)
    if grouped:
        order = group_order(old, elem)
        residual = residual.reshape(-1, elem)[order].reshape(-1)
    planes = split_planes(residual, elem)
    back = join_planes(planes, elem)
    if grouped:
        ungrouped = np.empty_like(back.reshape(-1, elem))
        ungrouped[order] = back.reshape(-1, elem)
        back = ungrouped.reshape(-1)
    assert unapply_transform(transform, old, back, elem) == new


def test_float_specials_survive(tmp_path: Path) -> None:
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3.4e38, -3.4e38],
                        dtype=np.float32)
    nan_payload = np.array([0x7FC00001, 0xFFFFFFFF], dtype=np.uint32).view(np.float32)
    old = np.tile(np.concatenate([specials, nan_payload]), 500)
    new = old[::-1].copy()
    roundtrip(tmp_path, safetensors_bytes({"w": old}), safetensors_bytes({"w": new}))


# --- refusals -----------------------------------------------------------------------------------


@pytest.fixture
def made(tmp_path: Path, model_pair) -> Path:
    old, new = model_pair
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    encode_delta(tmp_path / "old", tmp_path / "new", tmp_path / "patch")
    return tmp_path


def _only_inputs_left(d: Path) -> None:
    assert sorted(p.name for p in d.iterdir()) == ["new", "old", "patch"]


def test_wrong_base_is_refused(made: Path) -> None:
    with pytest.raises(DeltaBaseError, match="wrong base"):
        apply_delta(made / "new", made / "patch", made / "out")
    _only_inputs_left(made)
    # Same size, one byte different: still the wrong base.
    bad = bytearray((made / "old").read_bytes())
    bad[-1] ^= 1
    (made / "old").write_bytes(bytes(bad))
    with pytest.raises(DeltaBaseError, match="wrong base"):
        apply_delta(made / "old", made / "patch", made / "out")
    _only_inputs_left(made)


def test_existing_output_is_untouched_on_failure(made: Path) -> None:
    (made / "out").write_bytes(b"previous install")
    with pytest.raises(DeltaBaseError):
        apply_delta(made / "new", made / "patch", made / "out")
    assert (made / "out").read_bytes() == b"previous install"


@pytest.mark.parametrize("where", ["magic", "header", "body-start", "body-middle", "body-end"])
def test_corrupt_patch_is_refused(made: Path, where: str) -> None:
    patch = bytearray((made / "patch").read_bytes())
    pos = {"magic": 0, "header": 20, "body-start": HEADER_SIZE + 1,
           "body-middle": (HEADER_SIZE + len(patch)) // 2, "body-end": len(patch) - 1}[where]
    patch[pos] ^= 0x40
    (made / "patch").write_bytes(bytes(patch))
    with pytest.raises(DeltaFormatError):
        apply_delta(made / "old", made / "patch", made / "out")
    _only_inputs_left(made)


@pytest.mark.parametrize("keep", [0, 5, 40, HEADER_SIZE, HEADER_SIZE + 10, -1])
def test_truncated_patch_is_refused(made: Path, keep: int) -> None:
    patch = (made / "patch").read_bytes()
    (made / "patch").write_bytes(patch[:keep] if keep >= 0 else patch[:keep])
    with pytest.raises(DeltaFormatError) as err:
        apply_delta(made / "old", made / "patch", made / "out")
    if keep >= HEADER_SIZE or keep < 0:
        assert isinstance(err.value, DeltaTruncatedError)
    _only_inputs_left(made)


def test_unknown_version_is_refused(made: Path) -> None:
    patch = bytearray((made / "patch").read_bytes())
    struct.pack_into("<H", patch, 8, FORMAT_VERSION + 1)
    (made / "patch").write_bytes(bytes(patch))
    with pytest.raises(DeltaVersionError, match=f"version {FORMAT_VERSION + 1}"):
        apply_delta(made / "old", made / "patch", made / "out")
    with pytest.raises(DeltaVersionError):
        read_delta_header(made / "patch")
    _only_inputs_left(made)


def test_unexpected_result_hash_is_refused(made: Path) -> None:
    with pytest.raises(DeltaResultError):
        apply_delta(made / "old", made / "patch", made / "out", expected_sha256="0" * 64)
    _only_inputs_left(made)


def _forge(old: bytes, body: bytes, result: bytes, version: int = 1) -> bytes:
    """A patch whose checksums are all valid but whose records are hostile."""
    head = struct.pack("<8sHHQ32sQ32sQ32s", b"\x89EWDLT\r\n", version, 0, len(old),
                       hashlib.sha256(old).digest(), len(result),
                       hashlib.sha256(result).digest(), len(body), hashlib.sha256(body).digest())
    return head + struct.pack("<I", zlib.crc32(head)) + body


@pytest.mark.parametrize("body", [
    bytes([0, 0, 1, 0x80, 0x80, 0x04, 5, 0]),  # copy past the end of the base
    bytes([0, 0, 9, 0]),  # unknown record type
    bytes([0, 0, 3, 1, 4, 0, 0xFF, 0xFF, 0xFF, 0x7F]),  # planes piece over the size limit
    bytes([0, 0, 1, 0, 5, 1, 0, 5, 0]),  # more bytes than the header's result size
    bytes([0, 0, 1, 0, 2]),  # no end record
    bytes([0, 0, 3, 0, 1, 4, 1, 4]) + b"\x28\xb5\x2f\xfd\x00",  # zstd frame cut short
])
def test_forged_records_are_refused(tmp_path: Path, body: bytes) -> None:
    old = b"0123456789" * 10
    result = old[:5]
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "patch").write_bytes(_forge(old, body, result))
    with pytest.raises(DeltaFormatError):
        apply_delta(tmp_path / "old", tmp_path / "patch", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "patch"]


def test_forged_patch_cannot_produce_other_bytes(tmp_path: Path) -> None:
    old = b"0123456789" * 10
    body = bytes([0, 0, 1, 0, 5, 0])  # copy old[0:5] = b"01234" while promising b"56789"
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "patch").write_bytes(_forge(old, body, b"56789"))
    with pytest.raises(DeltaResultError):
        apply_delta(tmp_path / "old", tmp_path / "patch", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_header_reads_without_decoding(made: Path) -> None:
    info = read_delta_header(made / "patch")
    assert info.base_sha256 == hashlib.sha256((made / "old").read_bytes()).hexdigest()
    assert info.result_sha256 == hashlib.sha256((made / "new").read_bytes()).hexdigest()
    assert info.result_size == (made / "new").stat().st_size
    assert info.patch_size == (made / "patch").stat().st_size


def test_not_a_patch(tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(b"x")
    (tmp_path / "patch").write_bytes(b"PK\x03\x04 definitely a zip file" * 10)
    with pytest.raises(DeltaFormatError, match="not an edgewise delta"):
        apply_delta(tmp_path / "old", tmp_path / "patch", tmp_path / "out")


def test_errors_share_the_artifacts_root() -> None:
    for cls in (DeltaBaseError, DeltaFormatError, DeltaTruncatedError, DeltaVersionError,
                DeltaResultError):
        assert issubclass(cls, DeltaError) and issubclass(cls, ArtifactError)


def test_delta_package_does_not_import_ml_server_agent() -> None:
    import subprocess
    import sys

    code = ("import sys, edgewise.artifacts.delta as d\n"
            "bad = [m for m in sys.modules if m.startswith(('edgewise.ml', 'edgewise.server', "
            "'edgewise.agent', 'torch', 'onnx'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_onnx_external_data_file_is_coded_as_floats(tmp_path: Path) -> None:
    """Weights stored beside the graph (ONNX external data) are a flat float file: the generic
    codec still diffs it as fp32 when the layout did not move."""
    import zstandard

    rng = np.random.default_rng(6)
    w = rng.normal(scale=0.05, size=(3 << 20) // 4).astype(np.float32)
    old, new = w.tobytes(), fine_tune(w, rng).tobytes()
    info = roundtrip(tmp_path, old, new, level=3)
    assert info.layout == "opaque"
    assert "planes-fsub" in info.methods
    assert info.patch_size < 0.75 * len(zstandard.ZstdCompressor(level=19).compress(new))


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1,
                      max_size=4))
def test_fuzzed_records_fail_cleanly(tmp_path: Path, model_pair, flips) -> None:
    """Checksums re-forged around a mutated body: only DeltaErrors, never a crash or output."""
    old, new = model_pair
    d = tmp_path / "fuzz"
    d.mkdir(exist_ok=True)
    (d / "old").write_bytes(old)
    (d / "new").write_bytes(new)
    if not (d / "good").exists():
        encode_delta(d / "old", d / "new", d / "good", level=1)
    good = (d / "good").read_bytes()
    body = bytearray(good[HEADER_SIZE:])
    for pos, mask in flips:
        body[pos % len(body)] ^= mask
    version = read_delta_header(d / "good").version
    (d / "patch").write_bytes(_forge(old, bytes(body), new, version))
    try:
        apply_delta(d / "old", d / "patch", d / "out")
    except DeltaError:
        assert not (d / "out").exists()
    else:  # a harmless flip (e.g. in unused padding) must still give the exact file
        assert (d / "out").read_bytes() == new
        (d / "out").unlink()
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


# --- bit-length coding (format v2) -------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5000), alphabet=st.integers(1, 256), seed=st.integers(0, 2**32 - 1))
def test_rans_roundtrip(n: int, alphabet: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sym = rng.choice(alphabet, size=n, p=rng.dirichlet(np.full(alphabet, 0.5))).astype(np.uint8)
    freqs = quantize_freqs(np.bincount(sym))
    lanes = choose_lanes(n)
    data = rans_encode(sym, freqs, lanes)
    assert np.array_equal(rans_decode(data, n, freqs, lanes), sym)


def test_rans_codes_close_to_the_entropy() -> None:
    rng = np.random.default_rng(1)
    n = 200_000
    sym = rng.choice(40, size=n, p=rng.dirichlet(np.full(40, 0.3))).astype(np.uint8)
    counts = np.bincount(sym)
    seen = counts[counts > 0]
    entropy_bytes = -(seen * np.log2(seen / n)).sum() / 8
    freqs = quantize_freqs(counts)
    data = rans_encode(sym, freqs, choose_lanes(n))
    assert len(data) < 1.01 * entropy_bytes + 4 * choose_lanes(n)


def test_rans_refuses_corrupt_streams() -> None:
    rng = np.random.default_rng(2)
    sym = rng.choice(8, size=20_000, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.01, 0.01]
                     ).astype(np.uint8)
    freqs = quantize_freqs(np.bincount(sym))
    lanes = choose_lanes(len(sym))
    data = rans_encode(sym, freqs, lanes)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x5A
    bad_freqs = freqs.copy()
    bad_freqs[0] += 1
    for args in [(bytes(flipped), lanes, freqs), (data[:-2], lanes, freqs),
                 (data + b"\0\0", lanes, freqs), (data, lanes + 1, freqs),
                 (data, lanes, bad_freqs), (b"\0" * len(data), lanes, freqs)]:
        with pytest.raises(DeltaFormatError):
            rans_decode(args[0], len(sym), args[2], args[1])


@settings(max_examples=80, deadline=None)
@given(kind=st.sampled_from([(4, 23), (2, 10), (2, 7)]), data=st.data())
def test_bit_length_coding_is_exact_for_any_bit_patterns(kind: tuple[int, int], data) -> None:
    elem, mantissa = kind
    n = data.draw(st.integers(1, 300)) * elem
    old = data.draw(st.binary(min_size=n, max_size=n))
    new = data.draw(st.binary(min_size=n, max_size=n))
    if data.draw(st.booleans()):  # mostly near values, as after training
        new = bytes(a if i % 7 else b for i, (a, b) in enumerate(zip(old, new, strict=True)))
    z = apply_transform(T_FSUB, old, new, elem).view(np.uint16 if elem == 2 else np.uint32)
    code = encode_bits(z, old, elem, mantissa)
    if code is not None:  # None: residuals too wide for the alphabet, another coding is used
        assert np.array_equal(decode_bits(code, old, elem, mantissa), z)


def _adam_like(w: np.ndarray, rng: np.random.Generator, lr: float = 1e-4) -> np.ndarray:
    # Adam moves every weight by up to steps * lr whatever its size.
    return (w - lr * rng.uniform(-4, 4, size=w.shape)).astype(w.dtype)


def test_dense_fine_tune_is_coded_by_bit_length(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    old = {"conv.weight": rng.normal(scale=0.05, size=(128, 64, 3, 3)).astype(np.float32),
           "emb.weight": rng.normal(scale=0.1, size=(512, 64)).astype(np.float16),
           "fc.bias": np.zeros(10, dtype=np.float32)}
    new = {"conv.weight": _adam_like(old["conv.weight"], rng),
           "emb.weight": _adam_like(old["emb.weight"], rng, lr=1e-3),
           "fc.bias": old["fc.bias"]}
    info = roundtrip(tmp_path, safetensors_bytes(old), safetensors_bytes(new))
    assert info.version == 2
    dense = old["conv.weight"].nbytes + old["emb.weight"].nbytes
    assert info.methods["bits-fsub"]["in_bytes"] == dense
    # Below the byte planes' size for the same residuals (what version 1 would send).
    from edgewise.artifacts.delta._encode import _planes_record

    planes = sum(len(_planes_record(T_FSUB | 0x80, old[k].itemsize, 0, new[k].tobytes(),
                                    old[k].tobytes(), 19))
                 for k in ("conv.weight", "emb.weight"))
    assert info.methods["bits-fsub"]["out_bytes"] < 0.98 * planes


def test_patch_without_bit_length_records_stays_version_1(tmp_path: Path, model_pair) -> None:
    old, _ = model_pair
    rng = np.random.default_rng(4)
    new = safetensors_bytes({"fc.weight": rng.normal(size=(10, 64)).astype(np.float32)})
    info = roundtrip(tmp_path, old, new)
    assert "bits-fsub" not in info.methods
    assert info.version == 1 == read_delta_header(tmp_path / "patch").version


def test_bit_length_record_in_a_version_1_patch_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    w = rng.normal(scale=0.05, size=50_000).astype(np.float32)
    old, new = safetensors_bytes({"w": w}), safetensors_bytes({"w": _adam_like(w, rng)})
    roundtrip(tmp_path, old, new)
    body = (tmp_path / "patch").read_bytes()[HEADER_SIZE:]
    (tmp_path / "forged").write_bytes(_forge(old, body, new, version=1))
    with pytest.raises(DeltaFormatError, match="unknown record type 5"):
        apply_delta(tmp_path / "old", tmp_path / "forged", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def _bits_patch_body(old_w: np.ndarray, **changes) -> tuple[bytes, bytes]:
    """(body, result) of a patch holding one BITS record for old_w -> an Adam-like step,
    with the record's fields replaced by `changes` (lo, freqs, lanes, symbols, raw; or
    raw_extra: one raw byte more than the record needs)."""
    from edgewise.artifacts.delta._format import put_varint

    rng = np.random.default_rng(7)
    new_w = _adam_like(old_w, rng)
    old, new = old_w.tobytes(), new_w.tobytes()
    z = apply_transform(T_FSUB, old, new, 4).view(np.uint32)
    code = encode_bits(z, old, 4, 23)
    fields = {"lo": code.lo, "freqs": list(code.freqs), "lanes": code.lanes,
              "symbols": code.symbols, "raw": code.raw, **changes}
    if fields.pop("raw_extra", False):
        fields["raw"] += b"\0"
    body = bytearray([0, 0, 5, T_FSUB, 4, 23])
    for value in (0, len(new), fields["lo"], len(fields["freqs"]), *fields["freqs"],
                  fields["lanes"], len(fields["symbols"])):
        put_varint(body, int(value))
    body += fields["symbols"]
    put_varint(body, len(fields["raw"]))
    body += fields["raw"] + b"\0"
    return bytes(body), new


@pytest.mark.parametrize("change", [
    {},  # the untouched record decodes (the forged-patch machinery is right)
    {"freqs": [2**63]},  # would overflow int64
    {"freqs": [2**63 - 1, 2**63 - 1, 2**14 + 2]},  # would wrap to a valid-looking sum
    {"freqs": []},
    {"freqs": [0, 1 << 14]},  # every symbol decodes as 1: not a length
    {"lo": 200},  # lengths beyond 32 bits
    {"lanes": 1},  # a valid stream would need the encoder's lane count
    {"raw": b""},  # raw bits missing
    {"raw_extra": True},
    {"symbols": b"\xff" * 40_000},  # longer than any stream for these elements
])
def test_hostile_bit_length_records_are_refused(tmp_path: Path, change: dict) -> None:
    rng = np.random.default_rng(8)
    old_w = rng.normal(scale=0.05, size=70_000).astype(np.float32)
    body, new = _bits_patch_body(old_w, **change)
    (tmp_path / "old").write_bytes(old_w.tobytes())
    (tmp_path / "patch").write_bytes(_forge(old_w.tobytes(), body, new, version=2))
    if not change:
        apply_delta(tmp_path / "old", tmp_path / "patch", tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == new
        return
    with pytest.raises(DeltaFormatError):
        apply_delta(tmp_path / "old", tmp_path / "patch", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "patch"]
