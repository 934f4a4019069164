"""Device identity: a key pair generated on the device, and every device request signed with it.

At enrollment the agent generates an Ed25519 key pair; the private key never leaves the
device's state directory (mode 0600) and the server stores only the public key, so neither a
copy of the server's database nor a recorded request lets anyone act as the device. Each
device request carries

    Authorization: Edgewise-Device id=<device id>,ts=<unix seconds>,nonce=<hex>,sig=<base64>

where `sig` signs the lines `edgewise-device-v1`, the device id, the method, the path (with
`?query`), the timestamp, the nonce and the body's sha256.

Invariant (`verify_request` + `ReplayGuard`): the server accepts a device request only if the
signature verifies with the public key of that (enrolled, not revoked) device, the timestamp
is within `MAX_SKEW_S` of the server's clock, and the nonce was not used before in that
window: a request cannot be forged, altered (method, path, query and body are signed) or
replayed. This is the per-request equivalent of an mTLS client certificate at the
application layer (uvicorn does not hand the client certificate to the application).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "MAX_SKEW_S",
    "REPLAY_HEADER",
    "SCHEME",
    "DeviceAuth",
    "DeviceAuthError",
    "ReplayGuard",
    "ReplayedRequest",
    "SignedRequest",
    "busy_delay_s",
    "load_device_key",
    "new_device_key",
    "parse_device_auth",
    "public_key_hex",
    "sign_request",
    "verify_request",
]

SCHEME = "Edgewise-Device"
MAX_SKEW_S = 300
_PUBLIC_HEX = re.compile(r"^[0-9a-f]{64}$")
_HEADER = re.compile(rf"^{SCHEME} id=([A-Za-z0-9_-]{{1,32}}),ts=(\d{{1,12}}),"
                     r"nonce=([0-9a-f]{32}),sig=([A-Za-z0-9_=-]{86,88})$")


class DeviceAuthError(Exception):
    """A device request that is not signed, not signed right, stale or replayed."""


class ReplayedRequest(DeviceAuthError):
    """A nonce the server has already accepted. From a device's own client this means its
    first send reached a server whose answer was lost (a load balancer that re-sent the
    request to another replica after the first one died): the server answers 401 with
    `REPLAY_HEADER`, and `DeviceAuth` signs the request anew once."""

    def __init__(self) -> None:
        super().__init__("replayed device request (nonce already used)")


# The 401 for a replayed nonce says so in this header, so a client can tell it from a refusal
# of its key without reading the body (a download's body is streamed).
REPLAY_HEADER = "X-Edgewise-Auth-Refused"


def new_device_key() -> tuple[Ed25519PrivateKey, bytes]:
    """A fresh key pair: the key and its private PEM (to store 0600 on the device)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return key, pem


def load_device_key(pem: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise DeviceAuthError(f"device key is unreadable: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise DeviceAuthError("device key is not an Ed25519 key")
    return key


def public_key_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw).hex()


def _message(device_id: str, method: str, target: str, ts: int, nonce: str,
             body: bytes) -> bytes:
    return "\n".join(("edgewise-device-v1", device_id, method.upper(), target, str(ts), nonce,
                      hashlib.sha256(body).hexdigest())).encode()


def sign_request(key: Ed25519PrivateKey, device_id: str, method: str, target: str,
                 body: bytes = b"", *, now: float | None = None) -> str:
    """The Authorization header value for one request (`target`: path, then ?query)."""
    ts = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16)
    sig = key.sign(_message(device_id, method, target, ts, nonce, body))
    return (f"{SCHEME} id={device_id},ts={ts},nonce={nonce},"
            f"sig={base64.urlsafe_b64encode(sig).decode()}")


@dataclass(frozen=True)
class SignedRequest:
    device_id: str
    ts: int
    nonce: str
    signature: bytes


def parse_device_auth(header: str) -> SignedRequest:
    m = _HEADER.match(header.strip())
    if m is None:
        raise DeviceAuthError(f"missing or malformed device signature (Authorization: "
                              f"{SCHEME} id=...,ts=...,nonce=...,sig=...)")
    try:
        sig = base64.urlsafe_b64decode(m.group(4))
    except (binascii.Error, ValueError) as exc:
        raise DeviceAuthError("device signature is not base64") from exc
    return SignedRequest(m.group(1), int(m.group(2)), m.group(3), sig)


def _parse_public_key(public_key: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key))


def verify_request(signed: SignedRequest, public_key: str, method: str, target: str,
                   body: bytes, *, now: float | None = None,
                   public: Callable[[str], Ed25519PublicKey] = _parse_public_key) -> None:
    """Refuse a stale request or one whose signature does not verify with `public_key`
    (hex). `public`: how the key is parsed (a cache of parsed keys, on a hot path)."""
    now = time.time() if now is None else now
    if abs(now - signed.ts) > MAX_SKEW_S:
        raise DeviceAuthError(f"device request timestamp is {now - signed.ts:+.0f} s off the "
                              f"server's clock (at most {MAX_SKEW_S} s): check the device clock")
    if not _PUBLIC_HEX.match(public_key or ""):
        raise DeviceAuthError("this device has no key on record")
    try:
        public(public_key).verify(
            signed.signature, _message(signed.device_id, method, target, signed.ts, signed.nonce,
                                       body))
    except (InvalidSignature, ValueError) as exc:
        raise DeviceAuthError("device signature does not verify") from exc


class ReplayGuard:
    """Nonces seen within the clock-skew window, per device and per server process.

    Bounded per device (`per_device`), so one device sending too much locks out only itself.
    The memory does not survive a restart: a request captured (through TLS) could be replayed
    in the 5 minutes after one; it would repeat what the device itself asked, nothing else."""

    PRUNE_AT = 256  # a device's nonces are pruned from this many on (expired ones dropped)

    def __init__(self, per_device: int = 5_000) -> None:
        self._seen: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self._per_device = per_device

    def check(self, signed: SignedRequest, *, now: float | None = None,
              session: object = None) -> None:
        """Refuse a nonce seen before (`session`: unused; the database guard's argument)."""
        now = time.time() if now is None else now
        with self._lock:
            seen = self._seen.setdefault(signed.device_id, {})
            if signed.nonce in seen:
                raise ReplayedRequest()
            if len(seen) >= self.PRUNE_AT:
                seen = {n: t for n, t in seen.items() if t > now}
                self._seen[signed.device_id] = seen
                if len(seen) >= self._per_device:
                    raise DeviceAuthError("too many requests from this device in the last "
                                          f"{MAX_SKEW_S} s; retry later")
            seen[signed.nonce] = signed.ts + MAX_SKEW_S


def busy_delay_s(response: httpx.Response) -> float | None:
    """Seconds a 503/429 answer asks the client to wait (`Retry-After` in seconds or as an
    HTTP date), or None when the answer is something else or names no usable time."""
    if response.status_code not in (429, 503):
        return None
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), 3600.0)


class DeviceAuth(httpx.Auth):
    """httpx signs every request of a device's client with its key.

    Edge devices often boot with a wrong clock (no battery-backed RTC). When the server
    refuses a request and its `Date` header shows our clock is off by more than half the
    allowed skew, the request is signed again once with the server's time (the timestamp only
    bounds replays; the server is the one checking it).

    A server too busy to take a request (503 or 429 with `Retry-After`) is asked again after
    that many seconds times 1-2 (jitter, so a fleet told the same thing does not come back in
    one burst), signed anew (a nonce is never sent twice), at most `busy_retries` times and
    `max_busy_wait_s` in all; after that the caller sees the 503."""

    requires_request_body = True

    def __init__(self, device_id: str, key: Ed25519PrivateKey, *,
                 clock: Callable[[], float] = time.time, busy_retries: int = 3,
                 max_busy_wait_s: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 jitter: Callable[[], float] = random.random) -> None:
        self.device_id = device_id
        self._key = key
        self._clock = clock
        self.offset_s = 0.0  # server time - our clock, learnt from a refused request
        self._busy_retries = busy_retries
        self._max_busy_wait_s = max_busy_wait_s
        self._sleep = sleep
        self._jitter = jitter

    def _sign(self, request: httpx.Request) -> None:
        request.headers["Authorization"] = sign_request(
            self._key, self.device_id, request.method, request.url.raw_path.decode("ascii"),
            request.content, now=self._clock() + self.offset_s)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self._sign(request)
        response = yield request
        waited = 0.0
        for _ in range(self._busy_retries):
            delay = busy_delay_s(response)
            if delay is None:
                break
            delay *= 1 + self._jitter()
            if waited + delay > self._max_busy_wait_s:
                break
            self._sleep(delay)
            waited += delay
            self._sign(request)
            response = yield request
        if response.status_code == 401 and response.headers.get(REPLAY_HEADER) == "replayed":
            # Our earlier send of this request was accepted, its answer lost on the way.
            self._sign(request)
            response = yield request
        date = response.headers.get("date")
        if response.status_code != 401 or not date:
            return
        try:
            offset = parsedate_to_datetime(date).timestamp() - self._clock()
        except (TypeError, ValueError):
            return
        if abs(offset - self.offset_s) > MAX_SKEW_S / 2:
            self.offset_s = offset
            self._sign(request)
            yield request
