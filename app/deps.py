"""FastAPI dependencies, as ``Annotated`` aliases: ``Ctx`` (the service), ``Owner`` (who asks),
``MetricsReader`` (who may scrape /metrics); and the lookups several routers share."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from app.context import ServiceContext
from app.errors import AuthenticationError, NotFoundError
from app.jobs.store import JobRow

__all__ = ["Ctx", "Owner", "MetricsReader", "IdempotencyKey", "OPEN_OWNER", "owner_for_key", "job_or_404"]

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
    if not _matches_any(credentials.credentials, keys):
        raise AuthenticationError("invalid API key", suggestion="Check the key, or ask the operator for one.")
    return owner_for_key(credentials.credentials)


def _matches_any(given: str, keys: list[SecretStr]) -> bool:
    # Compare against every key (no early exit) so timing does not reveal which one matched.
    matches = [hmac.compare_digest(given.encode(), key.get_secret_value().encode()) for key in keys]
    return any(matches)


def metrics_reader(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """/metrics shows every tenant's job counts: with API keys (or a metrics key) configured,
    only the operator's ``MONOQUANT_METRICS_KEY`` may read it; tenants' keys may not."""
    settings = get_context(request).settings
    if not settings.api_keys and settings.metrics_key is None:
        return
    if settings.metrics_key is None:
        raise AuthenticationError(
            "metrics need the operator's metrics key, and none is configured",
            suggestion="The operator sets MONOQUANT_METRICS_KEY and gives it to the Prometheus scraper "
            "(Authorization: Bearer <metrics key>).",
        )
    if credentials is None or not _matches_any(credentials.credentials, [settings.metrics_key]):
        raise AuthenticationError(
            "missing or invalid metrics key",
            suggestion="Send 'Authorization: Bearer <MONOQUANT_METRICS_KEY>'; API keys of tenants cannot read metrics.",
        )


def job_or_404(ctx: ServiceContext, job_id: str, owner: str) -> JobRow:
    """The owner's job, or NotFoundError (another key's job is answered exactly like no job)."""
    job = ctx.store.get_job(job_id, owner)
    if job is None:
        raise NotFoundError(f"no job with id {job_id!r}", suggestion="List your jobs with GET /v1/jobs.")
    return job


Ctx = Annotated[ServiceContext, Depends(get_context)]
Owner = Annotated[str, Depends(current_owner)]
MetricsReader = Annotated[None, Depends(metrics_reader)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Repeat a POST safely: the same key and payload return the same resource.",
    ),
]
