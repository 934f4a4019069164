"""TUF trust: operator-side signing, server-side repository, device-side verification."""

from ._certs import CertPaths, client_tls, init_certs, issue_certificate
from ._client import DirectorClient, HttpxFetcher, TrustedClient
from ._device_auth import (
    DeviceAuth,
    DeviceAuthError,
    load_device_key,
    new_device_key,
    public_key_hex,
    sign_request,
)
from ._director import DirectorRepository, check_director
from ._errors import KeyFileError, TransportError, TrustError, VerificationError
from ._keys import KeyPaths, init_keys, load_root, load_signer, role_key_files, rotate_keys
from ._publisher import DELTAS_ROLE, sign_targets, target_file
from ._repository import ServerRepository
from ._terms import ANY_HARDWARE, ReleaseTerms, check_terms, is_manifest_target

__all__ = [
    "ANY_HARDWARE",
    "DELTAS_ROLE",
    "ReleaseTerms",
    "check_terms",
    "is_manifest_target",
    "CertPaths",
    "DeviceAuth",
    "DirectorClient",
    "DirectorRepository",
    "check_director",
    "DeviceAuthError",
    "load_device_key",
    "new_device_key",
    "public_key_hex",
    "sign_request",
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
