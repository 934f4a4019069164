"""100,000 enrolled devices polling: server CPU per check-in, RSS and database size, and what
a realistic poll interval costs.

The devices are real enrollments in the database (each with its own Ed25519 key, written
straight into the devices table: enrolling 100,000 through the API would measure
enrollment, not polling) and a release assigned to all of them; the server is the real one
(uvicorn, PostgreSQL). wrk sends check-ins signed beforehand with those keys (`_presigned`),
spread over the whole fleet, at a fixed concurrency; the server's CPU is read from /proc.

Prints JSON lines:
  {"bench": "polling", "devices": 100000, "checkins_per_s": ..., "p99_ms": ...,
   "server_cpu_ms_per_checkin": ..., "server_rss_mb": ..., "db_bytes": ...,
   "cores_at_poll_60s": ..., "cores_at_poll_300s": ..., "load_avg_1m": ...}

    python bench/fleet_polling.py --devices 100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from _presigned import presign, run_wrk
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, insert, text

from edgewise.server.devices.models import Device
from edgewise.server.releases.models import Release
from edgewise.sim import ServerProcess
from edgewise.sim._postgres import throwaway_postgres
from edgewise.sim._processes import tree_rss_mb
from edgewise.trust import init_keys, public_key_hex


def emit(line: dict) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--signed", type=int, default=40_000, help="requests signed beforehand")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleet-polling-"))
    keys = init_keys(work / "keys")
    rng = random.Random(1)
    with throwaway_postgres() as url:
        server = ServerProcess(data_dir=work / "srv", root_path=keys.root_json,
                               online_key_path=keys.online_key,
                               admin_token=secrets.token_urlsafe(24), db_url=url,
                               log_path=work / "server.log").start(timeout_s=60)
        try:
            device_keys = [Ed25519PrivateKey.generate() for _ in range(args.devices)]
            now = datetime.utcnow()
            engine = create_engine(url)
            with engine.begin() as conn:
                conn.execute(insert(Release), [dict(
                    id="rel-polling", name="m", version="1.0.0",
                    manifest_target="m/1.0.0/edgewise.json", targets_version=1,
                    size_bytes=1, manifest={}, deltas=[])])
                for start in range(0, args.devices, 10_000):
                    conn.execute(insert(Device), [dict(
                        id=f"dev-{i:08x}", name=f"d{i}", hardware="generic",
                        public_key=public_key_hex(device_keys[i]), state="committed",
                        release_id="rel-polling", assigned_release_id="rel-polling",
                        status={}, tags=["site=a" if i % 2 else "site=b"], timezone="UTC",
                        enrolled_at=now)
                        for i in range(start, min(start + 10_000, args.devices))])
            picked = [(f"dev-{i:08x}", device_keys[i])
                      for i in rng.sample(range(args.devices), min(args.signed, args.devices))]
            sigs = presign(picked, args.signed, work / "signatures.txt")
            load = os.getloadavg()[0]
            r = run_wrk(server.url, sigs, connections=args.concurrency, seconds=args.seconds,
                        server_pids=[server.proc.pid], workdir=work)
            with engine.connect() as conn:
                db_bytes = conn.execute(text("SELECT pg_database_size(current_database())")
                                        ).scalar_one()
            engine.dispose()
            cpu_s = r["server_cpu_ms_per_checkin"] / 1000
            emit({"bench": "polling", "devices": args.devices, "db": "postgresql",
                  "concurrency": args.concurrency, **r,
                  "server_rss_mb": round(tree_rss_mb(server.proc.pid), 1),
                  "db_bytes": db_bytes,
                  # Server CPU (cores, busy fraction) the fleet needs at a poll interval.
                  "cores_at_poll_60s": round(args.devices / 60 * cpu_s, 2),
                  "cores_at_poll_300s": round(args.devices / 300 * cpu_s, 2),
                  "load_avg_1m_before": round(load, 2),
                  "load_avg_1m": round(os.getloadavg()[0], 2)})
        finally:
            server.stop()


if __name__ == "__main__":
    main()
