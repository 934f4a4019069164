"""Artifacts in an S3-compatible object store (SeaweedFS, MinIO, AWS S3, ...).

The embedded default keeps artifact bytes in the data directory (`trust.ServerRepository`'s
objects, content-addressed by sha256). With an object store configured, every object is
also written there under `<prefix><sha256>` as soon as it is uploaded, the local directory
becomes a cache any replica can lose, and devices download targets straight from the store
through short-lived presigned URLs (the API answers a target request with a redirect), so
artifact bytes never pass through an API process. The store needs no trust: devices verify
every byte against signed TUF metadata, so a tampered object is refused, never installed.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["S3Config", "S3Objects", "StorageError"]


class StorageError(RuntimeError):
    """The object store refused or could not be reached."""


@dataclass(frozen=True)
class S3Config:
    endpoint_url: str  # e.g. http://127.0.0.1:8333 (SeaweedFS), https://s3.eu-west-1.amazonaws.com
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    prefix: str = "objects/"
    presign_ttl_s: int = 3600  # how long a device's download link stays valid
    redirect_downloads: bool = True  # devices fetch from the store (False: the API streams)


class S3Objects:
    """Content-addressed objects in one bucket (`put`, `fetch`, `exists`, `url`)."""

    def __init__(self, config: S3Config) -> None:
        import boto3
        from botocore.config import Config

        self.config = config
        self._s3 = boto3.client(
            "s3", endpoint_url=config.endpoint_url, region_name=config.region,
            aws_access_key_id=config.access_key, aws_secret_access_key=config.secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          retries={"max_attempts": 3, "mode": "standard"},
                          connect_timeout=5, read_timeout=60))

    def _key(self, sha256: str) -> str:
        return f"{self.config.prefix}{sha256}"

    def _call(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"object store {self.config.endpoint_url} "
                               f"(bucket {self.config.bucket}): {what}: {exc}") from exc

    def check(self) -> None:
        """At server start: the bucket exists and these credentials may use it."""
        self._call("the bucket is not usable", self._s3.head_bucket, Bucket=self.config.bucket)

    def put(self, sha256: str, path: Path) -> None:
        self._call(f"cannot store {sha256}", self._s3.upload_file, str(path),
                   self.config.bucket, self._key(sha256))

    def exists(self, sha256: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._s3.head_object(Bucket=self.config.bucket, Key=self._key(sha256))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"object store: cannot look up {sha256}: {exc}") from exc

    def fetch(self, sha256: str, dest: Path) -> bool:
        """Download an object to `dest` (atomically); False when the store has none."""
        if not self.exists(sha256):
            return False
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".fetch.")
        os.close(fd)
        try:
            self._call(f"cannot read {sha256}", self._s3.download_file, self.config.bucket,
                       self._key(sha256), tmp)
            os.replace(tmp, dest)
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    def url(self, sha256: str) -> str:
        """A presigned GET URL for one object, valid `presign_ttl_s` (signed locally)."""
        return self._call("cannot sign a download link", self._s3.generate_presigned_url,
                          "get_object", Params={"Bucket": self.config.bucket,
                                                "Key": self._key(sha256)},
                          ExpiresIn=self.config.presign_ttl_s)
