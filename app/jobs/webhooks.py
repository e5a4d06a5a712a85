"""Signed job-end webhooks, following the Standard Webhooks specification.

Headers: ``webhook-id`` (stable per job end, so receivers can de-duplicate retries),
``webhook-timestamp`` (unix seconds) and ``webhook-signature``: ``v1,`` + base64 of
HMAC-SHA256 over ``"{id}.{timestamp}.{body}"`` keyed with the base64-decoded secret
(the part after ``whsec_``).

Example (receiver side):
    >>> secret = "whsec_" + base64.b64encode(b"0" * 32).decode()          # doctest: +SKIP
    >>> verify(secret, headers, body)                                     # doctest: +SKIP
    True
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from app.config import Settings
from mono_quant.errors import InputError

__all__ = ["resolve_secret", "sign", "verify", "deliver"]

logger = logging.getLogger("app.webhooks")


def resolve_secret(settings: Settings) -> str:
    """The signing secret: the configured one, or one generated once into ``data_dir``."""
    if settings.webhook_secret is not None:
        return settings.webhook_secret.get_secret_value()
    path = Path(settings.data_dir) / "webhook_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        generated = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        temp = path.with_suffix(".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(generated)
        try:
            os.link(temp, path)  # fails if another process won the race: keep theirs
        except FileExistsError:
            pass
        finally:
            temp.unlink(missing_ok=True)
    return path.read_text().strip()


def _key(secret: str) -> bytes:
    encoded = secret.removeprefix("whsec_")
    try:
        return base64.b64decode(encoded, validate=True)
    except ValueError:
        return encoded.encode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for a message."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: int = 300) -> bool:
    """Check a received webhook's signature and timestamp (what a receiver does)."""
    try:
        message_id = headers["webhook-id"]
        timestamp = int(headers["webhook-timestamp"])
        signatures = headers["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = sign(secret, message_id, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in signatures)


def check_destination(url: str, allow_private: bool) -> None:
    """Refuse a callback URL whose host is, or resolves to, a non-public address (loopback,
    private, link-local, reserved...) unless the operator allows it: the server must not be
    usable to reach its own network. Raises :class:`InputError` (a 400)."""
    if allow_private:
        return
    host = httpx.URL(url).host
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InputError(
            f"callback_url host {host!r} does not resolve",
            suggestion="Give a callback_url on a public host name or address.",
        ) from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if not address.is_global:
            raise InputError(
                f"callback_url host {host!r} is a non-public address ({address})",
                suggestion="Use a public callback_url; operators can allow private hosts with "
                "MONOQUANT_WEBHOOK_ALLOW_PRIVATE=true.",
            )


def deliver(settings: Settings, url: str, event_type: str, job: dict[str, Any], message_id: str) -> bool:
    """POST ``{"type", "timestamp", "data": job}`` to ``url``, retrying with backoff.
    Returns True once a 2xx answer came back. Never raises: a webhook must not fail a job."""
    try:  # checked again at delivery: the name may resolve elsewhere by now
        check_destination(url, settings.webhook_allow_private)
    except InputError as exc:
        logger.warning("webhook %s to %s not sent: %s", message_id, url, exc.message)
        return False
    secret = resolve_secret(settings)
    payload = {"type": event_type, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "data": job}
    body = json.dumps(payload, default=str, separators=(",", ":")).encode()
    for attempt in range(settings.webhook_attempts):
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, message_id, timestamp, body),
        }
        try:
            response = httpx.post(url, content=body, headers=headers, timeout=settings.webhook_timeout_s)
            if response.is_success:
                return True
            logger.warning("webhook %s to %s answered %s", message_id, url, response.status_code)
        except httpx.HTTPError as exc:
            logger.warning("webhook %s to %s failed: %s", message_id, url, exc)
        if attempt + 1 < settings.webhook_attempts:
            time.sleep(min(2.0**attempt * 0.5, 10.0))
    return False
