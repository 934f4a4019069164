"""Check-ins from a C load generator (wrk): every request a real device signature made
beforehand and sent once, so the generator's own cost stays out of the server's numbers.

A check-in is the agent's idle poll: `GET /api/v1/device/assignment`, signed with the
device's Ed25519 key (method, path, timestamp, a fresh nonce). Signatures are made before
the timed phase (they stay valid for `MAX_SKEW_S`), written one per line, and wrk's Lua
script hands each request the next line. The server's CPU per check-in is read from
/proc (the server process and all its children: uvicorn workers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from edgewise.trust._device_auth import sign_request

PATH = "/api/v1/device/assignment"
CLK_TCK = os.sysconf("SC_CLK_TCK")

_LUA = r"""
local lines, i, n = {}, 0, 0
init = function(args)
  for line in io.lines(args[1]) do n = n + 1; lines[n] = line end
end
request = function()
  i = i + 1
  if i > n then i = 1 end  -- reused signatures are refused (401): counted as errors
  return wrk.format("GET", "%(path)s", {["Authorization"] = lines[i]})
end
done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "non2xx": %%d, "errors": %%d, ' ..
    '"p50_us": %%d, "p99_us": %%d, "max_us": %%d}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def presign(devices: list[tuple[str, object]], count: int, out: Path) -> Path:
    """`count` signed check-ins spread over `devices` ((device id, private key) pairs)."""
    now = time.time()
    with out.open("w") as f:
        for k in range(count):
            device_id, key = devices[k % len(devices)]
            f.write(sign_request(key, device_id, "GET", PATH, now=now) + "\n")
    return out


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and every live descendant (uvicorn workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        todo.extend(children.get(p, []))
    return total


def run_wrk(url: str, signatures: Path, *, connections: int, seconds: float,
            server_pids: list[int], workdir: Path) -> dict:
    """One closed-loop wrk run; the server's CPU over it; latency from wrk's histogram."""
    script = workdir / "presigned.lua"
    script.write_text(_LUA % {"path": PATH})
    cpu0 = sum(tree_cpu_s(pid) for pid in server_pids)
    proc = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
         "-s", str(script), url, "--", str(signatures)],
        capture_output=True, text=True)
    cpu = sum(tree_cpu_s(pid) for pid in server_pids) - cpu0
    m = re.search(r"^WRKJSON (.*)$", proc.stdout, re.M)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    r = json.loads(m.group(1))
    ok = r["requests"] - r["non2xx"]
    wall = r["duration_us"] / 1e6
    return {"requests": r["requests"], "ok": ok, "non2xx": r["non2xx"],
            "socket_errors": r["errors"], "checkins_per_s": round(ok / wall, 1),
            "p50_ms": round(r["p50_us"] / 1000, 2), "p99_ms": round(r["p99_us"] / 1000, 2),
            "server_cpu_ms_per_checkin": round(cpu * 1000 / max(ok, 1), 3)}
