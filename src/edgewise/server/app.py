"""The update server application: `create_app(config)` wires domains, storage and errors."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..trust import ServerRepository, load_root, load_signer
from ..trust._device_auth import ReplayGuard
from ..trust._director import DirectorRepository
from ._auth import WEAK_TOKENS, hash_token, new_token
from ._db import make_engine, make_sessionmaker
from ._deps import ServerContext
from ._errors import DomainError, ServiceBusy
from ._gate import DbGate
from ._schema import ensure_schema, exclusive, serialized
from .audit import models as _audit_models  # noqa: F401
from .audit.routes import AuditMiddleware
from .audit.routes import router as audit_router
from .dashboard.routes import router as dashboard_router
from .devices import models as _device_models  # noqa: F401  (register tables)
from .devices.checkin_pg import AsyncCheckin, CheckinFastPath
from .devices.replay import DatabaseReplayGuard
from .devices.replay import prune as prune_nonces
from .devices.routes import router as devices_router
from .director import models as _director_models  # noqa: F401
from .director.routes import router as director_router
from .events import models as _event_models  # noqa: F401
from .events.routes import router as events_router
from .feedback import models as _feedback_models  # noqa: F401
from .feedback.routes import router as feedback_router
from .groups import models as _group_models  # noqa: F401
from .groups.routes import router as groups_router
from .monitoring.metrics import Metrics
from .monitoring.metrics import router as metrics_router
from .notify import models as _notify_models  # noqa: F401
from .notify import service as notify
from .notify.mqtt import MqttConfig, MqttPublisher
from .notify.routes import router as notify_router
from .releases import models as _release_models  # noqa: F401
from .releases.routes import router as releases_router
from .repository.routes import router as repository_router
from .rollouts import models as _rollout_models  # noqa: F401
from .rollouts import service as rollouts
from .rollouts.routes import router as rollouts_router
from .storage import S3Config, S3Objects
from .tokens import models as _token_models  # noqa: F401
from .tokens.routes import router as tokens_router

__all__ = ["CONFIG_ENV", "ServerConfig", "app_from_env", "create_app", "resolve_admin_token"]

CONFIG_ENV = "EDGEWISE_SERVER_CONFIG"  # how `server run --workers N` hands each worker its config

log = logging.getLogger("edgewise.server")


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    root_path: Path
    online_key_path: Path
    admin_token: str
    db_url: str | None = None  # default: SQLite file in data_dir
    max_upload_bytes: int = 16 << 30
    rollout_tick_s: float = 2.0  # how often the rollout engine decides
    notify_tick_s: float = 0.5  # how often events become MQTT messages and webhook calls
    mqtt: MqttConfig | None = None
    # Requests that may use the database at once (`_gate`); the rest wait in line up to
    # `queue_timeout_s`, then get 503 with Retry-After. Sizes the connection pool.
    db_slots: int = 16
    queue_timeout_s: float = 5.0
    retry_after_s: int = 2
    s3: S3Config | None = None  # artifacts in an S3-compatible store (`storage`)

    @property
    def resolved_db_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.data_dir / 'edgewise.db').resolve()}"

    def to_env(self) -> str:
        """This config as JSON for worker processes (the admin token travels hashed only in
        memory; here it is the process environment, as for the parent)."""
        import dataclasses
        import json

        data = dataclasses.asdict(self)
        for key in ("data_dir", "root_path", "online_key_path"):
            data[key] = str(data[key])
        if self.mqtt is not None:
            data["mqtt"] = {k: str(v) if isinstance(v, Path) else v
                            for k, v in dataclasses.asdict(self.mqtt).items()}
        return json.dumps(data)

    @classmethod
    def from_env(cls, text: str) -> ServerConfig:
        import json

        data = json.loads(text)
        for key in ("data_dir", "root_path", "online_key_path"):
            data[key] = Path(data[key])
        if data.get("mqtt") is not None:
            mqtt = data["mqtt"]
            data["mqtt"] = MqttConfig(**{k: Path(v) if k.endswith("_path") and v else v
                                         for k, v in mqtt.items()})
        if data.get("s3") is not None:
            data["s3"] = S3Config(**data["s3"])
        return cls(**data)


def resolve_admin_token(data_dir: Path, given: str | None) -> str:
    """Use the given admin token, else the one saved in DATA/admin.token, else make one."""
    if given is not None:
        if given.lower() in WEAK_TOKENS or len(given) < 16:
            raise ValueError("refusing a weak admin token: use at least 16 random characters")
        return given
    path = data_dir / "admin.token"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    token = new_token()
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


# Sessions opened outside the gate: the rollout and notification loops, a metrics scrape and
# the audit record written after a mutating request's answer.
BACKGROUND_SESSIONS = 4
# Threads for plain-def endpoints beyond the database slots (TUF metadata and targets, health).
SPARE_THREADS = 24
SHUTDOWN_JOIN_S = 2.0  # how long shutdown waits for a background loop's current tick
# Set (to anything) to answer PostgreSQL check-ins on the general path: the baseline that
# bench/fleet_scale.py --checkin-paths measures the fast path against, in the same run.
SLOW_CHECKIN_ENV = "EDGEWISE_SLOW_CHECKIN"


def create_app(config: ServerConfig) -> FastAPI:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    # Every slot holder gets a connection at once. The overflow covers the sessions the gate
    # does not count (an audit record after each mutating request's answer, in a thread):
    # one per thread the pool of threads may run, so no thread waits for a connection while
    # holding the thread a slot holder needs. A checkout that still waits answers 503.
    engine = make_engine(config.resolved_db_url,
                         pool_size=config.db_slots + BACKGROUND_SESSIONS,
                         max_overflow=config.db_slots + SPARE_THREADS,
                         pool_timeout_s=config.queue_timeout_s)
    ensure_schema(engine)  # an empty database gets the schema; an old one is refused
    remote = None
    if config.s3 is not None:
        remote = S3Objects(config.s3)
        remote.check()  # refuse to start on a bucket we cannot use
    repo = ServerRepository(
        config.data_dir / "tuf",
        root=load_root(config.root_path).to_bytes(),
        online_signer=load_signer(config.online_key_path),
        remote=remote,
        # Replicas sign metadata one at a time, so versions follow one another.
        serialize=partial(serialized, engine, "tuf-metadata",
                          lock_file=config.data_dir / "tuf" / ".metadata.lock"),
    )
    sessions = make_sessionmaker(engine)
    # PostgreSQL: the device poll is answered on the event loop (asyncpg), before routing.
    fast_checkin = (AsyncCheckin(config.resolved_db_url, pool_size=config.db_slots,
                                 queue_timeout_s=config.queue_timeout_s,
                                 retry_after_s=config.retry_after_s)
                    if engine.dialect.name == "postgresql"
                    and not os.environ.get(SLOW_CHECKIN_ENV) else None)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, config.db_slots + SPARE_THREADS)
        stop = threading.Event()

        def init_notify() -> None:
            with sessions() as session:
                notify.init_cursor(session)

        await run_in_threadpool(init_notify)
        mqtt = MqttPublisher(config.mqtt) if config.mqtt else None
        threads = [
            threading.Thread(target=_rollout_loop, args=(sessions, config.rollout_tick_s, stop),
                             name="edgewise-rollouts", daemon=True),
            threading.Thread(target=_notify_loop, args=(sessions, mqtt, config.notify_tick_s,
                                                        stop),
                             name="edgewise-notify", daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            # Daemon threads: a tick still running after this is cut off by the exit, and
            # the next start decides again (ticks are idempotent).
            deadline = time.monotonic() + SHUTDOWN_JOIN_S
            for thread in threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if mqtt is not None:
                mqtt.close()
            if fast_checkin is not None:
                await fast_checkin.close()

    app = FastAPI(
        lifespan=lifespan,
        title="Edgewise update server",
        version=__version__,
        description="Signed model releases for edge fleets: enrollment, releases, "
        "assignments, device reports, event log and the TUF repository devices verify against.",
    )
    app.state.metrics = Metrics(sessions)
    app.state.ctx = ServerContext(
        sessions=sessions,
        repo=repo,
        director=DirectorRepository(config.data_dir / "director",
                                    create=not _has_devices(sessions)),
        admin_token_hash=hash_token(config.admin_token),
        max_upload_bytes=config.max_upload_bytes,
        db_gate=DbGate(slots=config.db_slots, queue_timeout_s=config.queue_timeout_s,
                       retry_after_s=config.retry_after_s),
        replay_guard=(DatabaseReplayGuard() if engine.dialect.name == "postgresql"
                      else ReplayGuard()),
        redirect_downloads=config.s3 is not None and config.s3.redirect_downloads,
    )

    app.add_middleware(AuditMiddleware)
    if fast_checkin is not None:
        app.add_middleware(CheckinFastPath, checkin=fast_checkin)  # outermost: first in line

    @app.exception_handler(DomainError)
    async def _domain_error(_request: Request, exc: DomainError) -> JSONResponse:
        headers = ({"Retry-After": str(exc.retry_after_s)} if isinstance(exc, ServiceBusy)
                   else exc.headers)
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.message},
                            headers=headers)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_unavailable(request: Request, exc: DBAPIError) -> JSONResponse:
        # The database went away (a restart, a failover): the pool replaces its connections,
        # and the client retries after a pause (agents honour Retry-After).
        log.warning("database unavailable: %s", str(exc).splitlines()[0][:200])
        return await _domain_error(request, ServiceBusy(
            "the database is unavailable; retry later", retry_after_s=config.retry_after_s))

    @app.exception_handler(PoolTimeout)
    async def _pool_timeout(request: Request, _exc: PoolTimeout) -> JSONResponse:
        return await _domain_error(request, ServiceBusy(
            "the server is busy (no database connection free); retry later",
            retry_after_s=config.retry_after_s))

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    for router in (devices_router, director_router, releases_router, events_router, groups_router,
                   rollouts_router, feedback_router, tokens_router, notify_router,
                   metrics_router, audit_router, repository_router, dashboard_router):
        app.include_router(router)
    return app


def app_from_env() -> FastAPI:
    """The app of one worker process of `edgewise server run --workers N` (uvicorn factory)."""

    return create_app(ServerConfig.from_env(os.environ[CONFIG_ENV]))


def _has_devices(sessions) -> bool:
    from sqlalchemy import select

    from .devices.models import Device

    with sessions() as session:
        return session.scalars(select(Device.id).limit(1)).first() is not None


TICK_DUTY = 0.25  # the rollout engine may use at most this share of the server's time


def _rollout_loop(sessions, tick_s: float, stop: threading.Event) -> None:
    """The rollout engine's clock: decide for every active rollout every `tick_s`, or less
    often when a tick is slow (a tick reads every device of a rollout: with thousands, it must
    not starve the check-ins it is deciding on)."""
    wait = tick_s
    while not stop.wait(wait):
        started = time.monotonic()
        try:
            # One replica ticks at a time (PostgreSQL advisory lock); the others skip.
            with exclusive(sessions.kw["bind"], "rollout-tick") as lease:
                if lease:
                    with lease.session(sessions) as session:
                        rollouts.tick_all(session)
                        if session.get_bind().dialect.name == "postgresql":
                            prune_nonces(session)
        except Exception:  # keep deciding; one bad tick must not stop all rollouts
            log.exception("rollout tick failed")
        wait = max(tick_s, (time.monotonic() - started) * (1 - TICK_DUTY) / TICK_DUTY)


def _notify_loop(sessions, mqtt: MqttPublisher | None, tick_s: float,
                 stop: threading.Event) -> None:
    """Turn committed events into MQTT messages and webhook deliveries; send what is due."""
    import httpx

    with httpx.Client(timeout=10) as http:
        while not stop.wait(tick_s):
            try:
                # The cursor and the deliveries are shared rows: one replica at a time
                # announces, so each event goes out once.
                with exclusive(sessions.kw["bind"], "notify") as lease:
                    if lease:
                        with lease.session(sessions) as session:
                            notify.process_events(session, mqtt=mqtt)
                            notify.deliver_due(session, http=http)
            except Exception:
                log.exception("notification tick failed")
