"""Push wake-ups over MQTT (TLS): the server says "look now", the agent polls at once.

Invariant: a message only shortens the wait before the next HTTPS check; it is never trusted
for anything else, so a forged or replayed wake-up costs one poll. Polling stays the fallback
when the broker is down.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["MqttWakeup", "WakeupConfig"]

log = logging.getLogger("edgewise.agent.mqtt")


@dataclass(frozen=True)
class WakeupConfig:
    url: str  # mqtts://host:port
    ca_path: Path | None = None
    username: str | None = None
    password: str | None = None


class MqttWakeup:
    def __init__(self, config: WakeupConfig, *, device_id: str, wake: threading.Event) -> None:
        import paho.mqtt.client as mqtt

        u = urlparse(config.url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError(f"MQTT URL must be mqtts://HOST:PORT, not {config.url!r}")
        self.topic = f"edgewise/devices/{device_id}/wake"
        self.connected = threading.Event()
        self.messages = 0
        self._wake = wake
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"agent-{device_id}")
        if u.scheme == "mqtts":
            client.tls_set_context(ssl.create_default_context(
                cafile=str(config.ca_path) if config.ca_path else None))
        else:
            log.warning("MQTT without TLS (%s): development only", config.url)
        if config.username:
            client.username_pw_set(config.username, config.password)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *a, **k: self.connected.clear()
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=1, max_delay=60)
        client.connect_async(u.hostname, u.port or (8883 if u.scheme == "mqtts" else 1883),
                             keepalive=30)
        self._client = client

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT connect refused: %s", reason_code)
            return
        client.subscribe(self.topic, qos=1)
        self.connected.set()
        self._wake.set()  # we may have missed a wake-up while disconnected: check now

    def _on_message(self, _client, _userdata, message) -> None:
        self.messages += 1
        log.info("woken by %s", message.topic)
        self._wake.set()

    def start(self) -> None:
        self._client.loop_start()

    def stop(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
