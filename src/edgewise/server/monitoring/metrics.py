"""Prometheus metrics: fleet and rollout state read from the database at scrape time (counted
by the database: a fleet of 100,000 devices is not loaded), plus counters of this server
(bytes served, reports received). One registry per app, so tests can run several apps.

Across processes: the fleet gauges are the database's, the same from any replica. The
counters are per process; `edgewise server run --workers N` sets PROMETHEUS_MULTIPROC_DIR,
and every worker's scrape then sums the counters of all workers on that host (prometheus
client's multiprocess mode). Separate replicas are separate scrape targets, as usual."""

from __future__ import annotations

import os
from collections import Counter

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

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
            for state, release, n in session.execute(
                    select(Device.state, Device.release_id, func.count())
                    .group_by(Device.state, Device.release_id)
                    .order_by(Device.state, Device.release_id)):
                devices.add_metric([state, release or "none"], n)
            for outcome, release, n in session.execute(
                    select(InstallResult.outcome, InstallResult.release_id, func.count())
                    .group_by(InstallResult.outcome, InstallResult.release_id)
                    .order_by(InstallResult.outcome, InstallResult.release_id)):
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
        self.registry = CollectorRegistry()  # what /metrics shows
        self.registry.register(FleetCollector(sessions))
        counters = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # The counters live in files every worker writes; the scrape reads them all.
            counters = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry)
        self.bytes_served = PromCounter("edgewise_target_bytes_served",
                                        "Artifact bytes served to devices",
                                        registry=counters)
        self.reports = PromCounter("edgewise_device_reports", "Device state reports received",
                                   ["event"], registry=counters)


@router.get("/metrics", include_in_schema=False, dependencies=[ViewerDep])
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)
