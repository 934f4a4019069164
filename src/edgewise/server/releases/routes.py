from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, File, Form, Response, UploadFile
from pydantic import BaseModel, Field
from tuf.api.metadata import Metadata, Targets

from ...trust import VerificationError
from .._deps import AdminDep, BodyDep, ContextDep, PublisherDep, RepoDep, SessionDep, ViewerDep
from .._errors import InvalidInput
from . import service
from .models import Release, ReleaseVariant

router = APIRouter(prefix="/api/v1", tags=["releases"])


class VariantOut(BaseModel):
    hardware: str
    version: str
    manifest_target: str
    size_bytes: int

    @classmethod
    def of(cls, v: ReleaseVariant) -> VariantOut:
        return cls(hardware=v.hardware, version=v.version, manifest_target=v.manifest_target,
                   size_bytes=v.size_bytes)


class AdapterOut(BaseModel):
    """An LLM adapter release's base and its transfer: `release_bytes` (what a device
    downloads) against `full_model_bytes` (the base GGUF: the fine-tune shipped as a model)."""

    base_release: str = Field(description="the base as the adapter's bundle names it")
    base_sha256: str = Field(description="sha256 of the base GGUF the adapter applies to")
    base_release_id: str | None = Field(
        description="the release on this server that ships that GGUF; null when none does")
    base_name: str | None
    base_version: str | None
    rank: int
    alpha: float
    adapter_bytes: int
    release_bytes: int
    full_model_bytes: int | None = Field(description="null when the base is not on this "
                                         "server and the adapter did not record its size")


class ReleaseOut(BaseModel):
    id: str
    name: str
    version: str
    manifest_target: str
    targets_version: int
    size_bytes: int
    created_at: datetime
    manifest: dict[str, Any]
    deltas: list[dict[str, Any]]
    variants: list[VariantOut] = []
    adapter: AdapterOut | None = None

    @classmethod
    def of(cls, r: Release, session, models=None) -> ReleaseOut:
        """`models`: `service.llm_models` when listing many releases (computed once)."""
        variants = [VariantOut.of(v) for v in service.variants(session, release_id=r.id)]
        adapter = service.adapter_base(r, models if models is not None else
                                       service.llm_models(session)) \
            if (r.manifest or {}).get("kind") == "llm-adapter" else None
        return cls(id=r.id, name=r.name, version=r.version, manifest_target=r.manifest_target,
                   targets_version=r.targets_version, size_bytes=r.size_bytes,
                   created_at=r.created_at, manifest=r.manifest, deltas=r.deltas or [],
                   variants=variants, adapter=AdapterOut(**adapter) if adapter else None)


@router.post("/releases", response_model=ReleaseOut, status_code=201,
             dependencies=[PublisherDep])
def publish(
    ctx: ContextDep,
    session: SessionDep,
    targets: UploadFile = File(description="targets metadata signed with the offline key"),
    files: list[UploadFile] = File(description="the bundle's files, in any order"),
) -> ReleaseOut:
    # A plain def: hashing, verifying, storing and delta-encoding the files take seconds to
    # minutes and run in the thread pool, never on the event loop that answers devices.
    signed = targets.file.read()
    release = service.publish(
        session, repo=ctx.repo, signed_targets=signed, uploads=[f.file for f in files],
        max_upload_bytes=ctx.max_upload_bytes,
    )
    return ReleaseOut.of(release, session)


@router.get("/releases", response_model=list[ReleaseOut], dependencies=[ViewerDep])
def list_releases(session: SessionDep) -> list[ReleaseOut]:
    models = service.llm_models(session)
    return [ReleaseOut.of(r, session, models) for r in service.list_releases(session)]


@router.get("/releases/{release_id}", response_model=ReleaseOut, dependencies=[ViewerDep])
def get_release(release_id: str, session: SessionDep) -> ReleaseOut:
    return ReleaseOut.of(service.get_release(session, release_id=release_id), session)


@router.post("/releases/{release_id}/variants", response_model=ReleaseOut, status_code=201,
             dependencies=[PublisherDep])
def add_variant(
    release_id: str,
    ctx: ContextDep,
    session: SessionDep,
    hardware: list[str] = Form(description="hardware ids whose devices install this build"),
    targets: UploadFile = File(description="targets metadata signed with the offline key"),
    files: list[UploadFile] = File(description="the variant bundle's files, in any order"),
) -> ReleaseOut:
    """Another build of a release (e.g. an int8 candidate) for devices of some hardware."""
    service.add_variant(session, repo=ctx.repo, release_id=release_id, hardware=hardware,
                        signed_targets=targets.file.read(), uploads=[f.file for f in files],
                        max_upload_bytes=ctx.max_upload_bytes)
    return ReleaseOut.of(service.get_release(session, release_id=release_id), session)


@router.get("/tuf/targets-metadata", dependencies=[PublisherDep],
            responses={200: {"content": {"application/json": {}}}, 204: {}})
def current_targets_metadata(repo: RepoDep) -> Response:
    """The current signed targets metadata, for the operator to extend and re-sign."""
    current = repo.current_targets()
    if current is None:
        return Response(status_code=204)
    return Response(content=current, media_type="application/json")


@router.post("/tuf/root", dependencies=[AdminDep], status_code=201)
def rotate_root(body: BodyDep, repo: RepoDep) -> dict[str, int]:
    """Publish the next root version (key rotation), signed offline by old and new keys."""
    try:
        root = repo.add_root(body)
    except VerificationError as exc:
        raise InvalidInput(str(exc)) from None
    return {"version": root.version}


@router.post("/tuf/targets", dependencies=[PublisherDep], status_code=201)
def resign_targets(body: BodyDep, repo: RepoDep) -> dict[str, int]:
    """Publish re-signed targets metadata with no new release (after a targets-key rotation)."""
    current = repo.current_targets()
    try:
        new = Metadata[Targets].from_bytes(body).signed
        old = Metadata[Targets].from_bytes(current).signed if current else None
    except Exception as exc:
        raise InvalidInput(f"targets metadata is malformed: {exc}") from None
    if old is not None and new.targets != old.targets:
        raise InvalidInput("re-signing must not change the targets; publish a release instead")
    try:
        published = repo.publish(body)
    except VerificationError as exc:
        raise InvalidInput(str(exc)) from None
    return {"version": published.version}
