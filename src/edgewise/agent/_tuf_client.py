"""The agent's TUF client behind the tuf-conformance client protocol, so the exact code path
devices use (python-tuf ngclient + our httpx fetcher) can be checked against that suite:

    tuf-client --metadata-dir DIR init TRUSTED_ROOT
    tuf-client --metadata-dir DIR --metadata-url URL refresh
    tuf-client --metadata-dir DIR --metadata-url URL --target-name NAME \
        --target-base-url URL --target-dir DIR download

Exit status 0 on success, 1 on any failure (the reason goes to stderr).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import httpx
from tuf.api import exceptions as tuf_exc
from tuf.ngclient import Updater

from ..trust import HttpxFetcher, client_tls

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgewise agent tuf-client")
    p.add_argument("--metadata-dir", required=True)
    p.add_argument("--metadata-url")
    p.add_argument("--target-name")
    p.add_argument("--target-base-url")
    p.add_argument("--target-dir")
    p.add_argument("command", choices=["init", "refresh", "download"])
    p.add_argument("trusted_root", nargs="?")
    return p


def _updater(args: argparse.Namespace, http: httpx.Client) -> Updater:
    if not args.metadata_url:
        raise ValueError("--metadata-url is required")
    return Updater(metadata_dir=args.metadata_dir, metadata_base_url=args.metadata_url,
                   target_dir=args.target_dir, target_base_url=args.target_base_url,
                   fetcher=HttpxFetcher(http), bootstrap=None)


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "init":
        if not args.trusted_root:
            raise ValueError("init needs TRUSTED_ROOT")
        Path(args.metadata_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.trusted_root, Path(args.metadata_dir) / "root.json")
        return 0
    with httpx.Client(timeout=30, verify=client_tls(os.environ.get("EDGEWISE_CA"))) as http:
        updater = _updater(args, http)
        if args.command == "refresh":
            updater.refresh()
            return 0
        if not (args.target_name and args.target_base_url and args.target_dir):
            raise ValueError("download needs --target-name, --target-base-url, --target-dir")
        info = updater.get_targetinfo(args.target_name)
        if info is None:
            raise ValueError(f"{args.target_name} is not a signed target")
        Path(args.target_dir).mkdir(parents=True, exist_ok=True)
        if updater.find_cached_target(info) is None:
            updater.download_target(info)
        return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except (tuf_exc.RepositoryError, tuf_exc.DownloadError, ValueError, OSError) as exc:
        print(f"tuf-client: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
