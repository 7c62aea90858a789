"""Which web pages may open a websocket to the reflector: its allowed origins.

A browser names, in the ``Origin`` header of every websocket handshake, the site of the
page that opens it. The reflector's ports accept a handshake without one (programs send
none) or from an origin it allows: ``allow_origins`` of its configuration and the
origins of its own web port. Those are computed from the configuration, never from a
request: a page whose DNS name was rebound to the reflector's address sends whatever
``Host`` header matches its own origin.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from urllib.parse import urlsplit

from million.relay.config import ConfigError, ReflectorConfig, is_loopback

__all__ = ["allowed_origins", "normalize_origin", "origin_check"]

DEFAULT_PORTS = {"http": 80, "https": 443}
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
ANY_ADDRESS = ("", "0.0.0.0", "::")  # the web port is reachable on loopback, among others


def normalize_origin(origin: str) -> str | None:
    """``scheme://host:port`` of a web origin, in lower case with its port spelled out;
    None if ``origin`` is no http(s) origin (``null``, a path, a user name...)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    return f"{scheme}://{_host(parts.hostname)}:{port or DEFAULT_PORTS[scheme]}"


def _host(name: str) -> str:
    """A host as an origin spells it: IPv6 addresses compressed and in brackets."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name.lower()
    return f"[{address.compressed}]" if address.version == 6 else address.compressed


def allowed_origins(config: ReflectorConfig, http_port: int | None) -> frozenset[str]:
    """The normalized origins allowed to open websockets: ``config.allow_origins`` and the
    origins of the web port bound at ``http_port`` (None: no web port).

    ``ConfigError`` if an entry of ``allow_origins`` is no origin.
    """
    allowed = set()
    for origin in config.allow_origins:
        normalized = normalize_origin(origin)
        if normalized is None:
            raise ConfigError(
                f"not a web origin: {origin!r} (expected http://HOST:PORT or https://HOST:PORT)"
            )
        allowed.add(normalized)
    return frozenset(allowed | web_origins(config, http_port))


def web_origins(config: ReflectorConfig, http_port: int | None) -> set[str]:
    """The origins of the reflector's own web port: its configured host, and every loopback
    name when it listens on loopback (or on every address)."""
    if http_port is None:
        return set()
    scheme = "https" if config.ssl_context is not None else "http"
    hosts = set() if config.host in ANY_ADDRESS else {config.host}
    if config.host in ANY_ADDRESS or is_loopback(config.host):
        hosts.update(LOOPBACK_HOSTS)
    return {f"{scheme}://{_host(host)}:{http_port}" for host in hosts}


def origin_check(
    config: ReflectorConfig, http_port: int | None, refused: Callable[[], None] | None = None
) -> Callable[[str | None], bool]:
    """The predicate for ``transport.serve(origins=...)`` and the web port: no ``Origin``
    header, or one of ``allowed_origins(config, http_port)``; ``refused`` (if given) is
    called for each other."""
    allowed = allowed_origins(config, http_port)

    def check(origin: str | None) -> bool:
        if origin is None or normalize_origin(origin) in allowed:
            return True
        if refused is not None:
            refused()
        return False

    return check
