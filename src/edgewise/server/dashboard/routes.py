"""The operator dashboard: server-rendered pages over the same services the API uses.

Invariants:
- every page needs a signed-in operator (any role may read); the session is the API token in
  the `edgewise_token` cookie (HttpOnly, SameSite=Strict, scoped to /dashboard);
- every state-changing form carries a CSRF token derived from that session token, checked
  before anything else; rollout actions also need the operator or admin role (403 otherwise),
  whatever the page showed;
- templates are autoescaped and receive no secret (no token, no device key).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import statistics
from collections import Counter
from collections.abc import Callable, Coroutine
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import jinja2
from fastapi import APIRouter, Depends, Form, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from .._auth import check_admin_token, hash_token
from .._db import utcnow
from .._deps import Operator, SessionDep, current_operator
from .._errors import DomainError, Forbidden, Unauthorized
from ..devices import service as devices
from ..devices.models import Device, InstallResult
from ..devices.service import FINAL_STATES
from ..events import service as events
from ..events.models import Event
from ..feedback import service as feedback
from ..groups.service import groups_of
from ..releases import service as releases
from ..rollouts import service as rollouts
from ..rollouts.engine import stage_size
from ..rollouts.models import Rollout, RolloutDevice
from ..tokens.models import ApiToken
from ._chart import Marker, chart, progress_series

__all__ = ["router"]

PREFIX = "/dashboard"
COOKIE = "edgewise_token"
LOGIN_COOKIE = "edgewise_login_csrf"
SESSION_MAX_AGE_S = 8 * 3600
ACTING_ROLES = frozenset({"operator", "admin"})
ACTIONS = ("pause", "resume", "abort", "rollback")
# Which rollout statuses each action applies to (mirrors rollouts.service.operator_action;
# only used to grey out buttons, the service decides).
ACTION_FROM = {
    "pause": {"active"},
    "resume": {"paused"},
    "abort": {"active", "paused"},
    "rollback": {"active", "paused", "completed", "aborted"},
}
IN_PROGRESS = ("active", "paused")
DEVICE_TABLE_ROWS = 500

_HERE = Path(__file__).parent
_env = jinja2.Environment(loader=jinja2.FileSystemLoader(_HERE / "templates"),
                          autoescape=True, undefined=jinja2.StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True)
_SECURITY_HEADERS = {
    # No scripts at all; forms may only post back here; never framed (buttons act).
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "—"


def _ago(value: datetime | None) -> str:
    if value is None:
        return "never"
    s = int((utcnow() - value).total_seconds())
    if s < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s // size} {unit} ago"
    return f"{s} s ago"


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size or (seconds >= size and seconds % size == 0):
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


_env.filters.update(when=_when, ago=_ago, size=_size, num=_num, duration=_duration)


def csrf_token(session_token: str) -> str:
    """Per-session CSRF token: a MAC keyed by the (HttpOnly) session token itself."""
    return hmac.new(session_token.encode(), b"edgewise-dashboard-csrf",
                    hashlib.sha256).hexdigest()


class _HtmlErrors(APIRoute):
    """Domain errors on dashboard routes become HTML pages, not the API's JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except DomainError as exc:
                return _page("error.html", request, None, status_code=exc.status_code,
                             title=f"Error {exc.status_code}", status=exc.status_code,
                             message=exc.message)

        return route


router = APIRouter(prefix=PREFIX, tags=["dashboard"], include_in_schema=False,
                   route_class=_HtmlErrors)


def _page(template: str, request: Request, operator: Operator | None, *,
          status_code: int = 200, **context: Any) -> HTMLResponse:
    token = request.cookies.get(COOKIE)
    html = _env.get_template(template).render(
        operator=operator, prefix=PREFIX, csrf=csrf_token(token) if token and operator else "",
        can_act=operator is not None and operator.role in ACTING_ROLES, **context)
    return HTMLResponse(html, status_code=status_code, headers=_SECURITY_HEADERS)


def _signed_in(request: Request, session: SessionDep) -> Operator:
    """The operator of the session cookie; a browser without one is sent to the login page."""
    try:
        if not request.cookies.get(COOKIE):
            raise Unauthorized("not signed in")
        return current_operator(request, session)
    except Unauthorized:
        raise HTTPException(status_code=303, detail="sign in first",
                            headers={"Location": f"{PREFIX}/login"}) from None


SignedIn = Annotated[Operator, Depends(_signed_in)]


def _check_csrf(request: Request, presented: str) -> None:
    token = request.cookies.get(COOKIE, "")
    if not token or not hmac.compare_digest(presented.encode(), csrf_token(token).encode()):
        raise Forbidden("invalid or missing CSRF token: reload the page and try again")


def _operator_for_token(request: Request, session: Session, token: str) -> Operator | None:
    # The same rule as _deps.current_operator, for a token typed into the login form.
    if check_admin_token(token, request.app.state.ctx.admin_token_hash):
        return Operator(name="admin", role="admin")
    row = session.scalars(select(ApiToken).where(ApiToken.token_hash == hash_token(token),
                                                 ApiToken.revoked.is_(False))).one_or_none()
    return None if row is None else Operator(name=row.name, role=row.role)


def _release_names(session: Session) -> dict[str, str]:
    return {r.id: f"{r.name}@{r.version}" for r in releases.list_releases(session)}


# -- session -----------------------------------------------------------------------------


@router.get("/login")
def login_form(request: Request) -> HTMLResponse:
    return _login_page(request)


def _login_page(request: Request, *, error: str = "", status_code: int = 200) -> HTMLResponse:
    nonce = secrets.token_urlsafe(24)
    response = _page("login.html", request, None, status_code=status_code, title="Sign in",
                     login_csrf=nonce, error=error)
    # Double-submit nonce against login CSRF: a cross-site form never carries this cookie.
    response.set_cookie(LOGIN_COOKIE, nonce, max_age=600, path=f"{PREFIX}/login",
                        httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/login")
def login(request: Request, session: SessionDep, token: Annotated[str, Form()] = "",
          login_csrf: Annotated[str, Form()] = "") -> Response:
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(login_csrf.encode(), expected.encode()):
        return _login_page(request, error="The sign-in form expired; please try again.",
                           status_code=403)
    token = token.strip()
    operator = _operator_for_token(request, session, token) if token else None
    if operator is None:
        return _login_page(request, error="That API token is not valid (or was revoked).",
                           status_code=401)
    response = RedirectResponse(f"{PREFIX}/", status_code=303)
    response.set_cookie(COOKIE, token, max_age=SESSION_MAX_AGE_S, path=PREFIX, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    response.delete_cookie(LOGIN_COOKIE, path=f"{PREFIX}/login")
    return response


@router.post("/logout")
def logout(request: Request, operator: SignedIn,
           csrf: Annotated[str, Form()] = "") -> Response:
    _check_csrf(request, csrf)
    response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
    return response


@router.get("/static/dashboard.css")
def stylesheet() -> Response:
    return Response(_stylesheet(), media_type="text/css",
                    headers={"Cache-Control": "max-age=300"})


@cache
def _stylesheet() -> bytes:
    return (_HERE / "static" / "dashboard.css").read_bytes()


# -- pages -------------------------------------------------------------------------------


@router.get("/")
def overview(request: Request, operator: SignedIn, session: SessionDep) -> HTMLResponse:
    names = _release_names(session)
    counts = devices.fleet_counts(session)  # in SQL: the page never loads the whole fleet
    by_state = Counter(counts.by_state)
    by_release = Counter()
    for release_id, n in counts.by_release.items():
        by_release[names.get(release_id, release_id) if release_id else "none"] += n
    for release_id, n in counts.by_component_release.items():  # apps, config files
        by_release[names.get(release_id, release_id)] += n
    all_rollouts = rollouts.list_rollouts(session)
    running = [(r, rollouts.progress(session, r)) for r in all_rollouts
               if r.status in IN_PROGRESS]
    finished = [r for r in all_rollouts if r.status not in IN_PROGRESS][:10]
    published = list(reversed(releases.list_releases(session)))
    running_ids = {r.id: counts.running(r.id) for r in published}
    models = releases.llm_models(session)
    adapters = {r.id: a for r in published if (a := releases.adapter_base(r, models))}
    return _page("overview.html", request, operator, title="Fleet", nav="fleet",
                 devices=devices.list_devices(session, limit=DEVICE_TABLE_ROWS),
                 device_count=counts.total,
                 by_state=sorted(by_state.items(), key=lambda kv: (-kv[1], kv[0])),
                 by_component_state=[
                     (component, sorted(states.items(), key=lambda kv: (-kv[1], kv[0])))
                     for component, states in sorted(counts.by_component_state.items())],
                 by_release=sorted(by_release.items(), key=lambda kv: (-kv[1], kv[0])),
                 releases=published, adapters=adapters,
                 running_ids=running_ids, running=running, finished=finished, names=names)


@router.get("/rollouts/{rollout_id}")
def rollout_page(rollout_id: str, request: Request, operator: SignedIn,
                 session: SessionDep) -> HTMLResponse:
    rollout = rollouts.get_rollout(session, rollout_id=rollout_id)
    names = _release_names(session)
    members = rollouts.members_of(rollout)
    total = session.scalar(select(func.count()).select_from(RolloutDevice).where(members))
    # The table shows the first devices in rollout order; the counts, stages and chart
    # cover all of them, computed by the database (a rollout may hold 100,000 devices).
    rows = list(session.scalars(select(RolloutDevice).where(members)
                                .order_by(RolloutDevice.position).limit(DEVICE_TABLE_ROWS)))
    device_by_id = {d.id: d for d in session.scalars(
        select(Device).where(Device.id.in_([r.device_id for r in rows])))}
    stages = []
    for i, raw in enumerate(rollout.stages):
        stage = rollouts.stage_from_json(raw)
        stages.append({"index": i, "name": stage.name,
                       "spec": f"{stage.percent:g}%" if stage.percent is not None
                       else str(stage.count),
                       "size": stage_size(stage, total) if total else 0,
                       "min_soak_s": stage.min_soak_s, "gates": raw.get("gates", {}),
                       "state": "done" if i < rollout.stage_index or rollout.status ==
                       "completed" else "current" if i == rollout.stage_index else "next"})
    log = events.list_events(session, rollout_id=rollout.id, limit=1000)
    adapter = rollouts.adapter_of(session, rollout)
    return _page("rollout.html", request, operator, title=f"Rollout {rollout.id}",
                 nav="fleet", rollout=rollout, names=names, stages=stages,
                 adapter=adapter, transfer=rollouts.transfer(session, rollout, adapter=adapter),
                 progress=rollouts.progress(session, rollout),
                 chart=_progress_chart(session, rollout, total, log),
                 rows=rows, device_count=total, device_by_id=device_by_id,
                 log=list(reversed(log)),
                 actions=[(a, rollout.status in ACTION_FROM[a]) for a in ACTIONS])


def _progress_chart(session: Session, rollout: Rollout, total: int, log: list[Event]):
    members = rollouts.members_of(rollout)
    assigned = session.execute(  # each member is assigned once: counted per moment
        select(RolloutDevice.assigned_at, func.count())
        .where(members, RolloutDevice.assigned_at.is_not(None))
        .group_by(RolloutDevice.assigned_at)).all()
    # A device that already ran the release counts as committed when it is assigned.
    outcomes = [(at, dev, "committed") for at, dev in session.execute(
        select(RolloutDevice.assigned_at, RolloutDevice.device_id).where(
            members, RolloutDevice.assigned_at.is_not(None),
            RolloutDevice.previous_release_id == rollout.release_id))]
    outcomes += session.execute(
        select(Event.ts, Event.device_id, Event.state)
        .join(RolloutDevice, and_(RolloutDevice.device_id == Event.device_id, members))
        .where(Event.release_id == rollout.release_id,
               Event.state.in_(sorted(FINAL_STATES)), Event.ts >= rollout.created_at,
               Event.ts >= RolloutDevice.assigned_at)
        .order_by(Event.id)).all()
    series = progress_series(start=rollout.created_at, assigned_counts=list(assigned),
                             outcomes=outcomes)
    markers, advanced = [], 0
    for e in log:
        if e.kind == "rollout-stage-advanced":
            advanced += 1
            name = rollout.stages[min(advanced, len(rollout.stages) - 1)]["name"]
            markers.append(Marker(e.ts, name, "stage"))
        elif e.kind in ("rollout-paused", "rollout-resumed"):
            what = e.kind.removeprefix("rollout-")
            markers.append(Marker(e.ts, what, what.removesuffix("d")))
        elif e.kind in ("rollout-aborted", "rollout-rolled-back", "rollout-completed"):
            markers.append(Marker(e.ts, e.kind.removeprefix("rollout-"), "stop"))
    end = utcnow() if rollout.status in IN_PROGRESS else max(
        [rollout.created_at, *(e.ts for e in log), *(p.ts for p in series)])
    return chart(series, markers, total=total, end=end)


@router.post("/rollouts/{rollout_id}/{action}")
def rollout_action(rollout_id: str, action: str, request: Request, operator: SignedIn,
                   session: SessionDep, csrf: Annotated[str, Form()] = "") -> Response:
    _check_csrf(request, csrf)
    if operator.role not in ACTING_ROLES:
        raise Forbidden(f"role {operator.role!r} may not {action} rollouts "
                        "(needs operator or admin)")
    rollout = rollouts.operator_action(session, rollout_id=rollout_id, action=action,
                                       actor=operator.name)
    return RedirectResponse(f"{PREFIX}/rollouts/{rollout.id}", status_code=303)


@router.get("/devices/{device_id}")
def device_page(device_id: str, request: Request, operator: SignedIn,
                session: SessionDep) -> HTMLResponse:
    device = devices.get_device(session, device_id=device_id)
    results = list(session.scalars(select(InstallResult).where(
        InstallResult.device_id == device.id).order_by(InstallResult.finished_at.desc())))
    history = events.list_events(session, device_id=device.id, limit=500)
    return _page("device.html", request, operator, title=f"Device {device.name}",
                 nav="fleet", device=device, names=_release_names(session),
                 groups=[g.name for g in groups_of(session, device=device)],
                 window=devices.effective_window(session, device=device),
                 rollout_id=devices.rollout_of(session, device=device),
                 components=devices.components(session, device=device),
                 results=results, history=list(reversed(history)))


@router.get("/releases/{release_id}")
def release_page(release_id: str, request: Request, operator: SignedIn,
                 session: SessionDep) -> HTMLResponse:
    release = releases.get_release(session, release_id=release_id)
    results = session.execute(
        select(InstallResult, Device.name).join(Device, Device.id == InstallResult.device_id)
        .where(InstallResult.release_id == release.id)
        .order_by(InstallResult.finished_at.desc())).all()
    health = [r.health or {} for r, _name in results if r.outcome == "committed"]

    def median(key: str) -> float | None:
        values = [h[key] for h in health if isinstance(h.get(key), int | float)]
        return statistics.median(values) if values else None

    agreement = [h["top1_agreement"] for h in health
                 if isinstance(h.get("top1_agreement"), int | float)]
    manifest = release.manifest or {}
    running, assigned = devices.release_device_counts(session, release=release)
    return _page(
        "release.html", request, operator, title=f"Release {release.name}@{release.version}",
        nav="fleet", release=release, manifest=manifest,
        adapter=releases.adapter_base(release, releases.llm_models(session)),
        labels=manifest.get("labels", []), metrics=manifest.get("metrics", {}),
        provenance=manifest.get("provenance", {}),
        files=manifest.get("files", {}), results=results,
        outcomes=sorted(Counter(r.outcome for r, _ in results).items()),
        health_summary={"min_top1_agreement": min(agreement) if agreement else None,
                        "median_p95_latency_ms": median("p95_latency_ms"),
                        "median_memory_mb": median("memory_mb")},
        feedback=feedback.summary(session, release_id=release.id),
        rollouts=list(session.scalars(select(Rollout).where(Rollout.release_id == release.id)
                                      .order_by(Rollout.created_at.desc()))),
        component=devices.release_component(release),
        running_count=running, assigned_count=assigned)
