"""Bearer tokens in front of the gateway's routes.

* ``/admin/...`` (the management API) needs the admin token, always: with none configured
  (``--admin-token`` or ``KETCH_ADMIN_TOKEN``) the management API is off and every admin route
  answers 401, since it can load code and artifacts into the server.
* Every other route is open, unless a predict token is configured (``--predict-token`` or
  ``KETCH_PREDICT_TOKEN``): then it needs that token or the admin token, except the health
  probes, ``/metrics`` and ``/openapi.json``, which orchestrators and scrapers read without
  one.

Tokens are compared in constant time. A refusal is a 401 with a JSON body naming what was
missing and a ``WWW-Authenticate: Bearer`` header (RFC 6750).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

from starlette.types import Scope

#: What a route needs: the admin token, the predict token (when one is configured), or none.
Needs: TypeAlias = Literal["admin", "predict", "open"]

ADMIN_PREFIX = "/admin"
#: Routes that stay open even with a predict token: probes, metrics, the API's description.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json"})


@dataclass(frozen=True, slots=True)
class Tokens:
    """The bearer tokens the gateway accepts (None: not configured)."""

    admin: str | None = None
    predict: str | None = None

    def __post_init__(self) -> None:
        for which, token in (("admin", self.admin), ("predict", self.predict)):
            if token is not None and (not token or token != token.strip()):
                raise ValueError(f"the {which} token must be non-empty, without spaces around")


def is_admin_path(path: str) -> bool:
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


class TokenGuard:
    """Refuses requests without the token their route needs; every route that may need one
    asks it first (:mod:`ketch.http.endpoints`, which answers the 401)."""

    def __init__(self, tokens: Tokens) -> None:
        self._admin = _encoded(tokens.admin)
        self._predict = _encoded(tokens.predict)

    def guards(self, path: str) -> bool:
        """Whether requests to ``path`` (a route's template) may need a token at all: the admin
        routes always, the others only once a predict token is configured."""
        if is_admin_path(path):
            return True
        return self._predict is not None and path not in OPEN_PATHS

    def refusal(self, scope: Scope) -> str | None:
        """Why the request may not go on, or None when it may."""
        path = scope["path"]
        if is_admin_path(path):
            return self.refusal_for("admin", lambda: _bearer_token(scope))
        if path in OPEN_PATHS:
            return None
        return self.refusal_for("predict", lambda: _bearer_token(scope))

    def refusal_for(self, needs: Needs, given: Callable[[], bytes | None]) -> str | None:
        """Why a request to a route that ``needs`` this kind of token may not go on, or None
        when it may; ``given`` reads the request's bearer token (gRPC's ``authorization``
        metadata takes the same rule as HTTP's header)."""
        if needs == "admin":
            if self._admin is None:
                return (
                    "the management API is off: start ketch serve with --admin-token (or "
                    "KETCH_ADMIN_TOKEN) and send it as 'Authorization: Bearer <token>'"
                )
            accepted = [self._admin]
            which = "the admin token"
        elif needs == "predict" and self._predict is not None:
            accepted = [t for t in (self._predict, self._admin) if t is not None]
            which = "the predict token (or the admin token)"
        else:
            return None  # the common case: no header to look for
        token = given()
        if token is None:
            return f"this route needs {which} as 'Authorization: Bearer <token>'"
        if not any(hmac.compare_digest(token, t) for t in accepted):
            return f"the bearer token is not {which}"
        return None


def _encoded(token: str | None) -> bytes | None:
    return None if token is None else token.encode()


def _bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bearer_token(value)
    return None


def bearer_token(authorization: bytes) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` value, or None for another scheme."""
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() == b"bearer" and token.strip():
        return bytes(token.strip())
    return None
