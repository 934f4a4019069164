"""CPU feature detection, recorded with every measurement.

Invariant: the features come from the kernel's own report (/proc/cpuinfo on Linux), never from
guesses based on the model name; on other systems only the architecture is known and every
feature reads False.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["CpuInfo", "detect_cpu", "parse_cpuinfo"]


@dataclass(frozen=True)
class CpuInfo:
    arch: str
    model: str
    logical_cpus: int
    avx2: bool
    avx512f: bool
    avx512_vnni: bool
    avx_vnni: bool
    amx_int8: bool
    arm_dotprod: bool  # ARMv8.2 SDOT/UDOT ("asimddp")
    arm_i8mm: bool

    @property
    def is_x86(self) -> bool:
        return self.arch in ("x86_64", "AMD64", "i686", "i386")

    @property
    def int8_dot(self) -> bool:
        """Whether the CPU has a native 8-bit dot-product instruction (VNNI / dotprod)."""
        return self.avx512_vnni or self.avx_vnni or self.amx_int8 or self.arm_dotprod

    def as_dict(self) -> dict:
        return {**asdict(self), "int8_dot": self.int8_dot}


def parse_cpuinfo(text: str, arch: str, logical_cpus: int = 1) -> CpuInfo:
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
    return CpuInfo(
        arch=arch, model=model, logical_cpus=logical_cpus,
        avx2="avx2" in flags, avx512f="avx512f" in flags,
        avx512_vnni="avx512_vnni" in flags or "avx512vnni" in flags,
        avx_vnni="avx_vnni" in flags, amx_int8="amx_int8" in flags,
        arm_dotprod="asimddp" in flags, arm_i8mm="i8mm" in flags,
    )


def detect_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    return parse_cpuinfo(text, platform.machine(), os.cpu_count() or 1)
