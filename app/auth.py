"""Optional bearer-token auth: on when COMPLETE_API_KEY is set, for every route but /health.

/health stays open because load balancers and Serve-style probes call it without secrets
and it reveals nothing but "the model is loaded".
"""

from __future__ import annotations

import hmac
import os
from typing import Optional

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from app.errors import APIError

API_KEY_ENV = "COMPLETE_API_KEY"


def api_key_from_env() -> Optional[str]:
    key = os.environ.get(API_KEY_ENV, "")
    return key or None


def bearer_dependency(api_key: Optional[str]):
    """A FastAPI dependency that checks `Authorization: Bearer <key>` (no-op without a key)."""
    if not api_key:
        async def open_route() -> None:
            return

        return open_route
    expected = api_key.encode()

    # HTTPBearer(auto_error=False) only declares the scheme in the OpenAPI schema (so clients
    # and fuzzers know to send the key); the check below does the work, with our 401 body.
    async def check(request: Request, _: object = Depends(HTTPBearer(auto_error=False))) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken must not reveal how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", "authorization",
                           headers={"WWW-Authenticate": "Bearer"})

    return check
