"""The server under concurrent device load (issue 24): a real server process on SQLite and on
PostgreSQL, real signed device requests, many more at once than the database pool holds.

Before the fix, the 16th simultaneous check-in stalled the whole server for good (an async
dependency ran the synchronous database session on the event loop), a publish hashed and
stored its files on the event loop, and SIGTERM could not stop the server.
"""

from __future__ import annotations

import os
import secrets
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgewise.agent._client import enroll_device
from edgewise.artifacts import write_bundle
from edgewise.server.client import OperatorClient, publish_bundle
from edgewise.sim import ServerProcess
from edgewise.trust import DeviceAuth
from edgewise.trust._device_auth import new_device_key, public_key_hex
from tests._postgres import pg_bin_dir, throwaway_postgres
from tests.conftest import LABELS, PRE, make_tiny_bundle, tiny_onnx

CONCURRENT = 64  # well above the pool (16 slots + 4 background sessions)

needs_postgres = pytest.mark.skipif(pg_bin_dir() is None and not os.environ.get("CI"),
                                    reason="PostgreSQL binaries not installed")
DATABASES = ["sqlite", pytest.param("postgresql", marks=needs_postgres)]


@contextmanager
def database(kind: str) -> Iterator[str | None]:
    if kind == "sqlite":
        yield None  # the server's embedded default: a SQLite file in its data directory
    else:
        with throwaway_postgres() as url:
            yield url


@dataclass
class Fleet:
    server: ServerProcess
    admin: OperatorClient
    devices: list[httpx.Client]


@contextmanager
def start_fleet(tmp_path: Path, keys, db_url: str | None, *, busy_retries: int = 0,
                server_args: tuple[str, ...] = ()) -> Iterator[Fleet]:
    token = secrets.token_urlsafe(24)
    server = ServerProcess(data_dir=tmp_path / "srv", root_path=keys.root_json,
                           online_key_path=keys.online_key, admin_token=token, db_url=db_url,
                           log_path=tmp_path / "server.log", extra_args=server_args).start()
    admin = OperatorClient(server.url, token=token)
    devices = []
    try:
        for i in range(CONCURRENT):
            key, _pem = new_device_key()
            device_id, _root = enroll_device(
                server.url, token=admin.create_enrollment_token(),
                public_key=public_key_hex(key), name=f"d{i}", hardware="test")
            devices.append(httpx.Client(base_url=server.url, timeout=60,
                                        auth=DeviceAuth(device_id, key,
                                                        busy_retries=busy_retries)))
        yield Fleet(server=server, admin=admin, devices=devices)
    finally:
        for client in devices:
            client.close()
        admin.close()
        server.stop()


@pytest.fixture(params=DATABASES)
def fleet(request, tmp_path: Path, keys) -> Iterator[Fleet]:
    # No busy retries: a 503 must show up in the tests, not be waited out.
    with database(request.param) as db_url, start_fleet(tmp_path, keys, db_url) as fleet:
        yield fleet


def checkins_at_once(devices: list[httpx.Client],
                     answers: list[httpx.Response] | None = None) -> list[tuple[int, float]]:
    """Every device asks for its assignment at the same instant: (status, seconds) each;
    the responses are appended to `answers` if given."""
    start = threading.Barrier(len(devices))
    results: list[tuple[int, float]] = [(0, 0.0)] * len(devices)

    def one(i: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        try:
            response = devices[i].get("/api/v1/device/assignment")
            status = response.status_code
            if answers is not None:
                answers.append(response)
        except httpx.HTTPError:
            status = -1
        results[i] = (status, time.perf_counter() - t0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(devices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.slow
def test_64_concurrent_signed_checkins_are_all_answered_within_1_s(fleet: Fleet) -> None:
    for _round in range(3):
        results = checkins_at_once(fleet.devices)
        statuses = sorted({s for s, _ in results})
        slowest = max(t for _, t in results)
        assert statuses == [200], statuses
        assert slowest < 1.0, f"slowest check-in {slowest:.2f} s"
    # And the server still answers everything else at once.
    assert httpx.get(f"{fleet.server.url}/docs", timeout=5).status_code == 200


@pytest.mark.slow
def test_an_overloaded_server_answers_503_with_retry_after_and_devices_come_back(
        tmp_path: Path, keys) -> None:
    # One database slot and a short line: most of 64 simultaneous check-ins cannot be served
    # in time. They must get a quick 503 with Retry-After, not a 30 s stall.
    tight = ("--db-slots", "1", "--queue-timeout-s", "0.05")
    with start_fleet(tmp_path, keys, None, server_args=tight) as fleet:
        answers: list[httpx.Response] = []
        t0 = time.perf_counter()
        results = checkins_at_once(fleet.devices, answers)
        took = time.perf_counter() - t0
        busy = [a for a in answers if a.status_code == 503]
        assert busy and {s for s, _ in results} <= {200, 503}
        assert took < 5, f"{took:.1f} s for one round"
        assert {a.headers["retry-after"] for a in busy} == {"2"}
        assert "busy" in busy[0].json()["detail"]
        # Devices that honour Retry-After (with jitter, signed anew) all get through.
        for client in fleet.devices:
            client.auth._busy_retries = 6
            client.auth._max_busy_wait_s = 60
        results = checkins_at_once(fleet.devices)
        assert {s for s, _ in results} == {200}


def big_bundle(out: Path, size_bytes: int) -> Path:
    """A real bundle with one large incompressible file (a stand-in for a big model)."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(16, 3)).astype(np.float32)
    inputs = rng.normal(size=(2, 1, 4, 4)).astype(np.float32)
    write_bundle(out, name="big", version="1.0.0", labels=LABELS, preprocessing=PRE,
                 model=tiny_onnx(weights), golden_inputs=inputs,
                 golden_outputs=inputs.reshape(2, 16) @ weights, atol=1e-3,
                 max_latency_ms=1000,
                 extra_files={"weights.data": rng.bytes(size_bytes)})
    return out


def poll_p99_ms(devices: list[httpx.Client], stop: threading.Event,
                min_s: float = 0.0) -> list[float]:
    """Devices polling back to back (8 at a time) until `stop` and `min_s` have passed."""
    latencies: list[float] = []
    lock = threading.Lock()
    until = time.monotonic() + min_s

    def loop(group: list[httpx.Client]) -> None:
        mine = []
        while not stop.is_set() or time.monotonic() < until:
            for client in group:
                t0 = time.perf_counter()
                assert client.get("/api/v1/device/assignment").status_code == 200
                mine.append((time.perf_counter() - t0) * 1000)
                time.sleep(0.02)
        with lock:
            latencies.extend(mine)

    groups = [devices[i::8] for i in range(8)]
    threads = [threading.Thread(target=loop, args=(g,)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(latencies)


def p99(sorted_ms: list[float]) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * 0.99))]


@pytest.mark.slow
def test_300_mb_publish_beside_polling_devices(fleet: Fleet, tmp_path: Path, keys) -> None:
    bundle = big_bundle(tmp_path / "big", 300 << 20)
    quiet = threading.Event()
    quiet.set()
    baseline = poll_p99_ms(fleet.devices, quiet, min_s=4.0)

    published: dict = {}
    stop = threading.Event()
    started = threading.Event()

    def publish() -> None:
        started.set()
        try:
            published.update(publish_bundle(fleet.admin, bundle, root_path=keys.root_json,
                                            targets_key_path=keys.targets_key))
        finally:
            stop.set()

    publisher = threading.Thread(target=publish)
    publisher.start()
    started.wait()
    during = poll_p99_ms(fleet.devices, stop)
    publisher.join()

    print(f"poll p99 {p99(during):.0f} ms during the publish, {p99(baseline):.0f} ms without")
    assert published.get("size_bytes", 0) > 300 << 20  # the publish itself succeeded
    assert len(during) > 50, "too few polls during the publish to judge"
    # The publisher's own signing and upload share these 2 cores, so some slowdown is
    # physics; the stall was seconds per poll.
    assert p99(during) <= p99(baseline) + 150, (
        f"p99 {p99(during):.0f} ms while publishing vs {p99(baseline):.0f} ms without "
        f"(median {statistics.median(during):.0f} vs {statistics.median(baseline):.0f})")


@pytest.mark.slow
def test_sigterm_under_load_exits_within_10_s(fleet: Fleet, tmp_path: Path, keys) -> None:
    # Load: devices polling back to back, and a publish in flight.
    release = publish_bundle(fleet.admin, make_tiny_bundle(tmp_path / "b"),
                             root_path=keys.root_json, targets_key_path=keys.targets_key)
    fleet.admin.assign(release["id"])
    stop = threading.Event()
    errors: list[str] = []

    def hammer(client: httpx.Client) -> None:
        while not stop.is_set():
            try:
                client.get("/api/v1/device/assignment")
            except httpx.HTTPError as exc:  # expected once the server is gone
                errors.append(type(exc).__name__)
                return

    threads = [threading.Thread(target=hammer, args=(c,)) for c in fleet.devices]
    for t in threads:
        t.start()
    time.sleep(1.5)
    proc = fleet.server.proc
    assert proc is not None and proc.poll() is None
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    took = time.monotonic() - t0
    assert took < 10
    # uvicorn finishes its graceful shutdown, then re-raises the signal it caught.
    assert proc.returncode in (0, -signal.SIGTERM), proc.returncode
    assert len(errors) == len(fleet.devices)  # every device saw the server go away
    print(f"exited {took:.2f} s after SIGTERM")


# ---- the device side of a 503: Retry-After honoured with jitter, signed anew ---------------

def busy_then_ok(busy_times: int, retry_after: str = "2"):
    """A transport answering 503 + Retry-After `busy_times` times, then 200; it records the
    Authorization header of every request it saw."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        if len(seen) <= busy_times:
            return httpx.Response(503, headers={"Retry-After": retry_after},
                                  json={"detail": "busy"})
        return httpx.Response(200, json={"release_id": None})

    return httpx.MockTransport(handler), seen


def test_device_requests_wait_out_retry_after_with_jitter_and_a_fresh_signature() -> None:
    key, _ = new_device_key()
    slept: list[float] = []
    jitters = iter([0.0, 0.5, 1.0])
    transport, seen = busy_then_ok(3)
    auth = DeviceAuth("dev-1", key, busy_retries=3, sleep=slept.append,
                      jitter=lambda: next(jitters))
    with httpx.Client(transport=transport, auth=auth) as client:
        r = client.get("http://server/api/v1/device/assignment")
    assert r.status_code == 200
    assert slept == [2.0, 3.0, 4.0]  # Retry-After x (1 + jitter), jitter in [0, 1)
    assert len(set(seen)) == 4  # every attempt carries its own nonce and signature


@pytest.mark.parametrize(("retry_after", "busy_retries", "max_wait_s"), [
    ("2", 2, 30.0),  # more busy answers than retries
    ("20", 3, 30.0),  # the next wait would pass the total budget
    ("soon", 3, 30.0),  # no usable time given: not retried at all
    ("nan", 3, 30.0),
])
def test_device_requests_give_up_on_a_server_that_stays_busy(retry_after: str,
                                                             busy_retries: int,
                                                             max_wait_s: float) -> None:
    key, _ = new_device_key()
    slept: list[float] = []
    transport, _seen = busy_then_ok(10, retry_after)
    auth = DeviceAuth("dev-1", key, busy_retries=busy_retries, max_busy_wait_s=max_wait_s,
                      sleep=slept.append, jitter=lambda: 0.5)
    with httpx.Client(transport=transport, auth=auth) as client:
        r = client.get("http://server/api/v1/device/assignment")
    assert r.status_code == 503
    assert sum(slept) <= max_wait_s
    if retry_after == "2":
        assert slept == [3.0, 3.0]
    if retry_after == "20":
        assert slept == [30.0]  # 20 x 1.5 = 30: a second wait would pass the budget
    if retry_after in ("soon", "nan"):
        assert slept == []
