"""MQTT publishing for the server (paho-mqtt 2), TLS by default.

Topics:
    edgewise/devices/{device_id}/wake   retained; {"release_id", "reason", "ts"}: look now
    edgewise/events/{kind}              operator events (rollout-*), JSON
Wake-ups carry no secrets and no commands: a woken agent still fetches its assignment over
HTTPS and verifies everything through TUF, so a forged wake-up only costs a poll.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["MqttConfig", "MqttPublisher", "device_topic", "event_topic"]

log = logging.getLogger("edgewise.server.mqtt")

MAX_QUEUED = 10_000  # operator events held in memory across a broker outage
MQTT_ERR_NO_CONN = 4  # paho: not connected, message queued for the reconnect


def device_topic(device_id: str) -> str:
    return f"edgewise/devices/{device_id}/wake"


def event_topic(kind: str) -> str:
    return f"edgewise/events/{kind}"


@dataclass(frozen=True)
class MqttConfig:
    url: str  # mqtts://host:8883 (TLS) or mqtt://host:1883 (plain, development only)
    ca_path: Path | None = None
    cert_path: Path | None = None
    key_path: Path | None = None
    username: str | None = None
    password: str | None = None

    @property
    def host_port_tls(self) -> tuple[str, int, bool]:
        u = urlparse(self.url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError(f"MQTT URL must be mqtts://HOST:PORT (or mqtt:// for development), "
                             f"not {self.url!r}")
        tls = u.scheme == "mqtts"
        return u.hostname, u.port or (8883 if tls else 1883), tls


def make_client(config: MqttConfig, client_id: str):
    import paho.mqtt.client as mqtt

    host, port, tls = config.host_port_tls
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    if tls:
        ctx = ssl.create_default_context(cafile=str(config.ca_path) if config.ca_path else None)
        if config.cert_path:
            ctx.load_cert_chain(str(config.cert_path), str(config.key_path))
        client.tls_set_context(ctx)
    else:
        log.warning("MQTT without TLS (%s): development only", config.url)
    if config.username:
        client.username_pw_set(config.username, config.password)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client, host, port


class MqttPublisher:
    def __init__(self, config: MqttConfig, *, client_id: str = "edgewise-server") -> None:
        self._client, host, port = make_client(config, client_id)
        self._client.max_queued_messages_set(MAX_QUEUED)
        self.dropped = 0
        self._connected = threading.Event()
        self._client.on_connect = lambda *a, **k: self._connected.set()
        self._client.on_disconnect = lambda *a, **k: self._connected.clear()
        self._client.connect_async(host, port, keepalive=30)
        self._client.loop_start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, topic: str, payload: dict[str, Any], *, retain: bool = False,
                queue: bool = True) -> bool:
        """Send a message (QoS 1) without ever blocking the caller. While the broker is
        unreachable, paho keeps a queued message (up to MAX_QUEUED) and sends it after the
        reconnect; `queue=False` drops it instead (wake-ups: a reconnecting agent checks by
        itself). True if it went out or was queued."""
        if not self._connected.is_set() and not queue:
            self.dropped += 1
            return False
        info = self._client.publish(topic, json.dumps(payload), qos=1, retain=retain)
        if info.rc not in (0, MQTT_ERR_NO_CONN):
            self.dropped += 1
            return False
        return True

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
