"""Anti-downgrade and hardware binding: release terms signed by the offline targets key.

A stolen server (its database, its online key, the operator API) decides what each device is
told to install. These tests play that server against real agent processes over TLS: the
device must refuse a release with a lower signed counter (unless the operator signed it as a
fallback) or built for other hardware, and keep running what it runs, with nothing lost."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import pytest
from tuf.api.metadata import Metadata, TargetFile, Targets

from edgewise.agent import agent_status
from edgewise.server.client import ServerApiError, publish_variant
from edgewise.trust import (
    ReleaseTerms,
    VerificationError,
    check_terms,
    client_tls,
    load_root,
    load_signer,
    sign_targets,
)
from edgewise.trust._terms import terms_for
from tests.conftest import device_auth, make_tiny_bundle
from tests.test_e2e_update import run_once, server_device

pytestmark = pytest.mark.slow


def _assign(live_server, release: dict) -> None:
    with live_server.client() as c:
        c.assign(release["id"])


def _tamper_db(live_server, sql: str, *args) -> None:
    """The stolen server rewrites its own database."""
    with sqlite3.connect(live_server.data_dir / "edgewise.db") as db:
        db.execute(sql, args)


def test_rollback_attack_director_points_at_a_lower_release_counter(
        live_server, enroll_agent, tiny_bundle, tmp_path: Path) -> None:
    state = enroll_agent("a1")
    v1 = live_server.publish(tiny_bundle("1.0.0"))
    v2 = live_server.publish(tiny_bundle("2.0.0"))
    v3 = live_server.publish(tiny_bundle("3.0.0"))
    assert run_once(state, tmp_path) == 0
    status = agent_status(state)
    assert status["release"] == "tiny@3.0.0" and status["release_counter"] == 3
    slot = status["active_slot"]

    # The server sends the device back two releases: v3 signed only v2 as its fallback.
    _assign(live_server, v1)
    assert run_once(state, tmp_path) == 0
    status = agent_status(state)
    assert status["release"] == "tiny@3.0.0" and status["active_slot"] == slot
    assert "refusing the downgrade" in status["last_error"]
    assert server_device(live_server, state)["release_id"] == v3["id"]
    rejected = json.loads((state / "state.json").read_text())["rejected"]
    assert "tiny/1.0.0/edgewise.json" in rejected  # signed, so it never changes: not again

    # The fallback the operator signed into v3 (a rollout's automatic rollback) is allowed,
    # and does not lower the device's high-water mark.
    _assign(live_server, v2)
    assert run_once(state, tmp_path) == 0
    status = agent_status(state)
    assert status["release"] == "tiny@2.0.0" and status["release_counter"] == 3
    record = json.loads((state / "state.json").read_text())
    record["rejected"] = []  # forget the earlier refusal: the signed terms alone must decide
    (state / "state.json").write_text(json.dumps(record))
    _assign(live_server, v1)
    assert run_once(state, tmp_path) == 0
    status = agent_status(state)
    assert status["release"] == "tiny@2.0.0" and "refusing the downgrade" in status["last_error"]

    # The operator's explicit rollback: the old model published again, a new counter.
    again = live_server.publish(make_tiny_bundle(tmp_path / "v1-again", version="1.0.1"))
    assert run_once(state, tmp_path) == 0
    status = agent_status(state)
    assert status["release"] == "tiny@1.0.1" and status["release_counter"] == 4
    assert server_device(live_server, state)["release_id"] == again["id"]


def test_wrong_hardware_id_is_refused(live_server, enroll_agent, tiny_bundle,
                                      tmp_path: Path) -> None:
    state = enroll_agent("h1")  # hardware "test"
    v1 = live_server.publish(tiny_bundle("1.0.0"))
    assert run_once(state, tmp_path) == 0
    with live_server.client() as c:
        publish_variant(c, v1["id"], make_tiny_bundle(tmp_path / "other", version="1.0.0+npu"),
                        hardware=["npu"], root_path=live_server.keys.root_json,
                        targets_key_path=live_server.keys.targets_key)
    v2 = live_server.publish(tiny_bundle("2.0.0"), assign=False)
    with live_server.client() as c:
        publish_variant(c, v2["id"], make_tiny_bundle(tmp_path / "other2", version="2.0.0+npu"),
                        hardware=["npu"], root_path=live_server.keys.root_json,
                        targets_key_path=live_server.keys.targets_key)
    _assign(live_server, v2)
    # The stolen server claims the device is an "npu" and hands it the npu build of v2.
    device_id = server_device(live_server, state)["id"]
    _tamper_db(live_server, "UPDATE devices SET hardware = ? WHERE id = ?", "npu", device_id)
    assert run_once(state, tmp_path) == 0
    status = agent_status(state)
    assert status["release"] == "tiny@1.0.0"
    assert "built for hardware ['npu']" in status["last_error"]


def test_variants_must_carry_their_release_counter_and_hardware(live_server,
                                                                tmp_path: Path) -> None:
    v1 = live_server.publish(make_tiny_bundle(tmp_path / "v1"), assign=False)
    keys = live_server.keys
    root, signer = load_root(keys.root_json), load_signer(keys.targets_key)
    bundle = make_tiny_bundle(tmp_path / "v", version="1.0.0+x")
    from edgewise.server.client import _sign_and_upload

    with live_server.client() as c:
        # Signed as a new release (next counter) but uploaded as v1's variant: refused.
        with pytest.raises(ServerApiError, match="variant is signed with its release's counter"):
            _sign_and_upload(c, f"/api/v1/releases/{v1['id']}/variants", bundle,
                             root_path=keys.root_json, targets_key_path=keys.targets_key,
                             retries=1, form={"hardware": ["a"]},
                             terms={"hardware_ids": ["a"]})
        # A publisher without release terms (an old client): refused before any device sees it.
        current = Metadata[Targets].from_bytes(c.current_targets()).signed
        signed = Metadata[Targets].from_bytes(sign_targets(
            root=root, signer=signer, current=c.current_targets(), add={}))
        info = current.targets["tiny/1.0.0/edgewise.json"]
        bare = TargetFile(info.length, info.hashes, "tiny/9.0.0/edgewise.json")
        signed.signed.targets[bare.path] = bare
        signed.signatures.clear()
        signed.sign(signer)
        with pytest.raises(ServerApiError, match="no signed release terms"):
            c.request("POST", "/api/v1/releases", files=[
                ("targets", ("targets.json", signed.to_bytes(), "application/json")),
                ("files", ("edgewise.json", b"{}", "application/octet-stream"))])


def _info(path: str, terms: ReleaseTerms | None) -> TargetFile:
    fields = {"custom": terms.to_custom()} if terms else {}
    return TargetFile(1, {"sha256": "0" * 64}, path, unrecognized_fields=fields)


def test_terms_counters_fallbacks_and_the_device_rule() -> None:
    targets = Targets()
    for i, (path, hw) in enumerate([("a/1/edgewise.json", "*"), ("b/1/edgewise.json", "*"),
                                    ("a/2/edgewise.json", "*")], start=1):
        targets.targets[path] = _info(path, ReleaseTerms(i, (hw,), ()))
    targets.targets["a/2+npu/edgewise.json"] = _info("a/2+npu/edgewise.json",
                                                     ReleaseTerms(3, ("npu",), ()))
    new = terms_for(targets.targets, "a/3/edgewise.json")
    assert new.counter == 4 and new.hardware_ids == ("*",)
    assert new.fallbacks == ("a/2+npu/edgewise.json", "a/2/edgewise.json")  # and its variant
    assert terms_for(targets.targets, "c/1/edgewise.json").fallbacks == ()  # a new model
    variant = terms_for(targets.targets, "a/2+gpu/edgewise.json", hardware_ids=["gpu"],
                        same_counter_as="a/2/edgewise.json")
    assert (variant.counter, variant.hardware_ids) == (3, ("gpu",))
    with pytest.raises(VerificationError, match="must be published"):
        terms_for(targets.targets, "a/3/edgewise.json", fallbacks=["a/0/edgewise.json"])

    rule = {"hardware": "pi4", "committed_counter": 3, "committed_fallbacks": ["a/1/edgewise.json"]}
    assert check_terms(_info("a/3/edgewise.json", ReleaseTerms(3, ("*",), ())), **rule)
    assert check_terms(_info("a/1/edgewise.json", ReleaseTerms(1, ("pi4",), ())), **rule)
    for info, why in [
        (_info("b/1/edgewise.json", ReleaseTerms(2, ("*",), ())), "refusing the downgrade"),
        (_info("a/4/edgewise.json", ReleaseTerms(4, ("npu",), ())), "built for hardware"),
        (_info("a/4/edgewise.json", None), "no signed release terms"),
        (TargetFile(1, {"sha256": "0" * 64}, "a/4/edgewise.json", unrecognized_fields={
            "custom": {"edgewise": {"release_counter": "9", "hardware_ids": ["*"],
                                    "fallbacks": []}}}), "malformed"),
        (TargetFile(1, {"sha256": "0" * 64}, "a/4/edgewise.json", unrecognized_fields={
            "custom": {"edgewise": {"release_counter": 9, "hardware_ids": "*",
                                    "fallbacks": []}}}), "malformed"),
    ]:
        with pytest.raises(VerificationError, match=why):
            check_terms(info, **rule)


def _forge_director(live_server, state: Path, device_id: str, targets: dict) -> None:
    """The stolen server signs its own director instruction for one device (it holds the
    director key) and makes it stick (same instruction key, so nothing re-signs it)."""
    from edgewise.server.director.models import DirectorState  # noqa: F401  (the table)
    from edgewise.trust import DirectorRepository

    director = DirectorRepository(live_server.data_dir / "director")
    # Let the server sign its honest instruction for the current assignment first, so that
    # the forged metadata carries the instruction key the server would compute.
    _, auth = device_auth(state)
    with httpx.Client(base_url=live_server.url, verify=client_tls(live_server.ca), auth=auth,
                      timeout=10) as http:
        http.get("/api/v1/device/director/timestamp.json").raise_for_status()
    with sqlite3.connect(live_server.data_dir / "edgewise.db") as db:
        (version,) = db.execute("SELECT version FROM director_state WHERE device_id = ?",
                                (device_id,)).fetchone()
        md = director.sign(device_id=device_id, version=version + 10, targets=targets)
        db.execute("UPDATE director_state SET version = ?, targets = ?, snapshot = ?, "
                   "timestamp = ?, expires_at = '2999-01-01 00:00:00' WHERE device_id = ?",
                   (md.version, md.targets, md.snapshot, md.timestamp, device_id))


def test_director_instruction_must_match_the_device_and_the_image_repository(
        live_server, enroll_agent, tiny_bundle, tmp_path: Path) -> None:
    from edgewise.trust import DirectorRepository

    state = enroll_agent("d1")
    v1 = live_server.publish(tiny_bundle("1.0.0"))
    assert run_once(state, tmp_path) == 0
    device_id = server_device(live_server, state)["id"]
    live_server.publish(tiny_bundle("2.0.0"))
    with live_server.client() as c:
        image = Metadata[Targets].from_bytes(c.current_targets()).signed.targets
    path = "tiny/2.0.0/edgewise.json"
    for wrong, why in [
        ({"device_id": "dev-someone-else"}, "instruction is for device 'dev-someone-else'"),
        ({"hardware": "npu"}, "instruction is for hardware 'npu'"),
        ({"image": image["tiny/1.0.0/edgewise.json"]}, "length or hashes differ"),
    ]:
        entry = DirectorRepository.instruction(
            path, wrong.get("image", image[path]), hardware=wrong.get("hardware", "test"),
            device_id=wrong.get("device_id", device_id), release_id="rel-x")
        _forge_director(live_server, state, device_id, {path: entry})
        assert run_once(state, tmp_path) == 0
        status = agent_status(state)
        assert status["release"] == "tiny@1.0.0", why
        assert "director and image repository disagree" in status["last_error"]
        assert why in status["last_error"]
    # A director that names nothing, or another bundle than the assignment, confirms nothing.
    for targets in ({}, {"tiny/1.0.0/edgewise.json": DirectorRepository.instruction(
            "tiny/1.0.0/edgewise.json", image["tiny/1.0.0/edgewise.json"], hardware="test",
            device_id=device_id, release_id=v1["id"])}):
        _forge_director(live_server, state, device_id, targets)
        record = json.loads((state / "state.json").read_text())
        record["attempts"] = {}  # each forgery counts as a failed attempt; allow another
        (state / "state.json").write_text(json.dumps(record))
        assert run_once(state, tmp_path) == 0
        status = agent_status(state)
        assert status["release"] == "tiny@1.0.0"
        assert "the director does not confirm tiny/2.0.0/edgewise.json" in status["last_error"]
    assert server_device(live_server, state)["release_id"] == v1["id"]
