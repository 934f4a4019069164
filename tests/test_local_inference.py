"""Private inference on the device: CLI and localhost API, both on the active slot."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from edgewise.agent import AgentConfigError, LocalApi, LocalModel, NoModelError
from edgewise.sim import edgewise_command
from tests.conftest import LABELS, PRE, make_tiny_bundle
from tests.test_e2e_update import run_once


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def expected_label(bundle: Path, pixels: np.ndarray) -> str:
    import onnxruntime as ort

    x = ((pixels.astype(np.float32) / 255 - PRE.mean[0]) / PRE.std[0])[None, None]
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return LABELS[int(sess.run(None, {"input": x})[0].argmax())]


@pytest.fixture
def installed_agent(live_server, enroll_agent, tmp_path: Path) -> Path:
    state = enroll_agent("local")
    live_server.publish(make_tiny_bundle(tmp_path / "v1"))
    assert run_once(state, tmp_path) == 0
    return state


def test_no_model_yet(tmp_path: Path) -> None:
    with pytest.raises(NoModelError):
        LocalModel(tmp_path / "fresh").predict(png(np.zeros((4, 4))))


def test_predict_cli_and_local_api(installed_agent: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(4, 4))
    image = tmp_path / "x.png"
    image.write_bytes(png(pixels))
    want = expected_label(tmp_path / "v1", pixels)

    result = subprocess.run(edgewise_command("agent", "predict", str(image), "--state",
                                             str(installed_agent)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["label"] == want and answer["release"] == "tiny@1.0.0"

    api = LocalApi(installed_agent, port=0)
    api.start()
    try:
        base = f"http://127.0.0.1:{api.port}"
        r = httpx.post(f"{base}/predict", content=image.read_bytes())
        assert r.status_code == 200 and r.json()["label"] == want
        assert httpx.post(f"{base}/predict", content=b"not an image").status_code == 400
        status = httpx.get(f"{base}/status").json()
        assert status["state"] == "committed" and status["release"] == "tiny@1.0.0"
    finally:
        api.stop()


def test_local_api_refuses_non_loopback(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="loopback"):
        LocalApi(tmp_path, host="0.0.0.0", port=0)


def test_predict_cli_reports_unreadable_image(installed_agent: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    result = subprocess.run(edgewise_command("agent", "predict", str(bad), "--state",
                                             str(installed_agent)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "not a readable image" in result.stderr
