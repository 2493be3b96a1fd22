"""Who may do what: the client token, allowed origins, and operator access.

Shared by /ws and the HTTP routes so both judge a request the same way. Every check here
reads headers only: callers run it before reading a request body or opening a session.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit

from pydantic import SecretStr

from gpuserver.config import ServerSettings

FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
_REASON_CHARS = 60  # close reasons must fit 123 bytes: quoted client text is clipped


def bearer_token(authorization: str | None) -> str | None:
    """The credentials of an `Authorization: Bearer <token>` header; None for any other."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None


def client_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The token a client offers: the Bearer header, else `?token=` (a browser's WebSocket
    cannot set headers; the access log redacts it)."""
    return bearer_token(headers.get("authorization")) or query.get("token") or None


def token_matches(offered: str | None, expected: SecretStr) -> bool:
    if offered is None:
        return False
    return hmac.compare_digest(offered.encode(), expected.get_secret_value().encode())


def origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """Browsers always send Origin (on WebSockets and POSTs): a page may connect when it
    was served by this server (same host) or its origin is listed. No Origin: not a browser."""
    if origin is None or "*" in allowed or origin in allowed:
        return True
    try:
        origin_host = urlsplit(origin).netloc
    except ValueError:
        return False
    return bool(origin_host) and host is not None and origin_host.lower() == host.lower()


def quoted(text: str) -> str:
    """Client-supplied text for a log line or close reason: escaped, ASCII, clipped."""
    escaped = ascii(text)
    return escaped if len(escaped) <= _REASON_CHARS else escaped[:_REASON_CHARS] + "..."


def is_loopback(peer: str | None, headers: Mapping[str, str], server: ServerSettings) -> bool:
    """Whether the request comes from this machine.

    `peer` is the socket's peer address (uvicorn rewrites it from X-Forwarded-For only for
    `server.trusted_proxies`). Without trusted proxies, forwarding headers mean a proxy on
    this machine is relaying someone else: that is not loopback.
    """
    if not _loopback_address(peer):
        return False
    return bool(server.trusted_proxies) or not any(h in headers for h in FORWARDING_HEADERS)


def _loopback_address(peer: str | None) -> bool:
    try:
        address = ipaddress.ip_address(peer or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # "::ffff:127.0.0.1" on a dual-stack socket
    return (mapped or address).is_loopback


def operator_refusal(
    peer: str | None, headers: Mapping[str, str], server: ServerSettings
) -> tuple[int, str] | None:
    """None if the request may use operator routes, else (HTTP status, why not)."""
    token = server.operator_token
    if token is not None and token_matches(bearer_token(headers.get("authorization")), token):
        return None
    if is_loopback(peer, headers, server):
        return None
    if token is not None:
        return 401, "operator routes need 'Authorization: Bearer <operator token>'"
    return 403, "operator routes are open to loopback only (or set server.operator_token)"
