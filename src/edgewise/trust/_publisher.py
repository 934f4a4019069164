"""Operator side of publishing: sign new targets metadata with the offline targets key.

Invariant: the operator only ever extends targets metadata that verifies against the trusted
root it holds, so a compromised server cannot slip a target in for the operator to sign.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import DelegatedRole, Delegations, Metadata, Root, TargetFile, Targets

from ._errors import KeyFileError, VerificationError
from ._terms import ANY_HARDWARE, is_manifest_target, terms_for

__all__ = ["DELTAS_ROLE", "TARGETS_EXPIRY", "sign_targets", "target_file"]

# Delta patches are made by the server after publishing, so they are signed by a role the
# server holds: `deltas`, delegated by the offline targets role to the online key for
# `deltas/*` only. A device still checks every reconstructed file against the hash the
# offline key signed, so a forged delta can waste bandwidth but never install anything.
DELTAS_ROLE = "deltas"

TARGETS_EXPIRY = timedelta(days=365)


def target_file(target_path: str, local_path: Path) -> TargetFile:
    return TargetFile.from_file(target_path, str(local_path), ["sha256"])


def sign_targets(
    *,
    root: Metadata[Root],
    signer: Signer | list[Signer],
    current: bytes | None,
    add: dict[str, TargetFile],
    now: datetime | None = None,
    current_root: Metadata[Root] | None = None,
    hardware_ids: Sequence[str] = (ANY_HARDWARE,),
    fallbacks: Sequence[str] | None = None,
    same_counter_as: str | None = None,
) -> bytes:
    """Return signed targets metadata: `current` (verified) plus `add`, version + 1, signed by
    every given signer (at least the targets threshold of `root`). `current_root` verifies
    `current` when it was signed under an earlier root (after a targets key rotation).

    A bundle manifest among `add` gets its release terms (`_terms`): the next release counter
    (or `same_counter_as`'s, for a variant), `hardware_ids` and `fallbacks` (None: the
    previous release of the same model)."""
    now = now or datetime.now(UTC)
    signers = signer if isinstance(signer, list) else [signer]
    role = root.signed.roles[Targets.type]
    usable = [s for s in signers if s.public_key.keyid in role.keyids]
    if not usable:
        raise KeyFileError("this key is not a targets key of the trusted root")
    if len({s.public_key.keyid for s in usable}) < role.threshold:
        raise KeyFileError(f"signing targets needs {role.threshold} of the "
                           f"{len(role.keyids)} targets keys; {len(usable)} given")
    if current is None:
        targets = Targets(version=1, expires=now)
    else:
        try:
            md = Metadata[Targets].from_bytes(current)
            (current_root or root).signed.verify_delegate(Targets.type, md.signed_bytes,
                                                          md.signatures)
        except UnsignedMetadataError as exc:
            raise VerificationError(
                "the server's current targets metadata is not signed by our targets key; "
                "refusing to extend it"
            ) from exc
        except Exception as exc:
            raise VerificationError(f"the server's targets metadata is malformed: {exc}") from exc
        targets = md.signed
        targets.version += 1
    _delegate_deltas(targets, root)
    previous = dict(targets.targets)  # release terms count what existed before this call
    for path, info in add.items():
        if is_manifest_target(path) and path not in targets.targets:
            terms = terms_for(previous, path, hardware_ids=hardware_ids, fallbacks=fallbacks,
                              same_counter_as=same_counter_as)
            custom = {**(info.custom or {}), **terms.to_custom()}
            info = TargetFile(info.length, info.hashes, path,
                              unrecognized_fields={**info.unrecognized_fields, "custom": custom})
        if path.startswith(f"{DELTAS_ROLE}/"):
            raise VerificationError(f"{path}: the {DELTAS_ROLE}/ namespace is the server's")
        old = targets.targets.get(path)
        if old is not None and (old.hashes != info.hashes or old.length != info.length):
            raise VerificationError(f"target {path} already exists with other content")
        if old is None:  # an existing target keeps its signed fields (release terms)
            targets.targets[path] = info
    targets.expires = now.replace(microsecond=0) + TARGETS_EXPIRY
    out = Metadata(targets)
    for s in usable:
        out.sign(s, append=True)
    return out.to_bytes()


def _delegate_deltas(targets: Targets, root: Metadata[Root]) -> None:
    online_ids = root.signed.roles["snapshot"].keyids
    keys = {kid: root.signed.keys[kid] for kid in online_ids}
    role = DelegatedRole(name=DELTAS_ROLE, keyids=list(online_ids), threshold=1,
                         terminating=True, paths=[f"{DELTAS_ROLE}/*"])
    if targets.delegations is None or targets.delegations.roles is None:
        targets.delegations = Delegations(keys=keys, roles={DELTAS_ROLE: role})
    else:
        targets.delegations.keys.update(keys)
        targets.delegations.roles[DELTAS_ROLE] = role
