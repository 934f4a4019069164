"""Delta updates wired into the update path: made at publish from what devices run, signed
by the online `deltas` role, applied by the agent and checked against the offline-signed
hash; a bad delta falls back to the full file; downloads resume after a dropped connection."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from tuf.api import exceptions as tuf_exc

from edgewise.agent import agent_status
from edgewise.artifacts import Preprocessing, write_bundle
from edgewise.artifacts.delta import READABLE_VERSIONS, apply_delta, read_delta_header
from edgewise.trust import HttpxFetcher, client_tls
from tests.test_e2e_update import run_once

PRE = Preprocessing(input_size=(64, 64), channels=1, mean=(0.5,), std=(0.25,))


def weighty_bundle(out: Path, version: str, *, tweak: float = 0.0, dense: int = 0) -> Path:
    """A 4096x3 linear model (48 KiB of weights plus a 256 KiB unused-looking tensor) whose
    later versions nudge a few weights, like a short fine-tune (`tweak`), or move every
    weight a little, like a dense one (`dense`: the number of such fine-tunes applied)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4096, 3)).astype(np.float32)
    emb = rng.normal(size=(256, 256)).astype(np.float32)
    if tweak:
        w[:64] += tweak
        emb[:8] += tweak
    for step in range(dense):
        moves = np.random.default_rng(100 + step)
        w += moves.normal(scale=1e-3, size=w.shape).astype(np.float32)
        emb += moves.normal(scale=1e-3, size=emb.shape).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "W"], ["logits0"]),
         helper.make_node("ReduceMean", ["E"], ["e"], keepdims=0),
         helper.make_node("Mul", ["logits0", "zero"], ["logits1"]),
         helper.make_node("Add", ["logits1", "logits0"], ["logits"])],
        "weighty",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(emb, "E"),
         numpy_helper.from_array(np.zeros((1,), np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    inputs = rng.normal(size=(4, 1, 64, 64)).astype(np.float32)
    outputs = inputs.reshape(4, -1) @ w
    write_bundle(out, name="weighty", version=version, labels=("a", "b", "c"),
                 preprocessing=PRE, model=model.SerializeToString(), golden_inputs=inputs,
                 golden_outputs=outputs, atol=1e-2, max_latency_ms=1000,
                 extra_files={"MODEL_CARD.md": b"# weighty\n" + b"unchanged text\n" * 4096})
    return out


def download_stats(state: Path, version: str) -> dict:
    history = agent_status(state)["history"]
    assert history[-1]["state"] == "committed"
    # The agent reported it; the server's event log has the same figures.
    return next(e for e in reversed(json.loads((state / "state.json").read_text())["history"])
                if e["event"] == "downloaded")


@pytest.mark.slow
def test_second_release_arrives_as_a_delta_and_bad_deltas_fall_back(
        live_server, enroll_agent, tmp_path: Path) -> None:
    a = enroll_agent("a")
    live_server.publish(weighty_bundle(tmp_path / "v1", "1.0.0"))
    assert run_once(a, tmp_path) == 0
    v2 = live_server.publish(weighty_bundle(tmp_path / "v2", "2.0.0", tweak=0.01))
    made = {m["file"]: m for m in v2["deltas"]}
    assert made["model.onnx"]["delta_bytes"] < made["model.onnx"]["full_bytes"] / 2

    assert run_once(a, tmp_path) == 0
    status = agent_status(a)
    assert (status["state"], status["release"]) == ("committed", "weighty@2.0.0")
    with live_server.client() as c:
        device_id = json.loads((a / "identity.json").read_text())["device_id"]
        downloaded = [e for e in c.events(device_id=device_id) if e["kind"] == "downloaded"]
    stats = downloaded[-1]["detail"]["download"]
    assert stats["delta_files"] == len(made) and stats["delta_fallbacks"] == 0
    # The agent said which patch formats it reads; the server keeps it with the device.
    with live_server.client() as c:
        device = next(d for d in c.devices() if d["id"] == device_id)
    assert device["status"]["delta_versions"] == list(READABLE_VERSIONS)
    assert stats["sent_bytes"] < stats["full_bytes"] / 2
    assert stats["reused_files"] == 1  # the unchanged model card: copied locally, not sent

    # A device without the base takes full files.
    b = enroll_agent("b")
    with live_server.client() as c:
        c.assign(v2["id"])
    assert run_once(b, tmp_path) == 0
    with live_server.client() as c:
        device_id = json.loads((b / "identity.json").read_text())["device_id"]
        stats_b = [e for e in c.events(device_id=device_id)
                   if e["kind"] == "downloaded"][-1]["detail"]["download"]
    assert stats_b["delta_files"] == 0 and stats_b["sent_bytes"] == stats_b["full_bytes"]
    assert stats_b["reused_files"] == 0

    # v3's delta is corrupted on the server's disk: refused, the full file is used instead.
    v3 = live_server.publish(weighty_bundle(tmp_path / "v3", "3.0.0", tweak=0.02))
    with live_server.client() as c:
        releases = {r["id"]: r for r in c.releases()}
    delta_meta = json.loads(max((live_server.data_dir / "tuf" / "metadata").glob(
        "*.deltas.json"), key=lambda p: int(p.name.split(".")[0])).read_text())
    v3_sha = releases[v3["id"]]["manifest"]["files"]["model.onnx"]["sha256"]
    for path, info in delta_meta["signed"]["targets"].items():
        if path.startswith(f"deltas/{v3_sha}."):
            obj = live_server.data_dir / "tuf" / "objects" / info["hashes"]["sha256"]
            data = bytearray(obj.read_bytes())
            data[len(data) // 2] ^= 0xFF
            obj.write_bytes(bytes(data))
    assert run_once(a, tmp_path) == 0
    assert agent_status(a)["release"] == "weighty@3.0.0"
    with live_server.client() as c:
        device_id = json.loads((a / "identity.json").read_text())["device_id"]
        stats = [e for e in c.events(device_id=device_id)
                 if e["kind"] == "downloaded"][-1]["detail"]["download"]
    assert stats["delta_fallbacks"] == 1  # model.onnx: corrupted delta refused
    assert stats["delta_files"] == len(v3["deltas"]) - 1


def _publisher(api, keys, tmp_path: Path):
    """publish(version, dense): a weighty bundle published in-process; the release."""
    from edgewise.server.client import publish_bundle
    from tests.test_server_api import _operator

    def publish(version: str, dense: int) -> dict:
        return publish_bundle(_operator(api), weighty_bundle(tmp_path / version, version,
                                                             dense=dense),
                              root_path=keys.root_json, targets_key_path=keys.targets_key)
    return publish


def _said_versions(api) -> list:
    """Every device's stored delta_versions (None where never said), in a stable order."""
    from edgewise.server.devices.models import Device

    with api.app.state.ctx.sessions() as session:
        said = [d.status.get("delta_versions") for d in session.query(Device).all()]
    return sorted(said, key=str)


def _report_running(api, creds, release_id: str, **extra) -> None:
    body = {"state": "committed", "event": "committed", "release_id": release_id, **extra}
    assert api.post("/api/v1/device/reports", auth=creds, json=body).status_code == 204


def test_patch_format_suits_every_device_on_the_base(api, keys, tmp_path: Path) -> None:
    """Agents say which delta formats they read; a base with any agent that never said (an
    older agent) gets version 1 patches, which every agent reads."""
    from tests.test_server_api import admin, enroll

    publish = _publisher(api, keys, tmp_path)

    def deltas(release: dict) -> dict[str, dict]:
        return {m["base_release_id"]: m for m in release["deltas"] if m["file"] == "model.onnx"}

    v1 = publish("1.0.0", 0)
    _, new_agent = enroll(api, "new")
    _report_running(api, new_agent, v1["id"], delta_versions=[1, 2, 99])
    gone_id, gone = enroll(api, "gone")  # an old agent, revoked: it gets nothing any more
    _report_running(api, gone, v1["id"])
    assert api.post(f"/api/v1/devices/{gone_id}/revoke",
                    headers=admin(api)).status_code == 200
    v2 = publish("2.0.0", 1)  # every weight moved: the bit-length coding of format 2 pays
    assert deltas(v2)[v1["id"]]["format_version"] == 2

    _, old_agent = enroll(api, "old")
    _report_running(api, old_agent, v1["id"])  # an agent that predates delta_versions
    _report_running(api, new_agent, v2["id"], delta_versions=[1, 2])
    v3 = publish("3.0.0", 2)
    made = deltas(v3)
    assert made[v1["id"]]["format_version"] == 1 and made[v2["id"]]["format_version"] == 2

    # The version 1 patch is what the TUF metadata signs, and it rebuilds v3's model.
    srv = tmp_path / "srv" / "tuf"
    meta = json.loads(max((srv / "metadata").glob("*.deltas.json"),
                          key=lambda p: int(p.name.split(".")[0])).read_text())
    files = {r["id"]: r["manifest"]["files"]["model.onnx"] for r in (v1, v3)}
    target = meta["signed"]["targets"][f"deltas/{files[v3['id']]['sha256']}."
                                       f"{files[v1['id']]['sha256']}"]
    assert target["custom"]["format_version"] == 1
    patch = srv / "objects" / target["hashes"]["sha256"]
    assert read_delta_header(patch).version == 1
    apply_delta(srv / "objects" / files[v1["id"]]["sha256"], patch, tmp_path / "rebuilt",
                expected_sha256=files[v3["id"]]["sha256"])

    # A report without the field keeps what the agent said before.
    _report_running(api, new_agent, v2["id"])
    assert _said_versions(api) == [None, None, [1, 2]]

    # The field only advises: junk in it is ignored and never costs the report.
    _report_running(api, new_agent, v2["id"], delta_versions=[0, 5000, "2", 2.5, None, 1])
    _report_running(api, new_agent, v2["id"], delta_versions="all of them")
    _report_running(api, new_agent, v2["id"], delta_versions=list(range(1, 100)))
    assert _said_versions(api) == [None, None, list(range(1, 17))]


def test_a_patch_two_bases_share_suits_the_devices_of_both(api, keys, tmp_path: Path) -> None:
    """Two releases with the same model file share one patch path: it is made in the format
    the older agent reads, whichever base comes first."""
    from tests.test_server_api import enroll

    publish = _publisher(api, keys, tmp_path)
    bases = sorted([publish("1.0.0", 0), publish("1.0.1", 0)], key=lambda r: r["id"])
    model = {r["manifest"]["files"]["model.onnx"]["sha256"] for r in bases}
    assert len(model) == 1
    # The base first by id has the agent that reads v2, the later one an old agent.
    _, new_agent = enroll(api, "new")
    _report_running(api, new_agent, bases[0]["id"], delta_versions=[1, 2])
    _, old_agent = enroll(api, "old")
    _report_running(api, old_agent, bases[1]["id"])
    v2 = publish("2.0.0", 1)
    made = [m for m in v2["deltas"] if m["file"] == "model.onnx"]
    assert [m["format_version"] for m in made] == [1]


def test_server_honours_range_requests(live_server, tmp_path: Path) -> None:
    release = live_server.publish(weighty_bundle(tmp_path / "v1", "1.0.0"), assign=False)
    sha = release["manifest"]["files"]["model.onnx"]["sha256"]
    url = f"{live_server.url}/tuf/targets/weighty/1.0.0/{sha}.model.onnx"
    with httpx.Client(verify=client_tls(live_server.ca)) as http:
        full = http.get(url)
        part = http.get(url, headers={"Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == full.content[1000:]


def test_fetcher_resumes_after_a_dropped_connection(tmp_path: Path) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    seen_ranges: list[str | None] = []

    class Dropping(httpx.SyncByteStream):
        def __iter__(self):
            yield body[:300_000]
            raise httpx.ReadError("connection reset by peer")

    def handler(request: httpx.Request) -> httpx.Response:
        seen_ranges.append(request.headers.get("Range"))
        if len(seen_ranges) == 1:
            return httpx.Response(200, stream=Dropping())
        start = int(request.headers["Range"].removeprefix("bytes=").rstrip("-"))
        return httpx.Response(206, content=body[start:])

    fetcher = HttpxFetcher(httpx.Client(transport=httpx.MockTransport(handler)),
                           partial_dir=tmp_path / "partial")
    url = "https://server/tuf/targets/m/1/abc.model.onnx"
    with pytest.raises(tuf_exc.DownloadError, match="resume"):
        b"".join(fetcher.fetch(url))
    assert b"".join(fetcher.fetch(url)) == body
    assert seen_ranges == [None, "bytes=300000-"]
    assert not list((tmp_path / "partial").iterdir())  # nothing left once complete
