"""A throwaway Mosquitto broker with TLS (the simulator's `BrokerProcess`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgewise.sim._broker import BrokerProcess


@contextmanager
def tls_mosquitto(workdir: Path) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(workdir).start()
    try:
        yield broker
    finally:
        broker.stop()
