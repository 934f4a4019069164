"""TUF trust: operator-side signing, server-side repository, device-side verification."""

from ._certs import CertPaths, client_tls, init_certs, issue_certificate
from ._client import HttpxFetcher, TrustedClient
from ._errors import KeyFileError, TransportError, TrustError, VerificationError
from ._keys import KeyPaths, init_keys, load_root, load_signer, role_key_files, rotate_keys
from ._publisher import DELTAS_ROLE, sign_targets, target_file
from ._repository import ServerRepository

__all__ = [
    "DELTAS_ROLE",
    "CertPaths",
    "client_tls",
    "init_certs",
    "issue_certificate",
    "HttpxFetcher",
    "KeyFileError",
    "KeyPaths",
    "ServerRepository",
    "TransportError",
    "TrustError",
    "TrustedClient",
    "VerificationError",
    "init_keys",
    "load_root",
    "load_signer",
    "role_key_files",
    "rotate_keys",
    "sign_targets",
    "target_file",
]
