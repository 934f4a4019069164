"""Per-device director metadata, signed on demand.

Invariant: a device's director metadata always names exactly the bundles the server assigns
it, one per component (the build for its hardware), with the image repository's signed
length, hashes and release counter, or nothing; it is re-signed, with higher versions (at
least the Unix time, so they grow even after a restored backup), when that changes or when
its timestamp is in the second half of its lifetime.
"""

from __future__ import annotations

import json
import re
import time

from sqlalchemy.orm import Session
from tuf.api.metadata import TargetFile

from ...trust import ServerRepository, VerificationError
from ...trust._director import DirectorRepository
from .._db import utcnow
from .._errors import NotFound
from ..devices import service as devices
from ..devices.models import Device
from ..releases import service as releases
from .models import DirectorState

_ROOT_NAME = re.compile(r"^(\d+)\.root\.json$")


def _wanted(session: Session, repo: ServerRepository, device: Device
            ) -> tuple[str, dict[str, TargetFile]]:
    """The signed instruction: one bundle per assigned component (the model's, each app's)."""
    model = devices.assignment(session, device=device)
    targets: dict[str, TargetFile] = {}
    for release in ([model] if model is not None else []) + devices.component_assignments(
            session, device=device):
        path = releases.build_for(session, release=release,
                                  hardware=device.hardware).manifest_target
        image = repo.target(path)
        if image is None:
            continue  # not (or no longer) a signed target: instruct nothing for it
        try:
            targets[path] = DirectorRepository.instruction(
                path, image, device_id=device.id, hardware=device.hardware,
                release_id=release.id)
        except VerificationError:
            continue
    if not targets:
        return "[]", {}
    key = json.dumps([[path, entry.hashes.get("sha256"), entry.custom]
                      for path, entry in sorted(targets.items())])
    if len(targets) == 1:  # the key a one-component device always had: not re-signed
        path, entry = next(iter(targets.items()))
        key = json.dumps([path, entry.hashes.get("sha256"), entry.custom])
    return key, targets


def current(session: Session, *, repo: ServerRepository, director: DirectorRepository,
            device: Device) -> DirectorState:
    state = session.get(DirectorState, device.id)
    key, targets = _wanted(session, repo, device)
    now = utcnow()
    fresh = state is not None and state.instruction == key and \
        (state.expires_at - now).total_seconds() > 12 * 3600
    if fresh:
        return state
    # Versions only grow, even if this table is lost (a restored backup): devices refuse
    # director metadata older than what they have seen.
    version = max((state.version if state else 0) + 1, int(time.time()))
    md = director.sign(device_id=device.id, version=version, targets=targets)
    if state is None:
        state = DirectorState(device_id=device.id)
        session.add(state)
    state.version, state.instruction = version, key
    state.targets, state.snapshot, state.timestamp = md.targets, md.snapshot, md.timestamp
    state.expires_at = md.expires
    session.commit()
    return state


def metadata(session: Session, *, repo: ServerRepository, director: DirectorRepository,
             device: Device, filename: str) -> bytes:
    if (m := _ROOT_NAME.match(filename)) is not None:
        if m.group(1) != "1":
            raise NotFound(f"no director metadata {filename}")
        return director.root
    if filename not in ("timestamp.json", "snapshot.json", "targets.json"):
        raise NotFound(f"no director metadata {filename}")
    # A refresh starts at the timestamp: that is when the instruction is brought up to date.
    state = None if filename == "timestamp.json" else session.get(DirectorState, device.id)
    if state is None:
        state = current(session, repo=repo, director=director, device=device)
    return {"timestamp.json": state.timestamp, "snapshot.json": state.snapshot,
            "targets.json": state.targets}[filename]
