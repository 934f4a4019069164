"""A/B model slots on disk with an atomic switch (the slot backend seam).

Invariant: the active slot's files are never written. An install goes into the inactive slot
(staged in a temporary directory, then renamed into place) and `activate` replaces the one
pointer file `active` atomically, so the live model is always either the old or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["SLOT_NAMES", "SlotStore"]

SLOT_NAMES = ("a", "b")


class SlotStore:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._pointer = self.dir / "active"

    def active(self) -> str | None:
        try:
            name = self._pointer.read_text().strip()
        except FileNotFoundError:
            return None
        return name if name in SLOT_NAMES else None

    def inactive(self) -> str:
        active = self.active()
        return "b" if active == "a" else "a"

    def path(self, slot: str) -> Path:
        if slot not in SLOT_NAMES:
            raise ValueError(f"unknown slot {slot!r}")
        return self.dir / slot

    def install(self, slot: str, source: Path, *, meta: dict,
                links: dict[str, Path] | None = None) -> None:
        """Replace `slot` with a copy of the bundle directory `source`, plus `links`: name ->
        a file already on this device (an adapter's base GGUF), hard-linked into the slot
        (no copy, no download; copied where the file system cannot link), so the slot holds
        everything it runs whatever later happens to the other slot."""
        if slot == self.active():
            raise RuntimeError(f"refusing to write the active slot {slot}")
        staging = Path(tempfile.mkdtemp(dir=self.dir, prefix=f".{slot}-"))
        try:
            for src in Path(source).rglob("*"):
                if src.is_file() and not src.name.startswith("."):
                    dest = staging / src.relative_to(source)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dest)
                    with open(dest, "rb") as f:
                        os.fsync(f.fileno())
            for name, existing in (links or {}).items():
                try:
                    os.link(existing, staging / name)
                except OSError:
                    shutil.copyfile(existing, staging / name)
            (staging / "slot.json").write_text(json.dumps(meta))
            target = self.path(slot)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for leftover in self.dir.glob(f".{slot}-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def activate(self, slot: str | None) -> None:
        """Point the device at `slot` (None: no model at all)."""
        if slot is None:
            self._pointer.unlink(missing_ok=True)
            return
        if not self.path(slot).is_dir():
            raise RuntimeError(f"slot {slot} holds no model")
        self._write_pointer(slot)

    def _write_pointer(self, slot: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".active.")
        with os.fdopen(fd, "w") as f:
            f.write(slot + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._pointer)

    def meta(self, slot: str) -> dict | None:
        try:
            return json.loads((self.path(slot) / "slot.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
