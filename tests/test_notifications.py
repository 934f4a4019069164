"""Notifications over real MQTT/TLS (a throwaway Mosquitto) and signed webhooks."""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edgewise.agent import agent_status, enroll
from edgewise.server.client import OperatorClient, publish_bundle
from edgewise.server.notify.service import SIGNATURE_HEADER, sign
from edgewise.sim import AgentProcess, ServerProcess
from tests._mosquitto import tls_mosquitto
from tests.conftest import make_tiny_bundle

pytestmark = pytest.mark.slow


def wait_for(predicate, what: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def mqtt_stack(tmp_path: Path, keys):
    with tls_mosquitto(tmp_path / "broker") as broker:
        token = secrets.token_urlsafe(24)
        server = ServerProcess(data_dir=tmp_path / "srv", root_path=keys.root_json,
                               online_key_path=keys.online_key, admin_token=token,
                               rollout_tick_s=0.3, mqtt_url=broker.url, mqtt_ca=broker.ca,
                               log_path=tmp_path / "server.log").start()
        try:
            yield server, token, broker
        finally:
            server.stop()


def test_mqtt_tls_wakes_the_agent(mqtt_stack, keys, tmp_path: Path) -> None:
    server, token, broker = mqtt_stack
    with OperatorClient(server.url, token=token) as client:
        state = tmp_path / "agent"
        enroll(state, server_url=server.url, token=client.create_enrollment_token(),
               root_path=keys.root_json, name="pushy", hardware="test",
                       insecure_dev=True)
        # Polling every 10 minutes: only a push can explain a quick install.
        agent = AgentProcess(state_dir=state, poll_interval_s=600, mqtt_url=broker.url,
                             mqtt_ca=broker.ca, log_path=tmp_path / "agent.log").start()
        try:
            time.sleep(3)  # connected, first check done, now sleeping
            assert agent_status(state)["release"] is None
            release = publish_bundle(client, make_tiny_bundle(tmp_path / "b"),
                                     root_path=keys.root_json,
                                     targets_key_path=keys.targets_key)
            t0 = time.monotonic()
            client.assign(release["id"])
            wait_for(lambda: agent_status(state)["state"] == "committed", "push install", 60)
            assert time.monotonic() - t0 < 60
            assert "woken by edgewise/devices/" in (tmp_path / "agent.log").read_text()
        finally:
            agent.stop()


def test_operator_events_on_mqtt_topics(mqtt_stack, keys, tmp_path: Path) -> None:
    import ssl

    import paho.mqtt.client as mqtt

    server, token, broker = mqtt_stack
    received: list[tuple[str, dict]] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="observer")
    sub.tls_set_context(ssl.create_default_context(cafile=str(broker.ca)))
    sub.on_message = lambda c, u, m: received.append((m.topic, json.loads(m.payload)))
    sub.on_connect = lambda c, *a: c.subscribe("edgewise/events/#", qos=1)
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    try:
        with OperatorClient(server.url, token=token) as client:
            release = publish_bundle(client, make_tiny_bundle(tmp_path / "b"),
                                     root_path=keys.root_json,
                                     targets_key_path=keys.targets_key)
            client.request("POST", "/api/v1/groups", json={"name": "empty", "kind": "static"})
            rollout = client.request("POST", "/api/v1/rollouts", json={
                "release_id": release["id"], "group": "empty", "stages": "all:100%"}).json()
            client.request("POST", f"/api/v1/rollouts/{rollout['id']}/pause")
        wait_for(lambda: any(t == "edgewise/events/rollout-paused" for t, _ in received),
                 "rollout-paused on MQTT")
        topics = [t for t, _ in received]
        assert "edgewise/events/published" in topics
        assert "edgewise/events/rollout-created" in topics
        paused = next(p for t, p in received if t.endswith("rollout-paused"))
        assert paused["rollout_id"] == rollout["id"]
    finally:
        sub.loop_stop()
        sub.disconnect()


class _Receiver(BaseHTTPRequestHandler):
    calls: list[tuple[dict, bytes]] = []
    fail_first = 0

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append((dict(self.headers), body))
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(503)
        else:
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_webhooks_are_signed_and_retried(live_server, tmp_path: Path) -> None:
    _Receiver.calls = []
    _Receiver.fail_first = 1  # the first delivery fails: it must be retried
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        secret = secrets.token_urlsafe(24)
        with live_server.client() as c:
            hook = c.request("POST", "/api/v1/webhooks", json={
                "url": f"http://127.0.0.1:{receiver.server_address[1]}/hook",
                "events": ["published"], "secret": secret}).json()
            live_server.publish(make_tiny_bundle(tmp_path / "b"), assign=False)
            wait_for(lambda: any(d["delivered_at"] for d in c.request(
                "GET", f"/api/v1/webhooks/{hook['id']}/deliveries").json()), "delivery", 30)
            (delivery,) = c.request("GET", f"/api/v1/webhooks/{hook['id']}/deliveries").json()
        assert delivery["attempts"] == 2  # one failure, then success
        headers, body = _Receiver.calls[-1]
        assert headers[SIGNATURE_HEADER] == sign(secret, headers["X-Edgewise-Timestamp"], body)
        assert headers[SIGNATURE_HEADER] != sign("wrong-secret", headers["X-Edgewise-Timestamp"],
                                                 body)
        assert json.loads(body)["kind"] == "published"
    finally:
        receiver.shutdown()


def test_metrics_expose_fleet_and_bytes(live_server, enroll_agent, tmp_path: Path) -> None:
    from tests.test_e2e_update import run_once

    state = enroll_agent("m")
    release = live_server.publish(make_tiny_bundle(tmp_path / "b"))
    assert run_once(state, tmp_path) == 0
    with live_server.client() as c:
        assert c.http.get(f"{live_server.url}/metrics", headers={"Authorization": ""}) \
            .status_code == 401
        text = c.request("GET", "/metrics").text
    assert f'edgewise_devices{{release_id="{release["id"]}",state="committed"}} 1.0' in text
    served = next(line for line in text.splitlines()
                  if line.startswith("edgewise_target_bytes_served_total"))
    assert float(served.split()[-1]) >= release["size_bytes"] - 10_000
    assert 'edgewise_device_reports_total{event="healthy"} 1.0' in text


def test_publisher_never_blocks_and_queues_operator_events_across_an_outage(
        tmp_path: Path) -> None:
    import ssl

    import paho.mqtt.client as mqtt

    from edgewise.server.notify.mqtt import MqttConfig, MqttPublisher
    from edgewise.sim._broker import BrokerProcess

    broker = BrokerProcess(tmp_path / "broker").start()
    received: list[str] = []
    # An observer with a persistent session: the broker keeps what arrives while it is away.
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="observer",
                      clean_session=False)
    sub.tls_set_context(ssl.create_default_context(cafile=str(broker.ca)))
    sub.on_message = lambda c, u, m: received.append(m.topic)
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, *a: c.subscribe("edgewise/events/#", qos=1)
    sub.reconnect_delay_set(min_delay=1, max_delay=2)
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    publisher = MqttPublisher(MqttConfig(url=broker.url, ca_path=broker.ca))
    try:
        assert subscribed.wait(10)
        wait_for(lambda: publisher.connected, "publisher connected")
        broker.stop()
        wait_for(lambda: not publisher.connected, "publisher disconnected")
        t0 = time.monotonic()
        # A wake-up is dropped at once (the agent re-checks when it reconnects); an operator
        # event is queued for the reconnect; neither blocks the notifier.
        assert publisher.publish("edgewise/devices/d1/wake", {"x": 1}, queue=False) is False
        assert publisher.publish("edgewise/events/rollout-paused", {"n": 1}) is True
        assert time.monotonic() - t0 < 0.5
        assert publisher.dropped == 1
        assert received == []

        broker.start()
        wait_for(lambda: received, "queued event after the reconnect", 60)
        assert received == ["edgewise/events/rollout-paused"]
    finally:
        sub.loop_stop()
        sub.disconnect()
        publisher.close()
        broker.stop()
