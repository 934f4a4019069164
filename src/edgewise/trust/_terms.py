"""Release terms: what the operator's offline targets key signs into every release, so that a
compromised server can delay updates but never downgrade a device or cross hardware.

Each bundle manifest target (`NAME/VERSION/edgewise.json`) carries, in its custom field
`edgewise`:

- `release_counter`: one more than every release published before it (all model names), so
  "newer" is decided by the publisher, never by the server;
- `hardware_ids`: the hardware this build is for (`*`: any; variants name theirs);
- `fallbacks`: manifest targets a device running this release may go back to (by default the
  previous release of the same model and its variants): the operator's advance consent to the
  automatic rollback of a staged rollout.

Invariant (`check_terms`, run by the agent before downloading a bundle): a device installs a
release only if its terms are signed, name the device's hardware, and its counter is at least
the highest counter the device ever committed, or the release is one of the fallbacks that the
highest committed release signed. An explicit operator rollback to something older is a
re-publish of the old model under a new version: a new, higher counter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuf.api.metadata import TargetFile

from ._errors import VerificationError

__all__ = ["ANY_HARDWARE", "ReleaseTerms", "check_terms", "is_manifest_target", "terms_for"]

TERMS_FIELD = "edgewise"
ANY_HARDWARE = "*"
MANIFEST_FILE = "edgewise.json"  # artifacts.MANIFEST_NAME; trust does not import artifacts


def is_manifest_target(path: str) -> bool:
    return path.count("/") == 2 and path.endswith("/" + MANIFEST_FILE)


@dataclass(frozen=True)
class ReleaseTerms:
    counter: int
    hardware_ids: tuple[str, ...]
    fallbacks: tuple[str, ...]  # manifest target paths

    def to_custom(self) -> dict[str, Any]:
        return {TERMS_FIELD: {"release_counter": self.counter,
                              "hardware_ids": list(self.hardware_ids),
                              "fallbacks": list(self.fallbacks)}}

    @classmethod
    def of(cls, info: TargetFile) -> ReleaseTerms | None:
        """The terms signed into a target, None when it has none; malformed terms raise."""
        raw = (info.custom or {}).get(TERMS_FIELD) if isinstance(info.custom, dict) else None
        if raw is None:
            return None
        try:
            counter, hw, fb = raw["release_counter"], raw["hardware_ids"], raw["fallbacks"]
            ok = (isinstance(counter, int) and not isinstance(counter, bool) and counter >= 1
                  and isinstance(hw, list) and isinstance(fb, list) and hw
                  and all(isinstance(v, str) and v for v in (*hw, *fb)))
        except (KeyError, TypeError) as exc:
            raise VerificationError(f"{info.path}: malformed release terms: {exc}") from exc
        if not ok:
            raise VerificationError(f"{info.path}: malformed release terms {raw!r}")
        return cls(counter, tuple(hw), tuple(fb))

    def fits(self, hardware: str) -> bool:
        return ANY_HARDWARE in self.hardware_ids or hardware in self.hardware_ids


def _manifest_terms(targets: Mapping[str, TargetFile]) -> dict[str, ReleaseTerms]:
    out = {}
    for path, info in targets.items():
        if is_manifest_target(path) and (terms := ReleaseTerms.of(info)) is not None:
            out[path] = terms
    return out


def terms_for(current: Mapping[str, TargetFile], manifest_path: str, *,
              hardware_ids: Sequence[str] = (ANY_HARDWARE,),
              fallbacks: Sequence[str] | None = None,
              same_counter_as: str | None = None) -> ReleaseTerms:
    """Terms for a new manifest target given the (verified) current targets, by path.

    `fallbacks` None: the previous release of the same model name (the highest counter below
    the new one) and its variants. `same_counter_as`: a variant shares its release's counter
    and fallbacks (it is another build of the same release)."""
    known = _manifest_terms(current)
    hardware_ids = tuple(sorted({h.strip() for h in hardware_ids if h.strip()}))
    if not hardware_ids:
        raise VerificationError("a release needs at least one hardware id ('*' for any)")
    if same_counter_as is not None:
        base = known.get(same_counter_as)
        if base is None:
            raise VerificationError(f"{same_counter_as} has no signed release terms")
        return ReleaseTerms(base.counter, hardware_ids,
                            base.fallbacks if fallbacks is None else tuple(fallbacks))
    counter = max((t.counter for t in known.values()), default=0) + 1
    if fallbacks is None:
        name = manifest_path.split("/", 1)[0]
        same = {p: t for p, t in known.items() if p.split("/", 1)[0] == name}
        previous = max((t.counter for t in same.values()), default=None)
        fallbacks = sorted(p for p, t in same.items() if t.counter == previous)
    else:
        unknown = [p for p in fallbacks if p not in known]
        if unknown:
            raise VerificationError(f"fallbacks must be published releases: {unknown}")
    return ReleaseTerms(counter, hardware_ids, tuple(fallbacks))


def check_terms(info: TargetFile, *, hardware: str, committed_counter: int,
                committed_fallbacks: Sequence[str]) -> ReleaseTerms:
    """Raise VerificationError unless this device may install the release `info` describes."""
    terms = ReleaseTerms.of(info)
    if terms is None:
        raise VerificationError(f"{info.path} carries no signed release terms (counter, "
                                "hardware): refusing it")
    if not terms.fits(hardware):
        raise VerificationError(f"{info.path} is built for hardware {list(terms.hardware_ids)}, "
                                f"this device is {hardware!r}")
    if terms.counter < committed_counter and info.path not in committed_fallbacks:
        raise VerificationError(
            f"{info.path} has release counter {terms.counter}, below the {committed_counter} "
            "this device already committed, and the operator did not sign it as a fallback: "
            "refusing the downgrade (to go back, publish the old model under a new version)")
    return terms
