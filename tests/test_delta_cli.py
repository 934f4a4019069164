"""`edgewise delta create|apply|info`: the thin CLI, its errors, and nothing written on error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgewise.cli import app

from .test_delta import fine_tune, safetensors_bytes

runner = CliRunner()


@pytest.fixture
def files(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = rng.normal(scale=0.05, size=(128, 64)).astype(np.float32)
    (tmp_path / "v1.safetensors").write_bytes(safetensors_bytes({"w": w}))
    (tmp_path / "v2.safetensors").write_bytes(safetensors_bytes({"w": fine_tune(w, rng)}))
    return tmp_path


def _invoke(*args: object):
    return runner.invoke(app, ["delta", *map(str, args)])


def test_create_then_apply(files: Path) -> None:
    made = _invoke("create", files / "v1.safetensors", files / "v2.safetensors",
                   "-o", files / "p.delta")
    assert made.exit_code == 0, made.output
    info = json.loads(made.stdout.strip().splitlines()[-1])
    assert info["layout"] == "safetensors" and "bits-fsub" in info["methods"]
    assert info["version"] == 2  # the bit-length records need format v2

    shown = _invoke("info", files / "p.delta")
    assert shown.exit_code == 0
    assert json.loads(shown.stdout)["result_sha256"] == info["result_sha256"]

    applied = _invoke("apply", files / "v1.safetensors", files / "p.delta", "-o", files / "out",
                      "--sha256", info["result_sha256"])
    assert applied.exit_code == 0, applied.output
    assert (files / "out").read_bytes() == (files / "v2.safetensors").read_bytes()


def test_format_version_1_for_old_decoders(files: Path) -> None:
    made = _invoke("create", files / "v1.safetensors", files / "v2.safetensors",
                   "-o", files / "p1.delta", "--format-version", 1)
    assert made.exit_code == 0, made.output
    info = json.loads(made.stdout.strip().splitlines()[-1])
    assert info["version"] == 1 and not any(m.startswith("bits") for m in info["methods"])
    applied = _invoke("apply", files / "v1.safetensors", files / "p1.delta", "-o", files / "out")
    assert applied.exit_code == 0, applied.output
    assert (files / "out").read_bytes() == (files / "v2.safetensors").read_bytes()

    bad = _invoke("create", files / "v1.safetensors", files / "v2.safetensors",
                  "-o", files / "p9.delta", "--format-version", 9)
    assert bad.exit_code == 1 and "--format-version must be one of 1, 2" in bad.output
    assert not (files / "p9.delta").exists()


def test_apply_errors_write_nothing(files: Path) -> None:
    assert _invoke("create", files / "v1.safetensors", files / "v2.safetensors",
                   "-o", files / "p.delta").exit_code == 0
    wrong = _invoke("apply", files / "v2.safetensors", files / "p.delta", "-o", files / "out")
    assert wrong.exit_code == 1
    assert "wrong base" in wrong.output and "nothing written" in wrong.output

    raw = (files / "p.delta").read_bytes()
    (files / "cut.delta").write_bytes(raw[: len(raw) // 2])
    cut = _invoke("apply", files / "v1.safetensors", files / "cut.delta", "-o", files / "out")
    assert cut.exit_code == 1 and "truncated" in cut.output

    bad = bytearray(raw)
    bad[-3] ^= 0xFF
    (files / "bad.delta").write_bytes(bytes(bad))
    corrupt = _invoke("apply", files / "v1.safetensors", files / "bad.delta", "-o", files / "out")
    assert corrupt.exit_code == 1 and "corrupt" in corrupt.output

    newer = bytearray(raw)
    newer[8] = 7
    (files / "v7.delta").write_bytes(bytes(newer))
    version = _invoke("apply", files / "v1.safetensors", files / "v7.delta", "-o", files / "out")
    assert version.exit_code == 1 and "version 7" in version.output

    hashed = _invoke("apply", files / "v1.safetensors", files / "p.delta", "-o", files / "out",
                     "--sha256", "ab" * 32)
    assert hashed.exit_code == 1
    assert not (files / "out").exists()
    assert not [p for p in files.iterdir() if p.name.startswith(".")]  # no temp files left


def test_missing_inputs_and_bad_output(files: Path) -> None:
    missing = _invoke("create", files / "nope", files / "v2.safetensors", "-o", files / "p")
    assert missing.exit_code == 1 and "does not exist" in missing.output
    no_dir = _invoke("create", files / "v1.safetensors", files / "v2.safetensors",
                     "-o", files / "no" / "such" / "dir" / "p")
    assert no_dir.exit_code == 1 and "does not exist" in no_dir.output
    clobber = _invoke("create", files / "v1.safetensors", files / "v2.safetensors",
                      "-o", files / "v1.safetensors")
    assert clobber.exit_code == 1 and "overwrite" in clobber.output
    assert not (files / "p").exists()
