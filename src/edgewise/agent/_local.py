"""What the device's own users see: status, local inference, and the localhost-only API.

Invariant: the HTTP API binds to a loopback address only and never forwards an image or a
prediction to the server; inference always uses the active slot.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..artifacts import AppManifest, BundleError, LlmAdapterManifest, LlmManifest, read_manifest
from ..llm import LlamaModel
from ..trust import client_tls, load_root, public_key_hex
from ._anomaly import DriftLog, detector_identity, local_threshold
from ._chat import ChatError, ServedLlm, chat_completion, chat_stream, models_list
from ._client import enroll_device
from ._detect import DetectionPrediction
from ._errors import AgentConfigError, HealthCheckFailed, NoModelError
from ._llm import load_adapter_llm, load_llm
from ._runtime import OnnxModel, Prediction
from ._slots import SlotStore
from ._store import Identity, StateDir

__all__ = ["LocalApi", "LocalModel", "agent_status", "enroll"]

log = logging.getLogger("edgewise.agent.api")
MAX_IMAGE_BYTES = 16 << 20
MAX_CHAT_BYTES = 1 << 20


def enroll(state_dir: Path, *, server_url: str, token: str, root_path: Path, name: str,
           hardware: str, tags: list[str] | None = None, timezone: str = "UTC",
           ca_path: Path | None = None, insecure_dev: bool = False) -> Identity:
    """Enroll: pin the TUF root (and the server's CA), generate this device's key pair and
    register its public key (the private key never leaves `state_dir`)."""
    paths = StateDir(state_dir)
    if paths.identity_path.exists():
        raise AgentConfigError(f"{state_dir} is already enrolled; use a new state directory")
    if server_url.startswith("http://") and not insecure_dev:
        raise AgentConfigError("refusing plain HTTP: use https:// (and --ca), or --insecure-dev "
                               "for local development")
    if not server_url.startswith(("https://", "http://")):
        raise AgentConfigError(f"server URL must be https://..., not {server_url!r}")
    root = load_root(root_path)  # refuse a file that is not TUF root metadata
    ca_pem = None
    if ca_path is not None:
        try:
            ca_pem = Path(ca_path).read_bytes()
        except OSError as exc:
            raise AgentConfigError(f"cannot read CA certificate {ca_path}: {exc}") from exc
        if b"BEGIN CERTIFICATE" not in ca_pem:
            raise AgentConfigError(f"{ca_path} is not a PEM certificate")
    try:
        key = paths.ensure_device_key()
    except OSError as exc:
        raise AgentConfigError(f"cannot write the device key in {state_dir}: {exc}") from exc
    device_id, director_root = enroll_device(
        server_url, token=token, public_key=public_key_hex(key), name=name, hardware=hardware,
        tags=tags, timezone=timezone, verify=client_tls(ca_path))
    identity = Identity(server_url=server_url.rstrip("/"), device_id=device_id, name=name,
                        hardware=hardware, pinned_ca=ca_pem is not None)
    paths.save_identity(identity, root.to_bytes(), director_root, ca_pem)
    return identity


def agent_status(state_dir: Path) -> dict[str, Any]:
    paths = StateDir(state_dir)
    identity = paths.load_identity()
    rec = paths.load_record()
    slots = SlotStore(paths.slots_dir)
    return {
        "device_id": identity.device_id,
        "name": identity.name,
        "server": identity.server_url,
        "state": rec.state.value,
        "release": rec.installed.label if rec.installed else None,
        "release_id": rec.installed.release_id if rec.installed else None,
        "release_counter": rec.release_counter,
        "active_slot": slots.active(),
        "updating_to": rec.target.label if rec.target else None,
        "upcoming": _upcoming(paths, rec),
        "last_error": rec.last_error,
        "last_health": rec.last_health,
        "pending_reports": len(rec.outbox),
        "history": rec.history[-20:],
        "drift": DriftLog(state_dir).summary(),
        # The device's other components (container apps), each with its own update state.
        "components": {name: _component_status(paths, sub)
                       for name, sub in sorted(rec.components.items())},
    }


def _component_status(paths: StateDir, rec) -> dict[str, Any]:
    slots = SlotStore(paths.slots_dir / "components" / rec.component)
    return {"state": rec.state.value,
            "release": rec.installed.label if rec.installed else None,
            "release_id": rec.installed.release_id if rec.installed else None,
            "active_slot": slots.active(),
            "updating_to": rec.target.label if rec.target else None,
            "last_error": rec.last_error, "last_health": rec.last_health}


def _upcoming(paths: StateDir, rec) -> dict[str, Any] | None:
    """What users should know before an update installs: which, when, and until when they
    may defer it."""
    from datetime import UTC, datetime, timedelta

    from ..windows import next_window_start
    from ._userinput import deferred_until

    if rec.target is None:
        return None
    window = rec.target.window
    now = datetime.now(UTC)
    try:
        opens = next_window_start(window, now, rec.target.timezone)
    except ValueError:
        opens = None
    deferred = deferred_until(paths, rec)
    max_defer_s = int((window or {}).get("max_defer_s", 0))
    seen = datetime.fromisoformat(rec.target_seen_at) if rec.target_seen_at else now
    return {
        "release": rec.target.label,
        "release_id": rec.target.release_id,
        "rollout_id": rec.target.rollout_id,
        "window": window,
        "timezone": rec.target.timezone,
        "installs_from": max(filter(None, [opens, deferred, now])).isoformat(timespec="seconds"),
        "deferred_until": deferred.isoformat(timespec="seconds") if deferred else None,
        "may_defer_until": (seen + timedelta(seconds=max_defer_s)).isoformat(timespec="seconds")
        if max_defer_s else None,
    }


class LocalModel:
    """The active slot's model (an `OnnxModel`, or a `LlamaModel` for an LLM release, with its
    LoRA adapter applied for an adapter release), loaded on first use and reloaded when the
    active slot or the release in it changes (an adapter committed or rolled back: no agent
    restart)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.slots = SlotStore(StateDir(state_dir).slots_dir)
        self._loaded: tuple[tuple[str, str | None], Any, Any] | None = None
        self._lock = threading.Lock()

    def _active(self) -> tuple[Any, Any]:
        with self._lock:
            slot = self.slots.active()
            if slot is None:
                raise NoModelError("no model installed yet on this device")
            key = (slot, (self.slots.meta(slot) or {}).get("release_id"))
            if self._loaded is None or self._loaded[0] != key:
                # The old model is not closed here: a request may still be answering from
                # it; it is freed when the last one lets go of it.
                self._loaded = None
                path = self.slots.path(slot)
                try:
                    manifest = read_manifest(path)
                except BundleError as exc:
                    raise NoModelError(f"the active slot holds no readable bundle: {exc}"
                                       ) from exc
                if isinstance(manifest, AppManifest):
                    raise NoModelError(f"the active release {manifest.release_name} is a "
                                       "container app: this device runs no model")
                if isinstance(manifest, LlmAdapterManifest):
                    # The base (linked into the adapter's slot) with the adapter applied.
                    loaded, base = load_adapter_llm(path, manifest)
                    manifest = ServedLlm(base, manifest)
                elif isinstance(manifest, LlmManifest):
                    loaded, manifest = load_llm(path, manifest), ServedLlm(manifest)
                else:
                    loaded = OnnxModel(path)
                self._loaded = (key, loaded, manifest)
            return self._loaded[1], self._loaded[2]

    def model(self) -> OnnxModel:
        model, manifest = self._active()
        if not isinstance(model, OnnxModel):
            raise NoModelError(f"the active release {manifest.release_name} is an LLM: use "
                               "POST /v1/chat/completions or `edgewise agent chat`")
        return model

    def llm(self) -> tuple[LlamaModel, ServedLlm]:
        model, manifest = self._active()
        if not isinstance(model, LlamaModel):
            raise NoModelError(f"the active release {manifest.release_name} is not an LLM")
        return model, manifest

    def predict(self, image: bytes, *, top_k: int = 3
                ) -> tuple[Prediction | DetectionPrediction, dict[str, Any]]:
        model = self.model()
        meta = self.slots.meta(self.slots.active() or "a") or {}
        prediction = model.predict(image, top_k=top_k)
        spec = model.manifest.detector
        if prediction.anomaly is not None and spec is not None:
            release = model.manifest.release_name
            local = local_threshold(self.state_dir, release,
                                    detector_identity(model.manifest))
            if local is not None:  # `learn-normal` fitted this device's own threshold
                prediction = _with_threshold(prediction, local, model.manifest.kind)
            # aggregates only: the image and its individual score stay here
            DriftLog(self.state_dir).record(prediction.anomaly["score"], spec, release,
                                            threshold=local)
        return prediction, meta


def _with_threshold(prediction: Prediction, threshold: float, kind: str) -> Prediction:
    from dataclasses import replace

    bad = prediction.anomaly["score"] > threshold
    anomaly = {**prediction.anomaly, "threshold": threshold, "anomalous": bad,
               "calibration": "device"}
    if kind != "image-classifier":
        return replace(prediction, label="anomalous" if bad else "normal", index=int(bad),
                       anomaly=anomaly)
    return replace(prediction, anomaly=anomaly)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 60  # a client that stops reading a stream does not hold the model for ever

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug(fmt, *args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/status":
            self._send(200, agent_status(self.server.state_dir))
        elif self.path == "/healthz":
            self._send(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._send(200, models_list(self.server.model))
        else:
            self._send(404, {"detail": "not found"})

    def _chat(self) -> None:
        """OpenAI-style chat completions; `stream: true` answers as server-sent events. The
        request and the answer exist only in this process's memory."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length <= 0 or length > MAX_CHAT_BYTES:
            self._send(413 if length > MAX_CHAT_BYTES else 400, {"error": {
                "message": f"send a JSON body of at most {MAX_CHAT_BYTES} bytes"}})
            return
        try:
            request = json.loads(self.rfile.read(length))
            if isinstance(request, dict) and request.get("stream"):
                chunks = chat_stream(self.server.model, request)
                first = next(chunks)  # errors surface before the 200 is sent
            else:
                self._send(200, chat_completion(self.server.model, request))
                return
        except (ValueError, ChatError) as exc:
            self._send(getattr(exc, "status", 400), {"error": {"message": str(exc)}})
            return
        except (NoModelError, HealthCheckFailed) as exc:  # nothing (loadable) to answer with
            self._send(503, {"error": {"message": str(exc)}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            for chunk in itertools.chain([first], chunks):
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away: stop generating
        except ChatError as exc:  # after the 200 has gone out: an error event ends the stream
            self.wfile.write(b"data: " + json.dumps({"error": {"message": str(exc)}}).encode()
                             + b"\n\n")
        finally:
            chunks.close()  # frees the model for the next request

    def do_POST(self) -> None:
        if self.path == "/v1/chat/completions":
            self._chat()
            return
        if self.path != "/predict":
            self._send(404, {"detail": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_IMAGE_BYTES:
            self._send(413 if length else 400, {"detail": "send one image as the request body"})
            return
        image = self.rfile.read(length)
        try:
            prediction, meta = self.server.model.predict(image)
        except (NoModelError, HealthCheckFailed) as exc:  # nothing (sound) to answer with
            self._send(503, {"detail": str(exc)})
            return
        except ValueError as exc:
            self._send(400, {"detail": str(exc)})
            return
        self._send(200, {**prediction.to_json(), "release": meta})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state_dir: Path) -> None:
        super().__init__(address, _Handler)
        self.state_dir = state_dir
        self.model = LocalModel(state_dir)


class LocalApi:
    """On a loopback address only: `GET /status`, `POST /predict` (raw image body; a
    classifier answers labels and scores, an object detector boxes in the image's pixels),
    `POST /defer` ({"seconds": N}), `POST /feedback` ({"rating", "comment", "predicted",
    "correct"}); for an LLM release `GET /v1/models` and `POST /v1/chat/completions`
    (OpenAI's API, `stream: true` as server-sent events)."""

    def __init__(self, state_dir: Path, *, host: str = "127.0.0.1", port: int = 8787) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise AgentConfigError(f"the local API binds to loopback only, not {host}")
        self._server = _Server((host, port), state_dir)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="edgewise-local-api")

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
