"""The compression report: JSON (machine-readable), a markdown table and a Pareto plot.

Invariant: the report only renders figures it was given (all measured in one `compress` run)
together with the CPU features and load of that run; it computes nothing but ratios and the
Pareto front.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._decide import BASELINE, CandidateFigures

__all__ = ["CompressReport", "pareto_front"]

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PARETO_PNG = "pareto.png"


@dataclass
class CompressReport:
    source: dict[str, Any]
    cpu: dict[str, Any]
    run: dict[str, Any]  # load average, versions, settings of this run
    candidates: list[CandidateFigures]
    failed: dict[str, str] = field(default_factory=dict)  # recipe -> why it produced nothing

    def candidate(self, name: str) -> CandidateFigures:
        for c in self.candidates:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_json(self) -> str:
        d = asdict(self)
        d["candidates"] = [c.as_dict() for c in self.candidates]
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> CompressReport:
        d = json.loads(text)
        d["candidates"] = [CandidateFigures.from_dict(c) for c in d["candidates"]]
        return cls(**d)

    @property
    def detector(self) -> bool:
        """Candidates measured by mAP (an object detector's report)."""
        return any(c.metric == "map50" for c in self.candidates)

    def json_lines(self) -> list[dict[str, Any]]:
        """One line per candidate, the benchmark's format."""
        lines = []
        for c in self.candidates:
            line = {"candidate": c.name, "size_ratio": c.size_ratio,
                    "p50_latency_ratio": c.p50_ratio.get(1),
                    "p50_latency_ratio_2t": c.p50_ratio.get(2)}
            if c.metric == "map50":
                line.update({"map50": round(c.accuracy, 4), "map50_drop_pt": c.accuracy_drop_pt,
                             "map50_95": None if c.map50_95 is None else round(c.map50_95, 4),
                             "map50_95_drop_pt": c.map50_95_drop_pt})
            else:
                line.update({"accuracy": round(c.accuracy, 4),
                             "accuracy_drop_pt": c.accuracy_drop_pt})
            line.update({"size_bytes": c.size_bytes, "peak_rss_mb": c.peak_rss_mb,
                         "p50_ms": c.p50_ms, "p95_ms": c.p95_ms, "params": c.params,
                         "refused": c.refused})
            lines.append(line)
        return lines

    def markdown(self) -> str:
        threads = sorted({t for c in self.candidates for t in c.p50_ms})
        cpu = self.cpu
        feats = ", ".join(k for k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8",
                                      "arm_dotprod", "arm_i8mm") if cpu.get(k)) or "none"
        head = ["candidate", "size MB", "size x", "peak RSS MB"]
        for t in threads:
            head += [f"p50 {t}t ms", f"p95 {t}t ms", f"p50 {t}t x"]
        if self.detector:
            head += ["mAP@0.5 %", "drop pt", "mAP@0.5:0.95 %", "drop pt", "verdict"]
        else:
            head += ["accuracy %", "drop pt", "verdict"]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in self.candidates:
            cells = [c.name, f"{c.size_bytes / 1e6:.2f}", f"{c.size_ratio:.3f}",
                     f"{c.peak_rss_mb:.1f}"]
            for t in threads:
                cells += [f"{c.p50_ms.get(t, float('nan')):.2f}",
                          f"{c.p95_ms.get(t, float('nan')):.2f}",
                          f"{c.p50_ratio.get(t, float('nan')):.2f}"]
            verdict = ("baseline" if c.name == BASELINE else
                       "REFUSED: " + "; ".join(c.refused) if c.refused else "accepted")
            cells += [f"{100 * c.accuracy:.2f}", f"{c.accuracy_drop_pt:+.2f}"]
            if self.detector:
                cells += ["-" if c.map50_95 is None else f"{100 * c.map50_95:.2f}",
                          "-" if c.map50_95_drop_pt is None else f"{c.map50_95_drop_pt:+.2f}"]
            cells.append(verdict)
            rows.append("| " + " | ".join(cells) + " |")
        out = [f"# Compression report: {self.source['name']} {self.source['version']}", "",
               f"CPU: {cpu.get('model') or cpu.get('arch')} ({cpu.get('arch')}, "
               f"{cpu.get('logical_cpus')} logical CPUs; int8-relevant features: {feats}). "
               f"Load average {self.run.get('load_avg_start')} at start, "
               f"{self.run.get('load_avg_end')} at end. Latency: batch 1, onnxruntime "
               f"{self.run.get('onnxruntime')}, interleaved, {self.run.get('latency_samples')} "
               f"samples per cell; "
               + (f"mAP (pycocotools) on {self.run.get('test_images')} held-out images of "
                  f"{self.run.get('data')}, each candidate run as a device runs it. "
                  if self.detector else
                  f"accuracy on {self.run.get('test_images')} test images. ")
               + "Ratios are against fp32 in this run.", "", *rows, ""]
        if self.failed:
            out += ["Recipes that produced no candidate:", ""]
            out += [f"- {k}: {v}" for k, v in self.failed.items()] + [""]
        notes = [(c.name, n) for c in self.candidates for n in c.notes]
        if notes:
            out += ["Notes:", ""] + [f"- {k}: {n}" for k, n in notes] + [""]
        return "\n".join(out)


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names not dominated in (lower cost, higher accuracy); points are (name, cost, accuracy)."""
    front = []
    for name, cost, acc in points:
        dominated = any((c2 <= cost and a2 >= acc) and (c2 < cost or a2 > acc)
                        for n2, c2, a2 in points if n2 != name)
        if not dominated:
            front.append(name)
    return front


def plot_pareto(report: CompressReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, label, cost in (
        (axes[0], "p50 latency, batch 1, 1 thread (ms)", lambda c: c.p50_ms.get(1)),
        (axes[1], "model file size (MB)", lambda c: c.size_bytes / 1e6),
    ):
        pts = [(c.name, cost(c), 100 * c.accuracy) for c in report.candidates
               if cost(c) is not None]
        ok = [p for p, c in zip(pts, report.candidates, strict=False) if not c.refused]
        front = set(pareto_front(ok))
        for i, ((name, x, y), c) in enumerate(zip(pts, report.candidates, strict=False)):
            colour = "tab:red" if c.refused else ("tab:green" if name in front else "tab:blue")
            ax.scatter([x], [y], c=colour, marker="x" if c.refused else "o", s=50, zorder=3)
            # staggered offsets: candidates often sit on top of each other
            ax.annotate(name, (x, y), textcoords="offset points",
                        xytext=(5, 4 + 9 * (i % 3) * (-1) ** i), fontsize=8)
        fx = sorted((x, y) for n, x, y in ok if n in front)
        if len(fx) > 1:
            ax.plot(*zip(*fx, strict=True), c="tab:green", lw=1, ls="--", zorder=2)
        ax.set_xscale("log")  # candidates span orders of magnitude
        ax.set_xlabel(label + ", log scale")
        ax.set_ylabel("held-out mAP@0.5 (%)" if report.detector else "test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report.source['name']} {report.source['version']}: green = Pareto front, "
                 "red x = refused", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
