"""FastAPI dependencies, as ``Annotated`` aliases: ``Ctx`` (the service) and ``Owner`` (who asks)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.context import ServiceContext
from app.errors import AuthenticationError

__all__ = ["Ctx", "Owner", "OPEN_OWNER", "owner_for_key"]

OPEN_OWNER = "open"
_bearer = HTTPBearer(auto_error=False, description="An API key configured by the operator (MONOQUANT_API_KEYS).")


def get_context(request: Request) -> ServiceContext:
    return request.app.state.context


def owner_for_key(key: str) -> str:
    """A stable owner id for an API key (the key itself is never stored)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def current_owner(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """Who is asking: the owner id of a valid Bearer key (401 otherwise), or the shared
    open owner when no keys are configured."""
    keys = get_context(request).settings.api_keys
    if not keys:
        return OPEN_OWNER
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise AuthenticationError(
            "missing API key", suggestion="Send the header 'Authorization: Bearer <your API key>'."
        )
    given = credentials.credentials.encode()
    # Compare against every key (no early exit) so timing does not reveal which one matched.
    matches = [hmac.compare_digest(given, key.get_secret_value().encode()) for key in keys]
    if not any(matches):
        raise AuthenticationError("invalid API key", suggestion="Check the key, or ask the operator for one.")
    return owner_for_key(credentials.credentials)


Ctx = Annotated[ServiceContext, Depends(get_context)]
Owner = Annotated[str, Depends(current_owner)]
