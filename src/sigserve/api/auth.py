"""Bearer-token auth, checked in constant time on every path but the public ones.

The check lives in the edge middleware (pure ASGI, before routing), so no route can be added that
forgets it: a request without the token never reaches the router, and an unknown path answers 401,
not 404, to a caller without the token.
"""

from __future__ import annotations

import hmac

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
CHALLENGE = b'Bearer realm="sigserve"'
CHALLENGE_INVALID = b'Bearer realm="sigserve", error="invalid_token"'


class TokenCheck:
    def __init__(self, token: str) -> None:
        self._token = token.strip().encode()

    def check(self, header: bytes | None) -> str | None:
        """None when ``header`` (the raw Authorization value) carries the token, else the reason."""
        if header is None:
            return "missing"
        if len(header) < 7 or header[:7].lower() != b"bearer ":
            return "malformed"
        if hmac.compare_digest(header[7:].strip(), self._token):
            return None
        return "wrong"


MESSAGES = {
    "missing": "this endpoint needs a bearer token: send 'Authorization: Bearer <SIGSERVE_AUTH_TOKEN>'",
    "malformed": "the Authorization header is not 'Bearer <token>'",
    "wrong": "the bearer token is wrong",
}
