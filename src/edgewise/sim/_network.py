"""Simulated networks as an httpx transport (the agent's network seam).

Invariant: a profile only delays, drops or damages what the real transport carries; requests
still reach the real server over real sockets, and damaged bytes are caught by the agent's own
TUF verification, never by the simulator.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import httpx

from ._scenario import NetworkProfile

__all__ = ["DeviceLink", "LinkStats", "SimTransport", "shared_transport"]


def shared_transport(connections: int) -> httpx.HTTPTransport:
    """One connection pool for every simulated device of the process (thread-safe)."""
    return httpx.HTTPTransport(limits=httpx.Limits(max_connections=connections,
                                                   max_keepalive_connections=connections))


@dataclass
class LinkStats:
    """Counters shared by all links of a fleet (updated under a lock)."""

    bytes_down: int = 0
    bytes_up: int = 0
    requests: int = 0
    dropped: int = 0
    damaged: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # check-ins only
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class DeviceLink:
    """One device's network: its profile plus what faults still wait for it."""

    profile: NetworkProfile
    rng: random.Random
    phase_s: float = 0.0  # offset of this device's disconnect schedule
    damage_left: int = 0  # target downloads still to corrupt or truncate
    damage_mode: str = "corrupt"
    bytes_down: int = 0
    armed: bool = False  # the profile applies from the rollout on (the baseline is factory)

    def offline(self, now: float) -> bool:
        p = self.profile
        if not self.armed or p.disconnect_every_s <= 0 or p.disconnect_for_s <= 0:
            return False
        return (now + self.phase_s) % p.disconnect_every_s < p.disconnect_for_s


_CLEAN = NetworkProfile(name="clean")


class SimTransport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport, link: DeviceLink, stats: LinkStats,
                 *, record_latency: bool = False) -> None:
        self._inner = inner
        self._link = link
        self._stats = stats
        self._record_latency = record_latency

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        link = self._link
        p = link.profile if link.armed else _CLEAN
        if link.offline(time.time()) or (p.loss and link.rng.random() < p.loss):
            with self._stats.lock:
                self._stats.dropped += 1
            raise httpx.ConnectError("simulated network outage", request=request)
        delay_ms = p.latency_ms + (link.rng.uniform(-p.jitter_ms, p.jitter_ms)
                                   if p.jitter_ms else 0.0)
        if delay_ms > 0:
            time.sleep(delay_ms / 1000)
        t0 = time.perf_counter()
        response = self._inner.handle_request(request)
        try:
            # Raw bytes: the client still decodes them (an in-memory response is already read).
            raw = response.content if response.is_stream_consumed else b"".join(
                response.iter_raw())
        finally:
            response.close()
        elapsed_ms = (time.perf_counter() - t0) * 1000
        if p.bandwidth_kbps:
            time.sleep(len(raw) * 8 / (p.bandwidth_kbps * 1000))
        path = request.url.path
        damaged = False
        if link.damage_left > 0 and response.status_code == 200 and \
                path.startswith("/tuf/targets/") and len(raw) > 1:
            link.damage_left -= 1
            damaged = True
            if link.damage_mode == "truncate":
                raw = raw[: len(raw) // 2]
            else:
                i = link.rng.randrange(len(raw))
                raw = raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:]
        headers = [(k, v) for k, v in response.headers.raw if k.lower() != b"content-length"]
        link.bytes_down += len(raw)
        with self._stats.lock:
            self._stats.requests += 1
            self._stats.bytes_down += len(raw)
            # read(): a redirected request's body is a stream not read yet (it is empty).
            self._stats.bytes_up += len(request.read() or b"")
            self._stats.damaged += damaged
            if self._record_latency and path == "/api/v1/device/assignment":
                self._stats.latencies_ms.append(elapsed_ms)
        return httpx.Response(response.status_code, headers=headers, content=raw,
                              request=request, extensions=response.extensions)

    def close(self) -> None:
        pass  # the inner pool is shared by the whole fleet; the fleet closes it
