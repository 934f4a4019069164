"""Prometheus metrics: fleet and rollout state read from the database at scrape time, plus
in-process counters (bytes served). One registry per app, so tests can run several apps."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import select

from .._deps import ViewerDep
from ..devices.models import Device, InstallResult
from ..rollouts import service as rollouts
from ..rollouts.models import Rollout

router = APIRouter(tags=["ops"])


class FleetCollector:
    def __init__(self, sessions) -> None:
        self._sessions = sessions

    def collect(self):
        devices = GaugeMetricFamily("edgewise_devices", "Devices by agent state and release",
                                    labels=["state", "release_id"])
        results = GaugeMetricFamily("edgewise_install_results",
                                    "Finished install attempts by outcome and release",
                                    labels=["outcome", "release_id"])
        rollout_status = GaugeMetricFamily("edgewise_rollouts", "Rollouts by status",
                                           labels=["status"])
        stage = GaugeMetricFamily("edgewise_rollout_stage", "Current stage index (0-based)",
                                  labels=["rollout_id", "release_id", "stage"])
        progress = GaugeMetricFamily("edgewise_rollout_devices",
                                     "Devices of a rollout by progress",
                                     labels=["rollout_id", "progress"])
        with self._sessions() as session:
            by_state = Counter((d.state, d.release_id or "none")
                               for d in session.scalars(select(Device)))
            for (state, release), n in sorted(by_state.items()):
                devices.add_metric([state, release], n)
            by_outcome = Counter((r.outcome, r.release_id)
                                 for r in session.scalars(select(InstallResult)))
            for (outcome, release), n in sorted(by_outcome.items()):
                results.add_metric([outcome, release], n)
            statuses = Counter()
            for r in session.scalars(select(Rollout)):
                statuses[r.status] += 1
                if r.status in ("active", "paused"):
                    stage.add_metric([r.id, r.release_id, r.stages[r.stage_index]["name"]],
                                     r.stage_index)
                    for key, n in rollouts.progress(session, r).items():
                        progress.add_metric([r.id, key], n)
            for status, n in sorted(statuses.items()):
                rollout_status.add_metric([status], n)
        yield from (devices, results, rollout_status, stage, progress)


class Metrics:
    def __init__(self, sessions) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(FleetCollector(sessions))
        self.bytes_served = PromCounter("edgewise_target_bytes_served",
                                        "Artifact bytes served to devices",
                                        registry=self.registry)
        self.reports = PromCounter("edgewise_device_reports", "Device state reports received",
                                   ["event"], registry=self.registry)


@router.get("/metrics", include_in_schema=False, dependencies=[ViewerDep])
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)
