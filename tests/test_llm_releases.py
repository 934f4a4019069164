"""LLM releases end to end: the real SmolLM2 GGUF, real llama.cpp, a real server and agent;
published, verified, installed, health-checked, served over the OpenAI API on loopback, and
a collapsed quantization rolled back by the device itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from edgewise.agent import LocalApi, agent_status
from edgewise.ml.llm import quantize_gguf
from tests._llm import build, smollm2_path
from tests.test_e2e_update import run_once, server_device


def chat(url: str, prompt: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "smollm2", "messages": [{"role": "user", "content": prompt}],
        "temperature": 0, **extra})


def streamed_text(url: str, prompt: str) -> tuple[str, list[dict]]:
    """The answer assembled from server-sent events, as OpenAI's client reads them."""
    chunks, done = [], False
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                continue
            chunks.append(json.loads(line.removeprefix("data: ")))
    assert done
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    return text, chunks


@pytest.mark.slow
def test_llm_release_is_served_then_a_collapsed_quant_rolls_back(
        live_server, enroll_agent, tmp_path: Path) -> None:
    state = enroll_agent("llm")
    build(tmp_path / "v1")
    v1 = live_server.publish(tmp_path / "v1")
    assert run_once(state, tmp_path) == 0
    status = agent_status(state)
    assert (status["state"], status["release"]) == ("committed", "smollm2@1.0.0")
    health = status["last_health"]
    assert health["passed"] and health["golden_passed"] == health["golden_total"] == 3
    assert health["gen_tok_s"] > 0 and health["perplexity"] > 1

    api = LocalApi(state, port=0)
    api.start()
    url = f"http://127.0.0.1:{api.port}"
    try:
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["smollm2"]
        answer = chat(url, "What is the capital of Germany?")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["object"] == "chat.completion" and body["model"] == "smollm2"
        assert "Berlin" in body["choices"][0]["message"]["content"]
        text, chunks = streamed_text(url, "What is the capital of Germany?")
        assert "Berlin" in text and len(chunks) > 3
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        # Bad requests are refused before anything is generated.
        assert chat(url, "hi", model="llama-70b").status_code == 404
        assert chat(url, "hi", max_tokens=0).status_code == 400
        assert httpx.post(f"{url}/v1/chat/completions", content=b"{not json",
                          timeout=10).status_code == 400
        long = chat(url, "word " * 2000)
        assert long.status_code == 400 and "context" in long.json()["error"]["message"]

        # v2: a real llama.cpp Q2_K of the same model (from F16, as `llm quantize` makes it),
        # shipped although it is collapsed.
        f16, q2k = tmp_path / "f16.gguf", tmp_path / "q2k.gguf"
        quantize_gguf(smollm2_path(), f16, "F16")
        quantize_gguf(f16, q2k, "Q2_K")
        v2_dir = tmp_path / "v2"
        build(v2_dir, version="2.0.0", gguf=q2k, require_golden=False)
        v2 = live_server.publish(v2_dir)
        assert run_once(state, tmp_path) == 0
        status = agent_status(state)
        assert (status["state"], status["release"]) == ("rolled-back", "smollm2@1.0.0")
        assert "golden prompts answered wrongly" in status["last_error"]
        device = server_device(live_server, state)
        assert device["state"] == "rolled-back" and device["release_id"] == v1["id"]
        with live_server.client() as c:
            unhealthy = [e for e in c.events(device_id=device["id"])
                         if e["release_id"] == v2["id"] and e["kind"] == "unhealthy"]
        assert unhealthy and unhealthy[0]["detail"]["health"]["golden_passed"] < 3
        # The device still answers, with v1.
        assert [m["release"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()[
            "data"]] == ["smollm2@1.0.0"]
        assert "Berlin" in chat(url, "What is the capital of Germany?").json()[
            "choices"][0]["message"]["content"]
    finally:
        api.stop()


def test_a_device_without_room_for_the_update_keeps_its_release(
        live_server, enroll_agent, tmp_path: Path, tiny_bundle) -> None:
    """Free disk is checked before anything is downloaded (A/B keeps two copies)."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs and needs root (CI runs as root)")
    state_src = enroll_agent("small-disk")
    live_server.publish(tiny_bundle("1.0.0"))
    assert run_once(state_src, tmp_path) == 0
    # The same device, moved onto a 64 MiB disk: v2 (98 MB of GGUF) cannot fit twice.
    small = tmp_path / "small-disk"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        state = small / "agent"
        shutil.copytree(state_src, state)
        build(tmp_path / "llm")
        live_server.publish(tmp_path / "llm")
        assert run_once(state, tmp_path) == 0
        status = agent_status(state)
        assert status["state"] == "failed" and status["release"] == "tiny@1.0.0"
        assert "not enough free disk" in status["last_error"]
        assert not list((state / "downloads").rglob("*.gguf"))  # nothing was fetched
        assert not (state / "partial").exists() or not any((state / "partial").iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_a_device_without_the_ram_refuses_before_downloading(live_server, enroll_agent,
                                                           tmp_path: Path) -> None:
    from edgewise.agent import Agent, AgentConfig

    state = enroll_agent("small-ram")
    manifest = build(tmp_path / "llm")
    release = live_server.publish(tmp_path / "llm")
    agent = Agent(AgentConfig(state_dir=state, ram_limit_mb=manifest.llm.ram_mb - 1))
    try:
        agent.run_cycle()
        status = agent_status(state)
        assert status["state"] == "failed" and "MB of RAM" in status["last_error"]
        assert not (state / "partial").exists() or not any((state / "partial").iterdir())
        agent.run_cycle()  # refused for good: not fetched again
        assert agent.record.attempts == {release["id"]: 1}
    finally:
        agent.close()


class CutOnce(httpx.BaseTransport):
    """The network seam: real requests to the real server, except that the first download of
    `path_suffix` breaks off after `cut_at` bytes (a dropped connection mid-file)."""

    def __init__(self, inner: httpx.BaseTransport, path_suffix: str, cut_at: int) -> None:
        self.inner, self.suffix, self.cut_at = inner, path_suffix, cut_at
        self.cut = False
        self.ranges: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if not request.url.path.endswith(self.suffix):
            return response
        self.ranges.append(request.headers.get("range"))
        if self.cut:
            return response
        self.cut = True
        cut_at, upstream = self.cut_at, response

        class Dropping(httpx.SyncByteStream):
            def __iter__(self):
                sent = 0
                for chunk in upstream.iter_raw():
                    if sent + len(chunk) >= cut_at:
                        yield chunk[: cut_at - sent]
                        upstream.close()
                        raise httpx.ReadError("connection reset by peer")
                    sent += len(chunk)
                    yield chunk

        headers = [(k, v) for k, v in response.headers.raw if k.lower() != b"content-length"]
        return httpx.Response(response.status_code, headers=headers, stream=Dropping(),
                              request=request)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.slow
def test_a_download_of_a_271_mb_gguf_cut_in_the_middle_resumes(live_server, enroll_agent,
                                                                tmp_path: Path) -> None:
    from edgewise.agent import Agent, AgentConfig

    f16 = tmp_path / "smollm2-f16.gguf"  # SmolLM2 as F16: a real GGUF of 271 MB
    quantize_gguf(smollm2_path(), f16, "F16")
    size = f16.stat().st_size
    assert size > 250e6
    build(tmp_path / "f16", gguf=f16)
    f16.unlink()
    state = enroll_agent("resume")
    live_server.publish(tmp_path / "f16")
    transport = CutOnce(httpx.HTTPTransport(verify=str(live_server.ca)), ".model.gguf",
                        cut_at=size // 2)
    agent = Agent(AgentConfig(state_dir=state, transport=transport))
    try:
        agent.run_cycle()
        status = agent_status(state)
        assert status["state"] == "failed" and "connection reset" in status["last_error"]
        partial = list((state / "partial").iterdir())
        assert len(partial) == 1 and partial[0].stat().st_size == size // 2  # progress kept

        agent.run_cycle()
        status = agent_status(state)
        assert (status["state"], status["release"]) == ("committed", "smollm2@1.0.0")
        assert transport.ranges == [None, f"bytes={size // 2}-"]  # only the rest, once
        assert not any((state / "partial").iterdir())
    finally:
        agent.close()


@pytest.mark.slow
def test_an_llm_release_rolls_out_in_stages_as_a_delta(live_server, enroll_agent,
                                                       tmp_path: Path) -> None:
    """v2 changes only the chat template: a staged rollout (canary, then everyone) whose
    devices download kilobytes, check their health with llama.cpp and commit."""
    from edgewise.llm import read_gguf_info
    from edgewise.ml.llm import with_chat_template
    from edgewise.sim import AgentProcess
    from tests.test_rollouts import wait_for

    states = [enroll_agent(f"llm{i}", tags=["site=lab"]) for i in range(2)]
    procs = [AgentProcess(state_dir=s, poll_interval_s=0.5, log_path=tmp_path / f"{s.name}.log")
             .start() for s in states]
    try:
        build(tmp_path / "v1")
        v1 = live_server.publish(tmp_path / "v1")
        template = read_gguf_info(smollm2_path()).chat_template
        with_chat_template(smollm2_path(), tmp_path / "v2.gguf", template.replace(
            "trained by Hugging Face", "trained by Hugging Face. You run privately on this "
            "device."))
        build(tmp_path / "v2", version="2.0.0", gguf=tmp_path / "v2.gguf")
        with live_server.client() as c:
            wait_for(lambda: all(d["state"] == "committed" and d["release_id"] == v1["id"]
                                 for d in c.devices()), "v1 everywhere", timeout_s=300)
            v2 = live_server.publish(tmp_path / "v2", assign=False)
            c.request("POST", "/api/v1/groups", json={"name": "lab", "kind": "dynamic",
                                                      "selector": ["site=lab"]})
            rollout = c.request("POST", "/api/v1/rollouts", json={
                "release_id": v2["id"], "group": "lab", "stages": "canary:1,broad:100%"}).json()
            final = wait_for(lambda: (r := c.request("GET", f"/api/v1/rollouts/{rollout['id']}")
                                      .json())["status"] == "completed" and r, "completion",
                             timeout_s=300)
            assert final["progress"]["committed"] == 2
            transfer = final["transfer"]
            assert transfer["delta_files"] == 2  # the GGUF, once per device
            assert transfer["bytes_sent"] < 0.001 * transfer["bytes_full"]
            assert all(d["release_id"] == v2["id"] for d in c.devices())
    finally:
        for p in procs:
            p.stop()
