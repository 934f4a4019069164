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


def pgbench_ceiling(db_url: str, *, connections: int, seconds: float, workdir: Path) -> dict:
    """PostgreSQL's own rate for a check-in's statements (the read of `checkin._POLL` and
    the nonce insert, each in autocommit as the server sends them), from pgbench on this
    machine: the ceiling the server's rate is a fraction of."""
    import glob

    from sqlalchemy import create_engine, text
    from sqlalchemy.dialects import postgresql

    from edgewise.server.devices.checkin import _POLL

    pgbench = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench")) or [shutil.which("pgbench")]
    if not pgbench or pgbench[-1] is None:
        raise RuntimeError("pgbench not found (Debian: postgresql-client)")
    url = db_url.replace("postgresql+psycopg://", "postgresql://")
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS bench_devices"))
        conn.execute(text("CREATE TABLE bench_devices AS SELECT row_number() OVER "
                          "(ORDER BY id) AS n, id FROM devices"))
        conn.execute(text("ALTER TABLE bench_devices ADD PRIMARY KEY (n)"))
        n = conn.execute(text("SELECT count(*) FROM bench_devices")).scalar_one()
    engine.dispose()
    poll = str(_POLL.compile(dialect=postgresql.dialect(),
                             compile_kwargs={"render_postcompile": True}))
    poll = poll.replace("%(device_id)s::VARCHAR", "(SELECT id FROM bench_devices WHERE n = :n)")
    poll = poll.replace("%(param_1)s::INTEGER", "1").replace("%(param_2)s::VARCHAR", "'null'")
    script = workdir / "checkin.sql"
    script.write_text(
        "\\set n random(1, :ndev)\n" + " ".join(poll.split()) + ";\n"
        "INSERT INTO device_nonces (device_id, nonce, expires_at) VALUES ((SELECT id FROM "
        "bench_devices WHERE n = :n), md5(random()::text || clock_timestamp()::text), "
        "extract(epoch from now()) + 300);\n")
    done = subprocess.run(
        [pgbench[-1], "-n", "-M", "prepared", "-c", str(connections), "-j", "2",
         "-T", str(max(1, round(seconds))), "-D", f"ndev={n}", "-f", str(script), url],
        capture_output=True, text=True)
    m = re.search(r"tps = ([0-9.]+)", done.stdout)
    if done.returncode != 0 or m is None:
        raise RuntimeError(f"pgbench failed: {done.stdout}\n{done.stderr}")
    lat = re.search(r"latency average = ([0-9.]+) ms", done.stdout)
    return {"pgbench_checkins_per_s": round(float(m.group(1)), 1),
            "pgbench_latency_avg_ms": float(lat.group(1)) if lat else None}
