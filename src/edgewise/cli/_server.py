"""`edgewise server ...`"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from ._common import console, fail, setup_logging

server_app = typer.Typer(help="The update server.", no_args_is_help=True)


@server_app.command("run")
def run(
    data: Annotated[Path, typer.Option(help="data directory (SQLite file, artifacts, TUF)")]
    = Path("edgewise-data"),
    root: Annotated[Path, typer.Option(help="trusted root.json from `edgewise keys init`")]
    = Path("keys/root.json"),
    online_key: Annotated[Path, typer.Option(help="snapshot/timestamp key (online.pem)")]
    = Path("keys/online.pem"),
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL, e.g. postgresql://... "
                                           "(default: SQLite in DATA)")] = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    admin_token: Annotated[str | None, typer.Option(envvar="EDGEWISE_ADMIN_TOKEN",
                                                    help="default: DATA/admin.token")] = None,
    rollout_tick_s: Annotated[float, typer.Option(help="rollout engine period")] = 2.0,
    max_upload_gb: Annotated[float, typer.Option(help="largest artifact file accepted")] = 16.0,
    db_slots: Annotated[int, typer.Option(min=1, help="requests that may use the database at "
                                          "once (sizes the connection pool); the rest wait")]
    = 16,
    queue_timeout_s: Annotated[float, typer.Option(help="how long a request waits for a "
                                                   "database slot before a 503 with "
                                                   "Retry-After")] = 5.0,
    shutdown_timeout_s: Annotated[int, typer.Option(help="on SIGTERM, how long requests in "
                                                    "flight may take to finish")] = 3,
    workers: Annotated[int, typer.Option(min=1, help="server processes on this port "
                                         "(several need PostgreSQL: --db)")] = 1,
    mqtt_url: Annotated[str | None, typer.Option(envvar="EDGEWISE_MQTT_URL",
                                                 help="mqtts://HOST:PORT of the broker")] = None,
    mqtt_ca: Annotated[Path | None, typer.Option(help="CA certificate of the broker")] = None,
    mqtt_cert: Annotated[Path | None, typer.Option(help="client certificate (mTLS)")] = None,
    mqtt_key: Annotated[Path | None, typer.Option(help="client key (mTLS)")] = None,
    s3_endpoint: Annotated[str | None, typer.Option(
        envvar="EDGEWISE_S3_ENDPOINT", help="artifacts in this S3-compatible store, e.g. "
        "http://127.0.0.1:8333 (credentials: EDGEWISE_S3_ACCESS_KEY / _SECRET_KEY)")] = None,
    s3_bucket: Annotated[str, typer.Option(envvar="EDGEWISE_S3_BUCKET")] = "edgewise",
    s3_region: Annotated[str, typer.Option(envvar="EDGEWISE_S3_REGION")] = "us-east-1",
    s3_proxy_downloads: Annotated[bool, typer.Option(
        "--s3-proxy-downloads", help="stream artifacts through the API instead of redirecting "
        "devices to presigned URLs (devices cannot reach the store)")] = False,
    log_json: Annotated[bool, typer.Option("--log-json", help="structured JSON logs")] = False,
    tls_cert: Annotated[Path | None, typer.Option(help="server certificate (PEM)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="server private key (PEM)")] = None,
    insecure_dev: Annotated[bool, typer.Option("--insecure-dev",
                                               help="serve plain HTTP (development only)")]
    = False,
    verbose: bool = False,
) -> None:
    """Run the update server (FastAPI + uvicorn). OpenAPI docs at /docs."""
    import uvicorn

    from ..server.app import CONFIG_ENV, ServerConfig, create_app, resolve_admin_token
    from ..server.notify.mqtt import MqttConfig
    from ..server.storage import S3Config, StorageError
    from ..trust import TrustError

    setup_logging(verbose, json_lines=log_json)
    if (tls_cert is None) != (tls_key is None):
        fail("give both --tls-cert and --tls-key")
    if tls_cert is None and not insecure_dev:
        fail("refusing to serve plain HTTP: give --tls-cert/--tls-key (see `edgewise certs "
             "init`), or --insecure-dev for local development")
    if tls_cert is None:
        logging.getLogger("edgewise.server").warning(
            "serving plain HTTP (--insecure-dev): credentials and tokens travel in clear text")
    mqtt = (MqttConfig(url=mqtt_url, ca_path=mqtt_ca, cert_path=mqtt_cert, key_path=mqtt_key)
            if mqtt_url else None)
    s3 = None
    if s3_endpoint:
        access, secret = (os.environ.get("EDGEWISE_S3_ACCESS_KEY"),
                          os.environ.get("EDGEWISE_S3_SECRET_KEY"))
        if not access or not secret:
            fail("--s3-endpoint needs credentials: set EDGEWISE_S3_ACCESS_KEY and "
                 "EDGEWISE_S3_SECRET_KEY")
        s3 = S3Config(endpoint_url=s3_endpoint, bucket=s3_bucket, region=s3_region,
                      access_key=access, secret_key=secret,
                      redirect_downloads=not s3_proxy_downloads)
    if workers > 1 and not (db or "").startswith(("postgresql", "postgres")):
        fail("--workers above 1 needs a PostgreSQL database (--db postgresql://...): the "
             "processes share its replay guard and locks; SQLite serves one process")
    try:
        token = resolve_admin_token(data, admin_token)
        config = ServerConfig(data_dir=data, root_path=root, online_key_path=online_key,
                              admin_token=token, db_url=db, rollout_tick_s=rollout_tick_s,
                              mqtt=mqtt, max_upload_bytes=int(max_upload_gb * 2**30),
                              db_slots=db_slots, queue_timeout_s=queue_timeout_s, s3=s3)
        # Built here once even for workers: the schema and the director's keys are made
        # before several processes could race to make them.
        app = create_app(config)
    except (ValueError, TrustError, StorageError) as exc:  # SchemaError is a ValueError
        fail(str(exc))
    if admin_token is None:
        console.print(f"admin token: {data / 'admin.token'}")
    options = dict(host=host, port=port, log_level="debug" if verbose else "warning",
                   log_config=None, timeout_graceful_shutdown=shutdown_timeout_s,
                   ssl_certfile=str(tls_cert) if tls_cert else None,
                   ssl_keyfile=str(tls_key) if tls_key else None)
    if workers == 1:
        uvicorn.run(app, **options)
        return
    del app
    os.environ[CONFIG_ENV] = config.to_env()
    # Counters summed over the workers at every scrape (`server.monitoring.metrics`).
    metrics_dir = tempfile.mkdtemp(prefix="edgewise-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run("edgewise.server.app:app_from_env", factory=True, workers=workers,
                    **options)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


@server_app.command("lb")
def load_balancer(
    upstream: Annotated[list[str], typer.Option(help="a replica, http://HOST:PORT (repeat)")],
    listen: Annotated[str, typer.Option(help="HOST:PORT devices and operators use")]
    = "127.0.0.1:8080",
    workdir: Annotated[Path, typer.Option("--dir", help="nginx's config, logs and temp files")]
    = Path("edgewise-lb"),
    tls_cert: Annotated[Path | None, typer.Option(help="certificate (PEM): TLS ends here")]
    = None,
    tls_key: Annotated[Path | None, typer.Option(help="its private key (PEM)")] = None,
    print_config: Annotated[bool, typer.Option("--print-config",
                                               help="print nginx.conf and exit")] = False,
) -> None:
    """Serve several replicas (`server run` on one PostgreSQL) at one address, with nginx."""
    from ..server.loadbalancer import LoadBalancer, NginxNotFound

    lb = LoadBalancer(listen=listen, upstreams=upstream, prefix=workdir, tls_cert=tls_cert,
                      tls_key=tls_key)
    try:
        if print_config:
            console.print(lb.write_config().read_text(), markup=False, highlight=False)
            return
        lb.start(timeout_s=10, verify=False)
    except (NginxNotFound, ValueError, RuntimeError, TimeoutError) as exc:
        fail(str(exc))
    console.print(f"load balancer on {lb.url} -> {', '.join(upstream)} (Ctrl-C stops)")
    try:
        lb.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        lb.stop()


@server_app.command("migrate")
def migrate(
    data: Annotated[Path, typer.Option(help="data directory (its SQLite file is migrated "
                                       "unless --db is given)")] = Path("edgewise-data"),
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL, e.g. postgresql://...")]
    = None,
) -> None:
    """Bring the database's schema to this version's (back the database up first)."""
    from sqlalchemy.exc import SQLAlchemyError

    from ..server._db import make_engine
    from ..server._schema import SchemaError
    from ..server._schema import migrate as migrate_schema

    url = db or f"sqlite:///{(data / 'edgewise.db').resolve()}"
    if db is None and not (data / "edgewise.db").is_file():
        fail(f"no database at {data / 'edgewise.db'} (give --data or --db)")
    engine = make_engine(url)
    try:
        before, after = migrate_schema(engine)
    except (SchemaError, SQLAlchemyError) as exc:
        fail(f"migration failed, the database is unchanged: {exc}")
    finally:
        engine.dispose()
    if before == after:
        console.print(f"the schema is already at revision {after}")
    else:
        console.print(f"[green]migrated[/] from {before or 'before migrations (0.1.0)'} to "
                      f"revision {after}")


certs_app = typer.Typer(help="A private CA and server certificate for self-hosting.",
                        no_args_is_help=True)


@certs_app.command("init")
def certs_init(
    out_dir: Annotated[Path, typer.Option("--out", help="directory for the certificates")]
    = Path("certs"),
    host: Annotated[list[str] | None, typer.Option("--host", help="server DNS name or IP "
                                                   "(repeat)")] = None,
) -> None:
    """Make ca.pem/ca.key (keep the key offline) and server.pem/server.key for --tls-*."""
    from ..trust import KeyFileError, init_certs

    try:
        paths = init_certs(out_dir, hostnames=host or ["localhost", "127.0.0.1"])
    except KeyFileError as exc:
        fail(str(exc))
    console.print(f"[green]certificates in {out_dir}[/]: server {paths.server_cert} + "
                  f"{paths.server_key}; devices and operators pin {paths.ca_cert}")
