"""Pure decisions on measured candidates: the guards (refuse) and `fit` (choose for a device).

Invariant: nothing here measures or touches a file; every decision is a function of the
figures it is given and comes with the sentences that explain it, so the same figures always
give the same verdict and the verdict can be checked by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ._errors import NoFitError

__all__ = ["BASELINE", "CandidateFigures", "DeviceProfile", "FitDecision", "GuardPolicy",
           "assess", "choose"]

BASELINE = "fp32"
METRIC_LABELS = {"accuracy": "accuracy", "map50": "mAP@0.5"}


@dataclass
class CandidateFigures:
    name: str
    size_bytes: int
    peak_rss_mb: float
    p50_ms: dict[int, float]  # threads -> batch-1 median latency
    p95_ms: dict[int, float]
    accuracy: float  # the guarded metric, 0..1: top-1 on the test split; detectors: mAP@0.5
    params: int | None = None
    notes: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    size_ratio: float = 1.0
    p50_ratio: dict[int, float] = field(default_factory=dict)
    accuracy_drop_pt: float = 0.0
    bundle: str | None = None
    metric: str = "accuracy"  # what `accuracy` holds: "accuracy" or "map50" (detectors)
    map50_95: float | None = None  # detectors: mAP@0.5:0.95 on the same images (reported)
    map50_95_drop_pt: float | None = None

    @property
    def metric_label(self) -> str:
        return METRIC_LABELS.get(self.metric, self.metric)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("p50_ms", "p95_ms", "p50_ratio"):
            d[key] = {str(k): v for k, v in d[key].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CandidateFigures:
        d = dict(d)
        for key in ("p50_ms", "p95_ms", "p50_ratio"):
            d[key] = {int(k): float(v) for k, v in d.get(key, {}).items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class GuardPolicy:
    max_drop_pt: float = 1.0  # refuse a candidate losing more test accuracy (points)
    # Refuse a candidate whose p50 exceeds fp32's by more than this at any thread count;
    # 0.05 absorbs measurement noise on a shared machine, not a real slowdown.
    latency_tolerance: float = 0.05
    allow_slower: bool = False
    allow_less_accurate: bool = False


def assess(cand: CandidateFigures, base: CandidateFigures, policy: GuardPolicy) -> list[str]:
    """Fill in the ratios against fp32 and return the reasons to refuse (empty: accepted)."""
    cand.size_ratio = round(cand.size_bytes / base.size_bytes, 4)
    cand.p50_ratio = {t: round(cand.p50_ms[t] / base.p50_ms[t], 3)
                      for t in cand.p50_ms if t in base.p50_ms}
    cand.accuracy_drop_pt = round(100 * (base.accuracy - cand.accuracy), 2)
    if cand.map50_95 is not None and base.map50_95 is not None:
        cand.map50_95_drop_pt = round(100 * (base.map50_95 - cand.map50_95), 2)
    reasons = []
    if cand.name == BASELINE:
        return reasons
    if not policy.allow_slower:
        for t, ratio in sorted(cand.p50_ratio.items()):
            if ratio > 1 + policy.latency_tolerance:
                reasons.append(f"slower than fp32 at {t} thread{'s' * (t > 1)}: p50 "
                               f"{cand.p50_ms[t]:.2f} ms vs {base.p50_ms[t]:.2f} ms "
                               f"({ratio:.2f}x)")
    if not policy.allow_less_accurate and cand.accuracy_drop_pt > policy.max_drop_pt:
        reasons.append(f"loses {cand.accuracy_drop_pt:.2f} points of {cand.metric_label} "
                       f"(max {policy.max_drop_pt:g}): {100 * cand.accuracy:.2f}% vs "
                       f"{100 * base.accuracy:.2f}%")
    cand.refused = reasons
    return reasons


@dataclass(frozen=True)
class DeviceProfile:
    max_ram_mb: float | None = None
    max_latency_ms: float | None = None
    min_accuracy: float | None = None  # 0..1
    threads: int = 1
    latency_stat: str = "p95"  # what the latency budget constrains: p50 or p95
    slowdown: float = 1.0  # device latency / this machine's latency
    max_size_mb: float | None = None
    include_refused: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FitDecision:
    chosen: CandidateFigures
    explanation: list[str]
    fitting: list[str]


def _latency(c: CandidateFigures, p: DeviceProfile) -> float | None:
    table = c.p95_ms if p.latency_stat == "p95" else c.p50_ms
    if p.threads in table:
        return table[p.threads] * p.slowdown
    return None


# Accuracy differences below this are within the test split's noise: prefer the faster one.
TIE_PT = 0.25


def choose(candidates: list[CandidateFigures], profile: DeviceProfile) -> FitDecision:
    """The most accurate candidate within the profile; near-ties go to the faster one."""
    lines: list[str] = []
    fitting: list[tuple[CandidateFigures, float]] = []
    for c in candidates:
        misses = []
        if c.refused and not profile.include_refused:
            misses.append("refused by the guards (" + "; ".join(c.refused) + ")")
        lat = _latency(c, profile)
        if lat is None:
            misses.append(f"no latency measured at {profile.threads} threads")
        elif profile.max_latency_ms is not None and lat > profile.max_latency_ms:
            misses.append(f"{profile.latency_stat} {lat:.2f} ms > {profile.max_latency_ms:g} ms")
        if profile.max_ram_mb is not None and c.peak_rss_mb > profile.max_ram_mb:
            misses.append(f"peak RSS {c.peak_rss_mb:.1f} MB > {profile.max_ram_mb:g} MB")
        if profile.max_size_mb is not None and c.size_bytes / 1e6 > profile.max_size_mb:
            misses.append(f"size {c.size_bytes / 1e6:.2f} MB > {profile.max_size_mb:g} MB")
        if profile.min_accuracy is not None and c.accuracy < profile.min_accuracy:
            misses.append(f"accuracy {100 * c.accuracy:.2f}% < {100 * profile.min_accuracy:.2f}%")
        if misses:
            lines.append(f"{c.name}: out: " + "; ".join(misses))
        else:
            fitting.append((c, lat or 0.0))
            lines.append(f"{c.name}: fits: accuracy {100 * c.accuracy:.2f}%, "
                         f"{profile.latency_stat} {lat:.2f} ms, peak RSS {c.peak_rss_mb:.1f} MB, "
                         f"{c.size_bytes / 1e6:.2f} MB")
    if not fitting:
        raise NoFitError("no candidate fits the device profile:\n  " + "\n  ".join(lines))
    best_acc = max(c.accuracy for c, _ in fitting)
    near = [(c, lat) for c, lat in fitting if 100 * (best_acc - c.accuracy) <= TIE_PT]
    chosen, lat = min(near, key=lambda cl: (cl[1], cl[0].size_bytes))
    why = (f"chose {chosen.name}: the most accurate of the {len(fitting)} fitting candidate(s)"
           if len(near) == 1 else
           f"chose {chosen.name}: {len(near)} fitting candidates are within {TIE_PT} points of "
           f"the best accuracy ({100 * best_acc:.2f}%), and it is the fastest of them "
           f"({profile.latency_stat} {lat:.2f} ms)")
    return FitDecision(chosen, [why, *lines], [c.name for c, _ in fitting])
