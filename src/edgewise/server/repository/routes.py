"""TUF metadata and targets, served to devices. Everything here is signed, so mirrors and
caches in front of it need no trust; a device verifies each byte against its root."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from .._deps import RepoDep
from .._errors import NotFound

router = APIRouter(prefix="/tuf", tags=["TUF repository"])


@router.get("/metadata/{filename}")
def metadata(filename: str, repo: RepoDep, request: Request) -> Response:
    """Served from memory while the file is unchanged, with an ETag: a mirror or a device
    that sends `If-None-Match` with it gets 304 and no body. timestamp.json and root.json
    may change at any time (no-cache: revalidate); a versioned file (N.role.json) never
    changes."""
    if filename == "timestamp.json":
        repo.refresh_online_metadata()
    found = repo.metadata_bytes(filename)
    if found is None:
        raise NotFound(f"no metadata {filename}")
    body, etag = found
    cache = "public, max-age=31536000, immutable" if filename[:1].isdigit() else "no-cache"
    headers = {"ETag": etag, "Cache-Control": cache}
    tags = _etags(request.headers.get("if-none-match", ""))
    if etag in tags or "*" in tags:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


def _etags(header: str) -> set[str]:
    """The entity tags of an If-None-Match header (weak ones compare as strong here)."""
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


@router.get("/targets/{target_path:path}")
def target(target_path: str, repo: RepoDep, request: Request) -> Response:
    # Consistent snapshots: clients ask for DIR/<sha256>.<name>; the object store is keyed by
    # sha256, and the hash must belong to a target the operator signed.
    dirname, _, basename = target_path.rpartition("/")
    sha, dot, name = basename.partition(".")
    info = repo.target(f"{dirname}/{name}" if dirname else name) if dot else None
    if info is None or info.hashes.get("sha256") != sha:
        raise NotFound(f"no target {target_path}")
    if request.app.state.ctx.redirect_downloads:
        # The bytes come from the object store, not through this process; the device
        # verifies them against the signed hashes as it would ours.
        return RedirectResponse(repo.object_url(sha), status_code=307)
    path = repo.object_path(sha)
    if path is None:
        raise NotFound(f"target {target_path} is signed but its bytes are missing")
    request.app.state.metrics.bytes_served.inc(info.length)
    return FileResponse(path, media_type="application/octet-stream")
