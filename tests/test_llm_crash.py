"""Power cuts during an LLM update (real llama.cpp, the real SmolLM2 file): SIGKILL the agent in
every in-flight state, restart it, and check the device still answers, on the old release or
the new one, and never on a release that failed its golden prompts."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from edgewise.agent import LocalModel, agent_status
from edgewise.agent._chat import chat_completion
from edgewise.artifacts import GoldenPrompt
from tests._llm import build
from tests.test_e2e_update import run_once

GOOD, BROKEN = "good", "broken"
# v2 is the same GGUF (reused from the installed slot, no download), so each case costs two
# health checks, not two 98 MB downloads. A broken v2 demands an answer the model never gives.
CASES = [(GOOD, f"{state}:before", "committed", "smollm2@2.0.0")
         for state in ("downloading", "verifying", "installing", "activating",
                       "health-checking")] + [
        (BROKEN, point, "rolled-back", "smollm2@1.0.0")
        for point in ("activating:before", "activating:after", "health-checking:before",
                      "health-checking:after", "rolling-back:before")]


@pytest.fixture(scope="module")
def llm_bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm-crash")
    build(root / "v1")
    build(root / GOOD, version="2.0.0")
    build(root / BROKEN, version="2.0.0", require_golden=False,
          golden=(GoldenPrompt(prompt="What is the capital of Germany?", accept=("Paris",),
                               max_tokens=16),))
    return {"v1": root / "v1", GOOD: root / GOOD, BROKEN: root / BROKEN}


def answers(state: Path) -> tuple[str, str]:
    """Ask the device's live model, as its local chat API would: (release, answer)."""
    local = LocalModel(state)
    reply = chat_completion(local, {
        "messages": [{"role": "user", "content": "What is the capital of Germany?"}],
        "temperature": 0, "max_tokens": 16})
    return local.llm()[1].release_name, reply["choices"][0]["message"]["content"]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "point", "final", "release"), CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_power_cut_in_every_state_of_an_llm_update(live_server, enroll_agent, llm_bundles,
                                                   tmp_path: Path, kind: str, point: str,
                                                   final: str, release: str) -> None:
    state, _, when = point.partition(":")
    agent = enroll_agent("llm-crashy")
    live_server.publish(llm_bundles["v1"])
    assert run_once(agent, tmp_path) == 0
    live_server.publish(llm_bundles[kind])

    assert run_once(agent, tmp_path, fault=point) == -signal.SIGKILL
    saved = json.loads((agent / "state.json").read_text())["state"]
    assert saved == state if when == "before" else saved in (state, final)
    # While the agent is down, the device's model still answers: the old release, or the
    # new one once it was activated.
    live, answer = answers(agent)
    assert live in ("smollm2@1.0.0", "smollm2@2.0.0") and "Berlin" in answer

    assert run_once(agent, tmp_path) == 0
    status = agent_status(agent)
    assert (status["state"], status["release"]) == (final, release)
    # The release that serves is the one the agent committed (never the broken one).
    assert answers(agent)[0] == release
    if when == "before":
        assert "resumed" in [e["event"] for e in status["history"]]
