"""Bearer tokens: the admin token, operator API tokens and enrollment tokens, stored only as
sha256. (Devices sign their requests instead: `trust._device_auth`.)"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["ROLES", "WEAK_TOKENS", "check_admin_token", "hash_token", "new_token"]

# admin: everything; publisher: releases; operator: devices, groups, rollouts; viewer: read.
ROLES = frozenset({"admin", "publisher", "operator", "viewer"})

WEAK_TOKENS = {"admin", "changeme", "password", "secret", "token", "edgewise"}


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_admin_token(presented: str, expected_hash: str) -> bool:
    return hmac.compare_digest(hash_token(presented), expected_hash)
