"""Device side: download targets only after full TUF verification (python-tuf ngclient).

Invariant: a file handed to the caller has the length and sha256 that the operator's
targets key signed, reached through a timestamp -> snapshot -> targets chain that verifies
against the device's trusted root. Anything else raises `VerificationError` or
`TransportError`, and no partial file is left at the destination.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from ._errors import TransportError, VerificationError

__all__ = ["DirectorClient", "HttpxFetcher", "TrustedClient"]


class HttpxFetcher(FetcherInterface):
    """The network seam: an httpx client (timeouts, auth headers, TLS settings) for ngclient.

    With `partial_dir`, target downloads are resumable: bytes received before a dropped
    connection (or a power cut) are kept under a name derived from the URL, and the next
    attempt asks only for the rest (HTTP Range). Resumed or not, python-tuf verifies the
    whole file against its signed length and hash, so a stale or poisoned partial file can
    only cost a retry: a verification failure discards it.
    """

    def __init__(self, client: httpx.Client, *, headers: Mapping[str, str] | None = None,
                 partial_dir: Path | None = None) -> None:
        self._client = client
        self._headers = dict(headers or {})
        self._partial_dir = Path(partial_dir) if partial_dir else None

    def _partial_path(self, url: str) -> Path | None:
        if self._partial_dir is None or "/tuf/targets/" not in url:
            return None  # metadata is small and must never be stitched together
        self._partial_dir.mkdir(parents=True, exist_ok=True)
        return self._partial_dir / hashlib.sha256(url.encode()).hexdigest()

    def _fetch(self, url: str) -> Iterator[bytes]:
        partial = self._partial_path(url)
        have = partial.stat().st_size if partial is not None and partial.exists() else 0
        headers = dict(self._headers)
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            request = self._client.build_request("GET", url, headers=headers)
            # Targets may redirect to an object store's presigned URL (or a mirror): any
            # source will do, the bytes are verified against signed hashes either way.
            response = self._client.send(request, stream=True, follow_redirects=True)
        except httpx.HTTPError as exc:
            raise tuf_exc.DownloadError(f"{url}: {exc}") from exc
        if have and response.status_code == 416:  # we already hold it all (or garbage)
            response.close()
            partial.unlink(missing_ok=True)
            return self._fetch(url)
        if response.status_code not in (200, 206) or (response.status_code == 206 and not have):
            response.close()
            raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {response.status_code}",
                                            response.status_code)
        if partial is None:
            return self._chunks(response)
        return self._resumable(response, partial, resume=response.status_code == 206)

    @staticmethod
    def _chunks(response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes(1 << 16)
        except httpx.HTTPError as exc:
            raise tuf_exc.DownloadError(str(exc)) from exc
        finally:
            response.close()

    @staticmethod
    def _resumable(response: httpx.Response, partial: Path, *, resume: bool) -> Iterator[bytes]:
        try:
            with open(partial, "ab" if resume else "wb") as keep:
                if resume:
                    with open(partial, "rb") as old:
                        while chunk := old.read(1 << 16):
                            yield chunk
                for chunk in response.iter_bytes():  # as received: keep every byte we got
                    keep.write(chunk)
                    keep.flush()
                    yield chunk
            partial.unlink(missing_ok=True)  # complete: python-tuf verifies what it got
        except httpx.HTTPError as exc:
            raise tuf_exc.DownloadError(f"connection dropped, will resume: {exc}") from exc
        finally:
            response.close()


class TrustedClient:
    """One refresh of the repository's metadata, then verified target downloads."""

    def __init__(
        self,
        *,
        metadata_dir: Path,
        trusted_root: bytes,
        base_url: str,
        fetcher: FetcherInterface,
    ) -> None:
        metadata_dir = Path(metadata_dir)
        metadata_dir.mkdir(parents=True, exist_ok=True)
        # Once the device has walked the root chain forward, the cached root supersedes the
        # one it was provisioned with.
        bootstrap = None if (metadata_dir / "root.json").exists() else trusted_root
        base = base_url.rstrip("/")
        try:
            self._updater = Updater(
                metadata_dir=str(metadata_dir),
                metadata_base_url=f"{base}/tuf/metadata/",
                target_base_url=f"{base}/tuf/targets/",
                fetcher=fetcher,
                config=UpdaterConfig(max_root_rotations=32),
                bootstrap=bootstrap,
            )
        except tuf_exc.RepositoryError as exc:
            raise VerificationError(f"trusted root is invalid: {exc}") from exc
        self._refreshed = False

    def refresh(self) -> None:
        if self._refreshed:
            return
        with _wrapped("metadata refresh"):
            self._updater.refresh()
        self._refreshed = True

    def target_info(self, target_path: str) -> TargetFile:
        self.refresh()
        with _wrapped(target_path):
            info = self._updater.get_targetinfo(target_path)
        if info is None:
            raise VerificationError(f"{target_path} is not a signed target of this repository")
        return info

    def download(self, target_path: str, dest: Path) -> TargetFile:
        """Download and verify one target to `dest` (atomically); return its signed info."""
        info = self.target_info(target_path)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self._updater.find_cached_target(info, str(dest)):
            return info
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        os.close(fd)
        try:
            with _wrapped(target_path):
                self._updater.download_target(info, tmp)
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return info


class DirectorClient:
    """The device's second TUF updater: its own director metadata (`_director`), fetched over
    the device's signed client, verified against the director root from enrollment."""

    def __init__(self, *, metadata_dir: Path, trusted_root: bytes, base_url: str,
                 fetcher: FetcherInterface) -> None:
        self._dir = Path(metadata_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        bootstrap = None if (self._dir / "root.json").exists() else trusted_root
        try:
            self._updater = Updater(
                metadata_dir=str(self._dir),
                metadata_base_url=f"{base_url.rstrip('/')}/api/v1/device/director/",
                fetcher=fetcher, bootstrap=bootstrap)
        except tuf_exc.RepositoryError as exc:
            raise VerificationError(f"director root is invalid: {exc}") from exc

    def instructions(self) -> dict[str, TargetFile]:
        """The bundles the director says this device must run, by target path: one per
        component (empty: no assignment)."""
        with _wrapped("director metadata refresh"):
            self._updater.refresh()
            # ngclient persisted exactly the targets metadata it just verified.
            listed = Metadata[Targets].from_bytes((self._dir / "targets.json").read_bytes())
        return dict(listed.signed.targets)


class _wrapped:
    """Map python-tuf exceptions to ours at the seam."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            return False
        if isinstance(exc, tuf_exc.RepositoryError):
            raise VerificationError(f"{self.what}: verification failed: {exc}") from exc
        if isinstance(exc, tuf_exc.DownloadError):
            raise TransportError(f"{self.what}: download failed: {exc}") from exc
        if isinstance(exc, OSError):
            raise TransportError(f"{self.what}: local I/O failed: {exc}") from exc
        return False

