"""What ``closedloop serve`` checks before it serves: the API token and whether the address
is loopback. No web framework is imported here."""

from __future__ import annotations

import ipaddress

from closedloop._errors import ConfigError

TOKEN_ENV = "CLOSEDLOOP_API_TOKEN"  # noqa: S105 - the variable's name
MIN_TOKEN = 16


def check_token(token: str | None) -> str | None:
    """A usable API token (at least 16 printable ASCII characters, no spaces), or None; a
    :class:`~closedloop.ConfigError` that never shows the token otherwise."""
    if token is None or token == "":
        return None
    if len(token) < MIN_TOKEN or not all(33 <= ord(c) < 127 for c in token):
        raise ConfigError(f"the API token must be at least {MIN_TOKEN} printable ASCII "
                          "characters without spaces (make one with `python -c 'import "
                          "secrets; print(secrets.token_urlsafe(32))'`)")
    return token


def is_loopback(addr: str) -> bool:
    """True when ``addr`` is a loopback address (``127.0.0.0/8``, ``::1``) or
    ``localhost``: only processes on this machine can connect."""
    text = addr.strip().strip("[]")
    if text.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond loopback


def url_host(addr: str) -> str:
    """``addr`` as the host part of a URL (an IPv6 address in brackets)."""
    text = addr.strip().strip("[]")
    return f"[{text}]" if ":" in text else text
