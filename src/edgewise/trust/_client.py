"""Device side: download targets only after full TUF verification (python-tuf ngclient).

Invariant: a file handed to the caller has the length and sha256 that the operator's
targets key signed, reached through a timestamp -> snapshot -> targets chain that verifies
against the device's trusted root. Anything else raises `VerificationError` or
`TransportError`, and no partial file is left at the destination.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from ._errors import TransportError, VerificationError

__all__ = ["HttpxFetcher", "TrustedClient"]


class HttpxFetcher(FetcherInterface):
    """The network seam: an httpx client (timeouts, auth headers, TLS settings) for ngclient."""

    def __init__(self, client: httpx.Client, *, headers: Mapping[str, str] | None = None) -> None:
        self._client = client
        self._headers = dict(headers or {})

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            request = self._client.build_request("GET", url, headers=self._headers)
            response = self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise tuf_exc.DownloadError(f"{url}: {exc}") from exc
        if response.status_code != 200:
            response.close()
            raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {response.status_code}",
                                            response.status_code)
        return self._chunks(response)

    @staticmethod
    def _chunks(response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes(1 << 16)
        except httpx.HTTPError as exc:
            raise tuf_exc.DownloadError(str(exc)) from exc
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

