"""Operator commands: keys, publish, assign, devices, releases, events, bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import console, fail, out, print_json

ServerOpt = Annotated[str, typer.Option("--server", envvar="EDGEWISE_SERVER",
                                        help="update server URL")]
TokenOpt = Annotated[str, typer.Option("--token", envvar="EDGEWISE_TOKEN",
                                       help="admin API token")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]

keys_app = typer.Typer(help="TUF signing keys.", no_args_is_help=True)
devices_app = typer.Typer(help="Enrolled devices.", no_args_is_help=True)
releases_app = typer.Typer(help="Published releases.", no_args_is_help=True)
bundle_app = typer.Typer(help="Model bundles.", no_args_is_help=True)


def _client(server: str, token: str):
    import os

    from ..server.client import OperatorClient

    # The operator pins the server's CA like devices do (EDGEWISE_CA), else the system store.
    return OperatorClient(server, token=token, verify=os.environ.get("EDGEWISE_CA") or True)


def _api_errors():
    from ..artifacts import ArtifactError
    from ..server.client import ServerApiError
    from ..trust import TrustError

    return (ServerApiError, ArtifactError, TrustError)


@keys_app.command("init")
def keys_init(
    out_dir: Annotated[Path, typer.Option("--out", help="directory for the keys")]
    = Path("keys"),
    root_keys: Annotated[int, typer.Option(help="number of root keys")] = 1,
    root_threshold: Annotated[int, typer.Option(help="root keys needed to sign")] = 1,
    targets_keys: Annotated[int, typer.Option(help="number of targets keys")] = 1,
    targets_threshold: Annotated[int, typer.Option(help="targets keys needed to sign")] = 1,
) -> None:
    """Make root + targets keys (offline, operator; k-of-n), the online key (server) and
    root.json."""
    from ..trust import KeyFileError, init_keys

    try:
        paths = init_keys(out_dir, root_keys=root_keys, root_threshold=root_threshold,
                          targets_keys=targets_keys, targets_threshold=targets_threshold)
    except KeyFileError as exc:
        fail(str(exc))
    console.print(f"[green]keys written to {out_dir}[/]\n"
                  f"  keep offline : {paths.root_key}, {paths.targets_key}\n"
                  f"  server       : {paths.online_key}, {paths.root_json}\n"
                  f"  devices      : {paths.root_json}")


def publish(
    bundle: Annotated[Path, typer.Argument(help="bundle directory")],
    server: ServerOpt,
    token: TokenOpt,
    keys: Annotated[Path, typer.Option(help="directory with root.json and targets.pem")]
    = Path("keys"),
    assign_all: Annotated[bool, typer.Option("--assign-all", help="assign to every device")]
    = False,
    fallback: Annotated[list[str] | None, typer.Option(
        "--fallback", help="NAME@VERSION devices may roll back to from this release (repeat; "
        "default: the previous release of the same model)")] = None,
    no_fallback: Annotated[bool, typer.Option(
        "--no-fallback", help="devices may never roll back from this release")] = False,
) -> None:
    """Validate a bundle, sign its targets with the offline key here, upload it.

    The signature also covers the release's terms: a release counter higher than every
    earlier release (devices refuse anything lower, so a compromised server cannot downgrade
    them) and the releases devices may fall back to (a rollout's automatic rollback). To send
    devices back to an older model later, publish it again under a new version."""
    from ..server.client import publish_bundle
    from ..trust import role_key_files

    if fallback and no_fallback:
        fail("--fallback and --no-fallback exclude each other")
    try:
        with _client(server, token) as client:
            release = publish_bundle(client, bundle, root_path=keys / "root.json",
                                     targets_key_path=role_key_files(keys, "targets"),
                                     fallbacks=[] if no_fallback else (fallback or None))
            if assign_all:
                client.assign(release["id"])
    except (*_api_errors(), ValueError) as exc:
        fail(str(exc))
    console.print(f"[green]published[/] {release['name']}@{release['version']} "
                  f"as {release['id']}")
    print_json({"release_id": release["id"], "name": release["name"],
                "version": release["version"]})


def assign(
    release_id: str,
    server: ServerOpt,
    token: TokenOpt,
    device: Annotated[list[str] | None, typer.Option("--device", help="device id (repeat); "
                                                     "default: every device")] = None,
) -> None:
    """Make a release the one the given devices (default: all) should run."""
    try:
        with _client(server, token) as client:
            devices = client.assign(release_id, device or None)
    except _api_errors() as exc:
        fail(str(exc))
    console.print(f"assigned {release_id} to {len(devices)} device(s)")


@devices_app.command("list")
def devices_list(server: ServerOpt, token: TokenOpt, as_json: JsonOpt = False) -> None:
    try:
        with _client(server, token) as client:
            devices = client.devices()
    except _api_errors() as exc:
        fail(str(exc))
    if as_json:
        print_json(devices)
        return
    table = Table("id", "name", "hardware", "state", "release", "assigned", "last seen")
    for d in devices:
        table.add_row(d["id"], d["name"], d["hardware"], d["state"], d["release_id"] or "-",
                      d["assigned_release_id"] or "-", str(d["last_seen_at"] or "-"))
    out.print(table)


@devices_app.command("token")
def devices_token(server: ServerOpt, token: TokenOpt,
                  ttl_s: Annotated[int, typer.Option(help="validity in seconds")] = 3600) -> None:
    """Create a single-use enrollment token for one new device."""
    try:
        with _client(server, token) as client:
            print(client.create_enrollment_token(ttl_s=ttl_s))
    except _api_errors() as exc:
        fail(str(exc))


@releases_app.command("variant")
def releases_variant(
    release_id: str,
    bundle: Annotated[Path, typer.Argument(help="the variant's bundle directory (same model "
                                                "name and labels, its own version)")],
    server: ServerOpt,
    token: TokenOpt,
    hardware: Annotated[list[str], typer.Option("--hardware", help="hardware id whose devices "
                                                "install this build (repeat)")],
    keys: Annotated[Path, typer.Option(help="directory with root.json and targets.pem")]
    = Path("keys"),
) -> None:
    """Publish another build of a release (e.g. an int8 candidate) for some hardware."""
    from ..server.client import publish_variant
    from ..trust import role_key_files

    try:
        with _client(server, token) as client:
            release = publish_variant(client, release_id, bundle, hardware=hardware,
                                      root_path=keys / "root.json",
                                      targets_key_path=role_key_files(keys, "targets"))
    except _api_errors() as exc:
        fail(str(exc))
    for v in release["variants"]:
        console.print(f"{release['id']}: {v['hardware']} -> {v['version']} "
                      f"({v['size_bytes']} bytes)")


@releases_app.command("list")
def releases_list(server: ServerOpt, token: TokenOpt, as_json: JsonOpt = False) -> None:
    try:
        with _client(server, token) as client:
            releases = client.releases()
    except _api_errors() as exc:
        fail(str(exc))
    if as_json:
        print_json(releases)
        return
    table = Table("id", "name", "version", "size", "base (adapters)", "transfer", "targets v",
                  "created")
    for r in releases:
        base, transfer = _adapter_cells(r.get("adapter"), r["size_bytes"])
        table.add_row(r["id"], r["name"], r["version"], f"{r['size_bytes'] / 1e6:.1f} MB", base,
                      transfer, str(r["targets_version"]), str(r["created_at"]))
    out.print(table)


def _adapter_cells(adapter: dict | None, size_bytes: int) -> tuple[str, str]:
    """The base and transfer cells of a release row: an LLM adapter names its base (the
    release here that ships its GGUF, or that GGUF's sha256) and weighs its bytes against the
    full model's."""
    if adapter is None:
        return "-", f"{size_bytes / 1e6:.1f} MB"
    if adapter["base_release_id"]:
        base = f"{adapter['base_name']}@{adapter['base_version']} ({adapter['base_release_id']})"
    else:
        base = (f"GGUF sha256 {adapter['base_sha256'][:12]} ({adapter['base_release']}: not "
                "on this server)")
    full = adapter["full_model_bytes"]
    sent = adapter["release_bytes"]
    transfer = (f"{sent / 1e6:.1f} MB vs {full / 1e6:.1f} MB full model "
                f"({100 * sent / full:.1f}%)" if full else f"{sent / 1e6:.1f} MB (full model: ?)")
    return base, transfer


def events(server: ServerOpt, token: TokenOpt,
           device: Annotated[str | None, typer.Option(help="only this device")] = None,
           limit: int = 200, as_json: JsonOpt = False) -> None:
    """The event log: enrollments, publications, assignments, every agent transition."""
    try:
        with _client(server, token) as client:
            rows = client.events(device_id=device, limit=limit)
    except _api_errors() as exc:
        fail(str(exc))
    if as_json:
        print_json(rows)
        return
    table = Table("time", "device", "release", "event", "state", "message")
    for e in rows:
        table.add_row(str(e["ts"])[:19], e["device_id"] or "-", e["release_id"] or "-",
                      e["kind"], e["state"] or "", e["message"][:80])
    out.print(table)


@bundle_app.command("validate")
def bundle_validate(bundle: Path) -> None:
    """Check a bundle directory: manifest, files, hashes, model type, golden set (or, for an
    app, its OCI image layout)."""
    from ..artifacts import (
        AppManifest,
        BundleError,
        ConfigManifest,
        LlmAdapterManifest,
        LlmManifest,
        validate_bundle,
    )

    try:
        manifest = validate_bundle(bundle)
    except BundleError as exc:
        fail(f"{bundle}: {exc}")
    if isinstance(manifest, ConfigManifest):
        what = ("configuration files"
                + (f", read by app {manifest.config.app}" if manifest.config.app else "")
                + (f", checked by {' '.join(manifest.config.check.command)}"
                   if manifest.config.check else ""))
    elif isinstance(manifest, AppManifest):
        probe = manifest.app.health
        what = (f"container app {manifest.app.digest[:19]}, health check "
                + (f"GET :{probe.http.port}{probe.http.path}" if probe.http else
                   f"command {' '.join(probe.command or ())}"))
    elif isinstance(manifest, LlmAdapterManifest):
        what = (f"LoRA adapter r{manifest.adapter.rank} for {manifest.adapter.base_release}, "
                f"{len(manifest.adapter.golden)} golden prompts")
    elif isinstance(manifest, LlmManifest):
        what = (f"{manifest.llm.architecture} {manifest.llm.file_type} LLM, "
                f"{len(manifest.llm.golden)} golden prompts")
    elif manifest.detection is not None:
        what = (f"object detector, {len(manifest.labels)} classes, {manifest.golden.count} "
                f"golden images (IoU >= {manifest.detection.iou_threshold:g}, recall >= "
                f"{manifest.detection.min_recall:g}, precision >= "
                f"{manifest.detection.min_precision:g})")
    else:
        what = f"{len(manifest.labels)} labels, golden set of {manifest.golden.count}"
    console.print(f"[green]valid[/] {manifest.release_name}: {len(manifest.files)} files, {what}")


@devices_app.command("components")
def devices_components(device_id: str, server: ServerOpt, token: TokenOpt,
                       as_json: JsonOpt = False) -> None:
    """A device's components besides its model: assigned and reported release, state."""
    try:
        with _client(server, token) as client:
            rows = client.device_components(device_id)
    except _api_errors() as exc:
        fail(str(exc))
    if as_json:
        print_json(rows)
        return
    table = Table("component", "assigned", "running", "state")
    for r in rows:
        table.add_row(r["component"], r["assigned_release_id"] or "- (removing)",
                      r["release_id"] or "-", r["state"])
    out.print(table)


@devices_app.command("remove-component")
def devices_remove_component(device_id: str, component: str, server: ServerOpt,
                             token: TokenOpt) -> None:
    """Remove a component (an app, configuration files) from a device: the device stops it
    and deletes it at its next check-in."""
    try:
        with _client(server, token) as client:
            client.unassign_component(device_id, component)
    except _api_errors() as exc:
        fail(str(exc))
    console.print(f"unassigned {component} from {device_id}: the device removes it at its "
                  "next check-in")


@devices_app.command("revoke")
def devices_revoke(device_id: str, server: ServerOpt, token: TokenOpt) -> None:
    """Cut a device off at once (its key stops being accepted)."""
    try:
        with _client(server, token) as client:
            client.request("POST", f"/api/v1/devices/{device_id}/revoke")
    except _api_errors() as exc:
        fail(str(exc))
    console.print(f"device {device_id} revoked")


tokens_app = typer.Typer(help="Operator API tokens with roles.", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)


@tokens_app.command("create")
def tokens_create(server: ServerOpt, token: TokenOpt,
                  name: Annotated[str, typer.Option(help="who holds it")],
                  role: Annotated[str, typer.Option(help="admin | publisher | operator | "
                                                    "viewer")]) -> None:
    """Create an API token for a person or a system, with one role."""
    try:
        with _client(server, token) as client:
            created = client.request("POST", "/api/v1/tokens",
                                     json={"name": name, "role": role}).json()
    except _api_errors() as exc:
        fail(str(exc))
    print_json(created)


def _audit_entries(client) -> list[dict]:
    entries, after = [], 0
    while batch := client.request("GET", "/api/v1/audit",
                                  params={"after_id": after, "limit": 5000}).json():
        entries += batch
        after = batch[-1]["id"]
    return entries


@audit_app.command("list")
def audit_list(server: ServerOpt, token: TokenOpt, as_json: JsonOpt = False,
               last: int = 50) -> None:
    try:
        with _client(server, token) as client:
            entries = _audit_entries(client)[-last:]
    except _api_errors() as exc:
        fail(str(exc))
    if as_json:
        print_json(entries)
        return
    table = Table("id", "time", "actor", "request", "status", "from")
    for e in entries:
        table.add_row(str(e["id"]), e["ts"][:19], e["actor"], f"{e['method']} {e['path']}",
                      str(e["status"]), e["client"])
    out.print(table)


@audit_app.command("verify")
def audit_verify(server: ServerOpt, token: TokenOpt) -> None:
    """Download the whole audit log and check its hash chain here."""
    from ..server.audit.service import verify_chain

    try:
        with _client(server, token) as client:
            entries = _audit_entries(client)
    except _api_errors() as exc:
        fail(str(exc))
    ok, bad, reason = verify_chain(entries)
    print_json({"ok": ok, "entries": len(entries), "first_bad_id": bad, "reason": reason,
                "head": entries[-1]["hash"] if entries else None})
    if not ok:
        fail(f"audit log chain broken at entry {bad}: {reason}")


@keys_app.command("rotate")
def keys_rotate(
    role: Annotated[str, typer.Option(help="root | targets | online")],
    keys: Annotated[Path, typer.Option(help="directory with root.json and the keys")]
    = Path("keys"),
    count: Annotated[int, typer.Option("--keys-count", help="new keys")] = 1,
    threshold: Annotated[int, typer.Option(help="new keys needed to sign")] = 1,
    server: Annotated[str | None, typer.Option(envvar="EDGEWISE_SERVER",
                                               help="also publish the new root there")] = None,
    token: Annotated[str | None, typer.Option(envvar="EDGEWISE_TOKEN")] = None,
) -> None:
    """Replace a role's keys: a new root version signed by the current root keys. With
    --server, publish it (and, for targets, re-sign the current targets with the new keys).
    After rotating the online key, restart the server with the new online.pem."""
    from ..trust import KeyFileError, load_signer, role_key_files, rotate_keys, sign_targets

    try:
        old, new = rotate_keys(keys, role=role, keys=count, threshold=threshold)
    except KeyFileError as exc:
        fail(str(exc))
    console.print(f"root v{new.signed.version}: new {role} key(s) in {keys}; retired keys in "
                  f"{keys / 'retired'}")
    if server:
        try:
            with _client(server, token or "") as client:
                client.upload_root(new.to_bytes())
                if role in ("targets", "online"):  # online: re-delegate deltas to the new key
                    signers = [load_signer(p) for p in role_key_files(keys, "targets")]
                    resigned = sign_targets(root=new, signer=signers,
                                            current=client.current_targets(), add={},
                                            current_root=old)
                    client.upload_targets(resigned)
        except (*_api_errors(), KeyFileError) as exc:
            fail(f"{exc} (the new root is saved in {keys}; retry with --server)")
        console.print(f"published root v{new.signed.version} to {server}")
