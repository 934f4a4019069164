"""Schemathesis fuzzing of the server's OpenAPI: no input produces a 500, and nothing garbage
is accepted (schema conformance of the responses)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edgewise.server.app import ServerConfig, create_app  # noqa: E402
from edgewise.trust import init_keys  # noqa: E402

ADMIN = secrets.token_urlsafe(24)
_WORK = Path(__import__("tempfile").mkdtemp(prefix="edgewise-fuzz-"))
_KEYS = init_keys(_WORK / "keys")
APP = create_app(ServerConfig(data_dir=_WORK / "srv", root_path=_KEYS.root_json,
                              online_key_path=_KEYS.online_key, admin_token=ADMIN))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


# One pytest item per API operation, each with its own id (schema.parametrize() gives every
# operation's item the same node id, and pytest-xdist, which `make test` runs, hands out work
# by node id: it would fuzz one operation of the 43).
OPERATIONS = [result.ok() for result in schema.get_all_operations()]


@pytest.mark.slow
@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.label for op in OPERATIONS])
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_api_never_fails_with_a_server_error(operation, data) -> None:
    case = data.draw(operation.as_strategy())
    # Half the cases carry the admin token, so the handlers behind auth are fuzzed too.
    if secrets.randbelow(2):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {ADMIN}"}
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} " \
                                        f"{response.text[:300]}"
