"""Shared fixtures: tiny real ONNX bundles, real keys, a real server process, real agents."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgewise.artifacts import Preprocessing, write_bundle
from edgewise.trust import CertPaths, KeyPaths, init_certs, init_keys

LABELS = ("zero", "one", "two")
PRE = Preprocessing(input_size=(4, 4), channels=1, mean=(0.5,), std=(0.25,))


def tiny_onnx(weights: np.ndarray) -> bytes:
    """A real ONNX classifier: flatten a 1x4x4 input, multiply by `weights` (16x3)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weights.astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_tiny_bundle(out: Path, *, name: str = "tiny", version: str = "1.0.0",
                     broken: bool = False, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(16, 3)).astype(np.float32)
    inputs = rng.normal(size=(6, 1, 4, 4)).astype(np.float32)
    outputs = inputs.reshape(6, 16) @ weights
    shipped = weights[:, ::-1].copy() if broken else weights  # broken: classes swapped
    write_bundle(out, name=name, version=version, labels=LABELS, preprocessing=PRE,
                 model=tiny_onnx(shipped), golden_inputs=inputs, golden_outputs=outputs,
                 atol=1e-3, max_latency_ms=1000,
                 extra_files={"MODEL_CARD.md": b"# tiny\nA test model.\n"})
    return out


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Callable[..., Path]:
    def make(version: str = "1.0.0", *, broken: bool = False, name: str = "tiny") -> Path:
        return make_tiny_bundle(tmp_path / f"bundle-{name}-{version}", name=name,
                                version=version, broken=broken)

    return make


@pytest.fixture
def keys(tmp_path: Path) -> KeyPaths:
    return init_keys(tmp_path / "keys")


@pytest.fixture
def certs(tmp_path: Path) -> CertPaths:
    return init_certs(tmp_path / "certs", hostnames=["127.0.0.1", "localhost"])


@dataclass
class LiveServer:
    url: str
    admin_token: str
    keys: KeyPaths
    data_dir: Path
    process: object
    ca: Path

    def client(self):
        from edgewise.server.client import OperatorClient

        return OperatorClient(self.url, token=self.admin_token, verify=str(self.ca))

    def publish(self, bundle: Path, *, assign: bool = True) -> dict:
        from edgewise.server.client import publish_bundle

        with self.client() as c:
            release = publish_bundle(c, bundle, root_path=self.keys.root_json,
                                     targets_key_path=self.keys.targets_key)
            if assign:
                c.assign(release["id"])
        return release


@pytest.fixture
def live_server(tmp_path: Path, keys: KeyPaths, certs: CertPaths) -> Iterator[LiveServer]:
    """A real server process over TLS (private CA, pinned by agents and operators)."""
    from edgewise.sim import ServerProcess

    token = secrets.token_urlsafe(24)
    proc = ServerProcess(data_dir=tmp_path / "server", root_path=keys.root_json,
                         online_key_path=keys.online_key, admin_token=token,
                         rollout_tick_s=0.3, tls_cert=certs.server_cert, tls_key=certs.server_key,
                         ca_path=certs.ca_cert, log_path=tmp_path / "server.log").start()
    try:
        yield LiveServer(url=proc.url, admin_token=token, keys=keys,
                         data_dir=tmp_path / "server", process=proc, ca=certs.ca_cert)
    finally:
        proc.stop()


@pytest.fixture
def enroll_agent(tmp_path: Path, live_server: LiveServer) -> Callable[[str], Path]:
    from edgewise.agent import enroll

    def make(name: str = "dev", *, tags: list[str] | None = None, timezone: str = "UTC") -> Path:
        with live_server.client() as c:
            token = c.create_enrollment_token()
        state = tmp_path / f"agent-{name}"
        enroll(state, server_url=live_server.url, token=token,
               root_path=live_server.keys.root_json, name=name, hardware="test",
               tags=tags, timezone=timezone, ca_path=live_server.ca)
        return state

    return make


def device_auth(state: Path):
    """(device id, httpx auth signing as that enrolled agent's key): tests talk as the device."""
    from edgewise.agent import StateDir
    from edgewise.trust import DeviceAuth

    paths = StateDir(state)
    identity = paths.load_identity()
    return identity.device_id, DeviceAuth(identity.device_id, paths.device_key())


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory):
    """A docker daemon of the test session's own (`tests._apps.PrivateDockerd`), started at
    first use and stopped at the end. Skipped where docker cannot run (a failure in CI)."""
    from tests._apps import start_private_dockerd

    daemon = start_private_dockerd(tmp_path_factory.mktemp("dockerd"))
    try:
        yield daemon
    finally:
        daemon.stop()


ADMIN = secrets.token_urlsafe(24)  # the in-process app's admin token


@pytest.fixture
def api(tmp_path: Path, keys: KeyPaths):
    """The server app in-process (TestClient, an httpx client), admin token `ADMIN`."""
    from fastapi.testclient import TestClient

    from edgewise.server.app import ServerConfig, create_app

    app = create_app(ServerConfig(data_dir=tmp_path / "srv", root_path=keys.root_json,
                                  online_key_path=keys.online_key, admin_token=ADMIN))
    with TestClient(app) as client:
        yield client
