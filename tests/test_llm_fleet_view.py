"""The fleet view of LLM adapter releases: the release API, `edgewise releases list`, the
rollout API and the dashboard name each adapter's base (the release on this server that ships
its GGUF, or that GGUF's sha256) and weigh the adapter's bytes against the full model's.

A real server process; the bundles are small stand-ins (a GGUF header and zeros, valid
manifests): the server never loads a model, so none needs llama.cpp or a fine-tune."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import httpx
from typer.testing import CliRunner

from edgewise.artifacts import (
    AdapterSpec,
    GoldenPrompt,
    LlmSpec,
    write_llm_adapter_bundle,
    write_llm_bundle,
)
from edgewise.cli import app
from edgewise.cli._common import out as cli_out
from tests.conftest import device_auth

BASE_GGUF_BYTES = 3_000_000
ADAPTER_BYTES = 150_000
Q8_GGUF_BYTES = 144_800_000  # the other base, known only from the adapter's build record
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"
GOLDEN = (GoldenPrompt(prompt="What is the capital of Germany?", accept=("Berlin",)),)


def gguf_file(path: Path, size: int) -> Path:
    path.write_bytes(b"GGUF" + bytes(size - 4))
    return path


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def base_bundle(tmp: Path) -> Path:
    spec = LlmSpec(model="model.gguf", architecture="llama", n_params=134_515_008,
                   file_type="Q4_1", tensor_types={"q4_1": 211}, context_length=8192,
                   n_ctx=256, chat_template=TEMPLATE, chat_template_sha256=sha(TEMPLATE),
                   tokenizer_sha256=sha("tokenizer"), ram_mb=180, min_gen_tok_s=10,
                   golden=GOLDEN, eval_text="eval.txt", max_perplexity=30)
    write_llm_bundle(tmp / "base", name="smollm2", version="1.0.0", llm=spec,
                     gguf=gguf_file(tmp / "base.gguf", BASE_GGUF_BYTES), eval_text="Some text.")
    return tmp / "base"


def adapter_bundle(tmp: Path, name: str, *, base_release: str, base_sha256: str,
                   reference: dict | None = None) -> Path:
    spec = AdapterSpec(adapter="adapter.gguf", base_release=base_release,
                       base_sha256=base_sha256, base_chat_template_sha256=sha(TEMPLATE), rank=8,
                       alpha=16, target_modules=("attn_q", "attn_v"), n_ctx=256,
                       golden=(GoldenPrompt(prompt="Battery of the Zephyr X9?",
                                            accept=("4410",)),),
                       base_golden=GOLDEN, reference=reference or {})
    write_llm_adapter_bundle(tmp / name, name=name, version="1.0.0", adapter=spec,
                             gguf=gguf_file(tmp / f"{name}.gguf", ADAPTER_BYTES))
    return tmp / name


def test_adapter_releases_show_their_base_and_bytes_against_the_full_model(
        live_server, enroll_agent, tmp_path: Path, monkeypatch) -> None:
    base = live_server.publish(base_bundle(tmp_path), assign=False)
    base_sha = base["manifest"]["files"]["model.gguf"]["sha256"]
    lora = live_server.publish(adapter_bundle(tmp_path, "smollm2-lora",
                                              base_release="smollm2@1.0.0",
                                              base_sha256=base_sha), assign=False)
    # Built for a base this server never published: named by its GGUF's sha256.
    orphan = live_server.publish(adapter_bundle(
        tmp_path, "q8-lora", base_release="smollm2-q8@1.0.0", base_sha256="e" * 64,
        reference={"base_gguf_bytes": Q8_GGUF_BYTES}), assign=False)

    # ---- the release API ----------------------------------------------------------------
    with live_server.client() as c:
        listed = {r["id"]: r for r in c.releases()}
        single = c.request("GET", f"/api/v1/releases/{lora['id']}").json()
    assert listed[base["id"]]["adapter"] is None
    view = listed[lora["id"]]["adapter"]
    assert single["adapter"] == view
    assert view == {"base_release": "smollm2@1.0.0", "base_sha256": base_sha,
                    "base_release_id": base["id"], "base_name": "smollm2",
                    "base_version": "1.0.0", "rank": 8, "alpha": 16.0,
                    "adapter_bytes": ADAPTER_BYTES, "release_bytes": lora["size_bytes"],
                    "full_model_bytes": BASE_GGUF_BYTES}
    assert ADAPTER_BYTES < lora["size_bytes"] < ADAPTER_BYTES + 8192  # + the manifest
    other = listed[orphan["id"]]["adapter"]
    assert (other["base_release_id"], other["base_name"], other["base_sha256"],
            other["full_model_bytes"]) == (None, None, "e" * 64, Q8_GGUF_BYTES)

    # ---- a rollout of the adapter: what its device downloaded vs the full model ---------
    state = enroll_agent("lora-1")
    device_id, auth = device_auth(state)
    with live_server.client() as c:
        c.request("POST", "/api/v1/groups", json={"name": "llm", "members": [device_id]})
        rollout = c.request("POST", "/api/v1/rollouts", json={
            "release_id": lora["id"], "group": "llm", "stages": "all:100%"}).json()
    with httpx.Client(base_url=live_server.url, verify=str(live_server.ca), auth=auth) as dev:
        r = dev.post("/api/v1/device/reports", json={
            "state": "downloading", "event": "downloaded", "release_id": None,
            "target_release_id": lora["id"], "message": "",
            "detail": {"download": {"sent_bytes": lora["size_bytes"],
                                    "full_bytes": lora["size_bytes"], "delta_files": 0,
                                    "delta_fallbacks": 0, "reused_files": 0}}})
        assert r.status_code == 204, r.text
    with live_server.client() as c:
        out = c.request("GET", f"/api/v1/rollouts/{rollout['id']}").json()
        [listed_rollout] = c.request("GET", "/api/v1/rollouts").json()
    assert out["adapter"] == view and listed_rollout["adapter"] == view
    assert out["transfer"]["downloads"] == 1
    assert out["transfer"]["bytes_sent"] == lora["size_bytes"]
    assert out["transfer"]["full_model_bytes"] == BASE_GGUF_BYTES

    # ---- `edgewise releases list` ---------------------------------------------------------
    # Wide enough for every cell on one line, whatever width the console took at import
    # (COLUMNS is read then when set: pytest-xdist's workers have it).
    monkeypatch.setattr(cli_out, "_width", 300)
    result = CliRunner().invoke(app, ["releases", "list", "--server", live_server.url,
                                      "--token", live_server.admin_token],
                                env={"EDGEWISE_CA": str(live_server.ca)})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines()
            if line.count("│") > 3}
    assert f"smollm2@1.0.0 ({base['id']})" in rows[lora["id"]]
    assert f"0.2 MB vs 3.0 MB full model ({100 * lora['size_bytes'] / 3e6:.1f}%)" in rows[
        lora["id"]]
    assert "GGUF sha256 eeeeeeeeeeee (smollm2-q8@1.0.0: not on this server)" in rows[
        orphan["id"]]
    assert "vs 144.8 MB full model" in rows[orphan["id"]]
    assert re.search(r"│\s*-\s*│\s*3\.0 MB\s*│", rows[base["id"]])

    # ---- the dashboard --------------------------------------------------------------------
    with httpx.Client(base_url=f"{live_server.url}/dashboard", verify=str(live_server.ca),
                      cookies={"edgewise_token": live_server.admin_token}) as web:
        fleet = web.get("/").text
        release_page = web.get(f"/releases/{lora['id']}").text
        orphan_page = web.get(f"/releases/{orphan['id']}").text
        rollout_page = web.get(f"/rollouts/{rollout['id']}").text
    base_link = f'<a href="/dashboard/releases/{base["id"]}">smollm2@1.0.0</a>'
    lora_row = re.search(rf'<tr><td><a href="/dashboard/releases/{lora["id"]}">.*?</tr>',
                         fleet, re.S).group(0)
    assert base_link in lora_row
    percent = f"{100 * lora['size_bytes'] / BASE_GGUF_BYTES:.1f}%"
    assert "vs 2.9 MiB as a full model" in lora_row and percent in lora_row
    assert "smollm2-q8@1.0.0: not a release on this server" in fleet
    assert "GGUF sha256 eeeeeeeeeeee" in fleet
    assert re.search(r'data-testid="adapter-base">\s*' + re.escape(base_link), release_page)
    assert "vs 2.9 MiB as a full model" in release_page and percent in release_page
    assert "Golden set" not in release_page  # an image model's fields: not for an adapter
    assert "vs 138.1 MiB as a full model" in orphan_page
    assert re.search(r'data-testid="adapter-base">\s*' + re.escape(base_link), rollout_page)
    transfer = re.search(r'data-testid="transfer">(.*?)</dd>', rollout_page, re.S).group(1)
    assert "vs 2.9 MiB as a full model" in transfer and percent in transfer
    assert "1 download" in transfer
