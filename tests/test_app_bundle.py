"""App bundles (kind "app"): an OCI image layout whose blobs are the bundle's files, checked
without any container engine; an agent that cannot run containers refuses an app release
after reading its manifest, before any blob is fetched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgewise.agent import agent_status
from edgewise.artifacts import (
    MANIFEST_NAME,
    AppManifest,
    BundleError,
    oci_blob_path,
    parse_manifest,
    validate_bundle,
    write_app_bundle,
)
from tests._apps import app_section, handmade_layout
from tests.test_e2e_update import run_once


def make_app(tmp_path: Path, name: str = "hello", version: str = "1.0.0",
             content: bytes = b"v1\n") -> Path:
    layout = handmade_layout(tmp_path / f"layout-{version}",
                             {"server": b"\x7fELF" + b"\x00" * 4000, "version.txt": content})
    out = tmp_path / f"{name}-{version}"
    write_app_bundle(out, layout, name=name, version=version, app=app_section(8080))
    return out


def rewrite_manifest(bundle: Path, change) -> None:
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    change(data)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))


def test_an_app_bundle_is_its_image_blobs_named_by_hash(tmp_path: Path) -> None:
    bundle = make_app(tmp_path)
    manifest = validate_bundle(bundle)
    assert isinstance(manifest, AppManifest)
    assert manifest.kind == "app" and manifest.requires == ("oci-app",)
    assert manifest.app.ref == "1" and manifest.app.health.http.port == 8080
    blobs = [rel for rel in manifest.files if rel.startswith("blobs/")]
    assert len(blobs) == 3  # manifest, config, one layer
    assert all(rel == f"blobs/sha256/{manifest.files[rel].sha256}" for rel in blobs)
    assert set(manifest.files) == {*blobs, "index.json", "oci-layout"}
    # Nothing is left behind, and an existing directory is never overwritten.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(BundleError, match="already exists"):
        write_app_bundle(bundle, tmp_path / "layout-1.0.0", name="hello", version="1.0.0",
                         app=app_section(8080))


def test_a_stray_or_missing_blob_is_refused(tmp_path: Path) -> None:
    bundle = make_app(tmp_path)
    stray = make_app(tmp_path, version="2.0.0", content=b"v2\n")
    # A blob the image does not reference, listed in the manifest: smuggled content.
    listed = validate_bundle(bundle).files
    extra = next(rel for rel in validate_bundle(stray).files
                 if rel.startswith("blobs/") and rel not in listed)
    shutil.copyfile(stray / extra, bundle / extra)
    entry = validate_bundle(stray).files[extra]
    rewrite_manifest(bundle, lambda d: d["files"].update(
        {extra: {"sha256": entry.sha256, "size": entry.size}}))
    with pytest.raises(BundleError, match="blobs the image does not reference"):
        validate_bundle(bundle)
    # A layer the image needs, missing from the manifest (and the directory).
    bundle = make_app(tmp_path, version="3.0.0", content=b"v3\n")
    manifest = validate_bundle(bundle)
    image = json.loads((bundle / manifest.app.manifest_blob).read_text())
    layer = oci_blob_path(image["layers"][0]["digest"])
    (bundle / layer).unlink()
    rewrite_manifest(bundle, lambda d: d["files"].pop(layer))
    with pytest.raises(BundleError, match="does not list it"):
        validate_bundle(bundle)


def test_app_manifest_rules(tmp_path: Path) -> None:
    raw = json.loads((make_app(tmp_path) / MANIFEST_NAME).read_text())

    def parse(change) -> None:
        data = json.loads(json.dumps(raw))
        change(data)
        parse_manifest(json.dumps(data))

    parse(lambda d: None)
    with pytest.raises(BundleError, match="named blobs/sha256/<its sha256>"):
        def rename(d):
            rel = next(r for r in d["files"] if r.startswith("blobs/"))
            d["files"][rel[:-1] + ("0" if rel[-1] != "0" else "1")] = d["files"].pop(rel)
        parse(rename)
    with pytest.raises(BundleError, match="either http or command"):
        parse(lambda d: d["app"]["health"].update(command=["true"]))
    with pytest.raises(BundleError, match="either http or command"):
        parse(lambda d: d["app"]["health"].update(http=None))
    with pytest.raises(BundleError, match="restart"):
        parse(lambda d: d["app"].update(restart="sometimes"))
    with pytest.raises(BundleError, match="environment variable name"):
        parse(lambda d: d["app"]["env"].update({"1BAD": "x"}))
    with pytest.raises(BundleError, match="must require the reader feature 'oci-app'"):
        parse(lambda d: d.update(requires=[]))
    # A reader without a feature the release needs says to update, before anything else.
    with pytest.raises(BundleError, match="update the agent"):
        parse(lambda d: d.update(requires=["oci-app", "oci-app-v2"]))


def test_a_device_without_a_container_engine_refuses_an_app_before_fetching_it(
        live_server, enroll_agent, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDGEWISE_CONTAINER_ENGINE", "none")
    state = enroll_agent("no-engine")
    live_server.publish(make_app(tmp_path))
    assert run_once(state, tmp_path) == 0
    app = agent_status(state)["components"]["hello"]  # an app is a component of its own
    assert app["state"] == "failed" and app["release"] is None
    assert "is a container app, and this device cannot run it" in app["last_error"]
    assert not (state / "containers" / "storage").exists()
    assert not (state / "slots" / "components" / "hello" / "a").exists()
    # Refused for good: the next check does not try again.
    assert run_once(state, tmp_path) == 0
    assert agent_status(state)["history"][-1]["state"] == "failed"
