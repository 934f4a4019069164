"""Adapter releases on devices, end to end: the real SmolLM2 GGUF, a LoRA adapter fine-tuned
by `edgewise llm finetune`, real llama.cpp, a real server and agent. The device downloads only
the adapter, serves base + adapter through its local chat API without a restart, rolls a broken
adapter back without touching the base, keeps its adapter's base through a failed base update,
and refuses an adapter made for another base before fetching any of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from edgewise.agent import Agent, AgentConfig, LocalApi, agent_status
from edgewise.artifacts import MANIFEST_NAME, GoldenPrompt, file_sha256, validate_bundle
from edgewise.llm import answer_accepted
from tests._llm import GOLDEN, build, smollm2_path
from tests.test_e2e_update import run_once, server_device


@pytest.fixture(scope="session")
def adapter_bundle(tmp_path_factory) -> Path:
    """One real fine-tune per test session (24 steps on made-up product facts, as in
    test_llm_finetune): an adapter bundle for SmolLM2 whose golden prompts the base fails."""
    from edgewise.ml.llm import FinetuneConfig, finetune, product_facts

    root = tmp_path_factory.mktemp("adapter")
    build(root / "base")
    data = root / "facts.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in product_facts(n_facts=3).samples))
    result = finetune(FinetuneConfig(base=str(root / "base"), data=str(data),
                                     out_dir=str(root / "ft"), rank=8, time_budget_s=600,
                                     max_steps=24, batch_size=4, lr=2e-3, eval_every=6,
                                     track=False))
    assert result.bundle_dir is not None
    assert result.metrics["golden_passed"] >= 1, result.metrics
    return Path(result.bundle_dir)


def variant(src: Path, dst: Path, *, version: str, adapter: dict | None = None,
            files: dict[str, bytes] | None = None) -> Path:
    """A copy of an adapter bundle as another version: `adapter` keys replaced in its spec,
    `files` rewritten (and their sha256 and size in the manifest)."""
    shutil.copytree(src, dst)
    raw = json.loads((dst / MANIFEST_NAME).read_text())
    raw["version"] = version
    raw["adapter"].update(adapter or {})
    for rel, data in (files or {}).items():
        (dst / rel).write_bytes(data)
        sha, size = file_sha256(dst / rel)
        raw["files"][rel] = {**raw["files"][rel], "sha256": sha, "size": size}
    (dst / MANIFEST_NAME).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    validate_bundle(dst)
    return dst


def scaled_adapter(path: Path, factor: float) -> bytes:
    """The adapter's GGUF with every lora_b multiplied by `factor`: a file llama.cpp loads, but
    whose update wrecks the base's behaviour (an adapter trained with a runaway learning rate)."""
    import torch

    from edgewise.ml.llm import read_lora_gguf
    from edgewise.ml.llm._adapter import write_lora_gguf

    tensors, meta = read_lora_gguf(path)
    state = {k: torch.from_numpy(v.astype("float32") * (factor if k.endswith(".lora_b") else 1))
             for k, v in tensors.items()}
    out = path.with_name("scaled.gguf")
    write_lora_gguf(out, state, alpha=float(meta["adapter.lora.alpha"]), architecture="llama",
                    name="scaled")
    data = out.read_bytes()
    out.unlink()
    return data


def ask(url: str, prompt: str, **extra) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 48,
        **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def models(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/models", timeout=60).json()["data"]


def event(live_server, state: Path, release_id: str, kind: str) -> dict:
    device = server_device(live_server, state)
    with live_server.client() as c:
        found = [e for e in c.events(device_id=device["id"])
                 if e["release_id"] == release_id and e["kind"] == kind]
    assert found, f"no {kind} event for {release_id}"
    return found[-1]


class Recording(httpx.BaseTransport):
    """The network seam: real requests to the real server, their paths written down."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner, self.paths = inner, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.slow
def test_an_adapter_release_is_served_beside_its_base_and_a_broken_one_rolls_back(
        live_server, enroll_agent, adapter_bundle: Path, tmp_path: Path) -> None:
    adapter = validate_bundle(adapter_bundle)
    learned = adapter.adapter.golden[0]
    state = enroll_agent("lora")
    build(tmp_path / "base")
    live_server.publish(tmp_path / "base")
    assert run_once(state, tmp_path) == 0
    assert agent_status(state)["release"] == "smollm2@1.0.0"
    base_slot = state / "slots" / agent_status(state)["active_slot"]
    base_gguf = base_slot / "model.gguf"
    base_sha, base_inode = file_sha256(base_gguf), base_gguf.stat().st_ino
    assert base_sha[0] == adapter.adapter.base_sha256

    api = LocalApi(state, port=0)
    api.start()
    url = f"http://127.0.0.1:{api.port}"
    try:
        assert not answer_accepted(ask(url, learned.prompt), learned.accept)

        # The adapter release: only the adapter bundle crosses the network.
        v1 = live_server.publish(adapter_bundle)
        assert run_once(state, tmp_path) == 0
        status = agent_status(state)
        assert (status["state"], status["release"]) == ("committed", "smollm2-lora@1.0.0")
        health = status["last_health"]
        assert health["passed"] and health["base"] == "smollm2@1.0.0"
        assert health["adapter_golden_passed"] == health["adapter_golden_total"] >= 1
        assert health["base_golden_passed"] == health["base_golden_total"] == len(GOLDEN)
        download = event(live_server, state, v1["id"], "downloaded")["detail"]["download"]
        bundle_bytes = sum(e.size for e in adapter.files.values())
        assert download["sent_bytes"] <= bundle_bytes + 4096  # + the manifest
        assert download["sent_bytes"] < 0.06 * base_sha[1]
        adapter_slot = state / "slots" / status["active_slot"]
        assert adapter_slot != base_slot
        assert (adapter_slot / "base.gguf").stat().st_ino == base_inode  # linked, not copied

        # The local API, still running, now serves base + adapter.
        [served] = models(url)
        assert (served["id"], served["base"]) == ("smollm2-lora", "smollm2@1.0.0")
        assert served["adapter"]["rank"] == 8
        assert answer_accepted(ask(url, learned.prompt), learned.accept)
        assert answer_accepted(ask(url, learned.prompt, model="smollm2-lora"), learned.accept)
        assert "Berlin" in ask(url, "What is the capital of Germany?")

        # v2: a broken adapter (its update 40x too strong). The base's own golden prompts
        # fail with it: rolled back to v1, the base's bytes untouched. v2 goes into the
        # inactive slot, the base's first slot: the base lives on in v1's slot (the link).
        broken = variant(adapter_bundle, tmp_path / "broken", version="2.0.0", files={
            "adapter.gguf": scaled_adapter(adapter_bundle / "adapter.gguf", 40.0)})
        v2 = live_server.publish(broken)
        assert run_once(state, tmp_path) == 0
        status = agent_status(state)
        assert (status["state"], status["release"]) == ("rolled-back", "smollm2-lora@1.0.0")
        assert "golden prompts answered wrongly with the adapter" in status["last_error"]
        unhealthy = event(live_server, state, v2["id"], "unhealthy")["detail"]["health"]
        assert unhealthy["golden_passed"] < unhealthy["golden_total"]
        assert server_device(live_server, state)["release_id"] == v1["id"]
        served_base = state / "slots" / status["active_slot"] / "base.gguf"
        assert served_base.stat().st_ino == base_inode and file_sha256(served_base) == base_sha
        assert models(url)[0]["release"] == "smollm2-lora@1.0.0"
        assert answer_accepted(ask(url, learned.prompt), learned.accept)

        # A base update that fails its health check overwrites the other slot (the base's
        # old slot), then rolls back: the committed adapter still has its base, linked into
        # its own slot.
        build(tmp_path / "base2", version="2.0.0", require_golden=False, golden=(
            GoldenPrompt(prompt="What is the capital of Germany?", accept=("Zorblat",),
                         max_tokens=8),))
        base2 = live_server.publish(tmp_path / "base2")
        assert run_once(state, tmp_path) == 0
        # Its GGUF is the base's: copied from the adapter's slot, not downloaded.
        download = event(live_server, state, base2["id"], "downloaded")["detail"]["download"]
        assert download["reused_files"] == 1 and download["sent_bytes"] < 0.05 * base_sha[1]
        status = agent_status(state)
        assert (status["state"], status["release"]) == ("rolled-back", "smollm2-lora@1.0.0")
        assert json.loads((base_slot / "slot.json").read_text())["version"] == "2.0.0"
        assert served_base.stat().st_ino == base_inode and file_sha256(served_base) == base_sha
        assert answer_accepted(ask(url, learned.prompt), learned.accept)
        assert "Berlin" in ask(url, "What is the capital of Germany?")
    finally:
        api.stop()


@pytest.mark.slow
def test_an_adapter_for_another_base_is_refused_before_any_of_it_is_fetched(
        live_server, enroll_agent, adapter_bundle: Path, tmp_path: Path) -> None:
    state = enroll_agent("other-base")
    build(tmp_path / "base")
    live_server.publish(tmp_path / "base")
    assert run_once(state, tmp_path) == 0
    other = variant(adapter_bundle, tmp_path / "other", version="1.0.1", adapter={
        "base_release": "smollm2-q8@1.0.0", "base_sha256": "e" * 64})
    release = live_server.publish(other)
    transport = Recording(httpx.HTTPTransport(verify=str(live_server.ca)))
    agent = Agent(AgentConfig(state_dir=state, transport=transport))
    try:
        agent.run_cycle()
        status = agent_status(state)
        assert (status["state"], status["release"]) == ("failed", "smollm2@1.0.0")
        assert ("smollm2-lora@1.0.1 is a LoRA adapter for smollm2-q8@1.0.0"
                in status["last_error"])
        assert "this device runs smollm2@1.0.0: roll out smollm2-q8@1.0.0" in status[
            "last_error"]
        fetched = [p for p in transport.paths if "/targets/" in p]
        assert fetched and all(p.endswith(MANIFEST_NAME) for p in fetched), fetched
        agent.run_cycle()  # final: not asked for again
        assert agent.record.attempts == {release["id"]: 1}
    finally:
        agent.close()


def test_a_device_without_an_llm_refuses_an_adapter(live_server, enroll_agent, tiny_bundle,
                                                    tmp_path: Path) -> None:
    """The manifest alone decides (no fine-tune needed): an adapter bundle whose GGUF bytes
    are never fetched by a device that runs an image model."""
    state = enroll_agent("image")
    live_server.publish(tiny_bundle("1.0.0"))
    assert run_once(state, tmp_path) == 0
    bundle = tmp_path / "lora"
    bundle.mkdir()
    (bundle / "adapter.gguf").write_bytes(b"GGUF" + bytes(4096))
    sha, size = file_sha256(bundle / "adapter.gguf")
    (bundle / MANIFEST_NAME).write_text(json.dumps({
        "format_version": 1, "name": "smollm2-lora", "version": "1.0.0", "kind": "llm-adapter",
        "requires": ["llm-lora"], "files": {"adapter.gguf": {"sha256": sha, "size": size}},
        "adapter": {"adapter": "adapter.gguf", "base_release": "smollm2@1.0.0",
                    "base_sha256": file_sha256(smollm2_path())[0],
                    "base_chat_template_sha256": "0" * 64, "rank": 8, "alpha": 16,
                    "target_modules": ["attn_q"], "n_ctx": 256,
                    "golden": [{"prompt": "p", "accept": ["x"]}]}}))
    live_server.publish(bundle)
    assert run_once(state, tmp_path) == 0
    status = agent_status(state)
    assert (status["state"], status["release"]) == ("failed", "tiny@1.0.0")
    assert "LoRA adapter for smollm2@1.0.0" in status["last_error"]
    assert "this device runs tiny@1.0.0" in status["last_error"]


def live_answer(state: Path, prompt: str) -> tuple[str, str]:
    """What the device's live model answers (as its local chat API would, from the active
    slot), while the agent is down: (release, answer)."""
    from edgewise.agent import LocalModel
    from edgewise.agent._chat import chat_completion

    local = LocalModel(state)
    reply = chat_completion(local, {"messages": [{"role": "user", "content": prompt}],
                                    "temperature": 0, "max_tokens": 48})
    return local.llm()[1].release_name, reply["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_kill_9_during_adapter_installs_leaves_the_device_on_the_old_or_new_adapter(
        live_server, enroll_agent, adapter_bundle: Path, tmp_path: Path) -> None:
    """SIGKILL of the agent while it installs an adapter (before the base is linked into the
    new slot) and while it health-checks a broken one; restarted, it finishes: the new
    adapter committed, then the broken one rolled back to it (v2 went into the base's old
    slot: the base lives on, the same inode, linked into v1's), and the device answering
    throughout."""
    import signal

    from tests.test_e2e_update import run_once as run

    learned = validate_bundle(adapter_bundle).adapter.golden[0]
    state = enroll_agent("lora-crash")
    build(tmp_path / "base")
    live_server.publish(tmp_path / "base")
    assert run(state, tmp_path) == 0
    base_gguf = state / "slots" / agent_status(state)["active_slot"] / "model.gguf"
    base_sha, base_inode = file_sha256(base_gguf), base_gguf.stat().st_ino

    # v1, killed before installing: the base still serves; restarted, v1 installs.
    live_server.publish(adapter_bundle)
    assert run(state, tmp_path, fault="installing:before") == -signal.SIGKILL
    assert json.loads((state / "state.json").read_text())["state"] == "installing"
    assert live_answer(state, "What is the capital of Germany?")[0] == "smollm2@1.0.0"
    assert run(state, tmp_path) == 0
    status = agent_status(state)
    assert (status["state"], status["release"]) == ("committed", "smollm2-lora@1.0.0")
    assert "resumed" in [e["event"] for e in status["history"]]
    release, answer = live_answer(state, learned.prompt)
    assert release == "smollm2-lora@1.0.0" and answer_accepted(answer, learned.accept)

    # v2 (broken), killed after activation, before its health check: the device serves v2
    # until the agent is back, which checks it, fails it and rolls back to v1.
    broken = variant(adapter_bundle, tmp_path / "broken", version="2.0.0", files={
        "adapter.gguf": scaled_adapter(adapter_bundle / "adapter.gguf", 40.0)})
    live_server.publish(broken)
    assert run(state, tmp_path, fault="health-checking:before") == -signal.SIGKILL
    assert json.loads((state / "state.json").read_text())["state"] == "health-checking"
    assert live_answer(state, learned.prompt)[0] in ("smollm2-lora@1.0.0",
                                                     "smollm2-lora@2.0.0")
    assert run(state, tmp_path) == 0
    status = agent_status(state)
    assert (status["state"], status["release"]) == ("rolled-back", "smollm2-lora@1.0.0")
    assert "golden prompts answered wrongly with the adapter" in status["last_error"]
    release, answer = live_answer(state, learned.prompt)
    assert release == "smollm2-lora@1.0.0" and answer_accepted(answer, learned.accept)
    assert "Berlin" in live_answer(state, "What is the capital of Germany?")[1]
    served = state / "slots" / status["active_slot"] / "base.gguf"
    assert served.stat().st_ino == base_inode and file_sha256(served) == base_sha
