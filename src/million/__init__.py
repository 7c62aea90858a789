"""million: one computation over up to a million partitions, on workers that come and go.

The public API is importable from here. Names load on first use, so that importing one
layer (a sans-IO core, say) does not load the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from million._version import __version__

if TYPE_CHECKING:
    from million.compute.hookspecs import hookimpl
    from million.relay.config import ReflectorConfig
    from million.relay.server import Reflector, open_reflector
    from million.replica.client import Client, ClientError, open_client
    from million.replica.model import Model, Random
    from million.replica.session import JoinError, Session, join
    from million.replica.view import View
    from million.wire.protocol import ProtocolError

_EXPORTS = {
    "Client": "million.replica.client",
    "ClientError": "million.replica.client",
    "JoinError": "million.replica.session",
    "Model": "million.replica.model",
    "ProtocolError": "million.wire.protocol",
    "Random": "million.replica.model",
    "Reflector": "million.relay.server",
    "ReflectorConfig": "million.relay.config",
    "Session": "million.replica.session",
    "View": "million.replica.view",
    "hookimpl": "million.compute.hookspecs",
    "join": "million.replica.session",
    "open_client": "million.replica.client",
    "open_reflector": "million.relay.server",
}

__all__ = [
    "Client",
    "ClientError",
    "JoinError",
    "Model",
    "ProtocolError",
    "Random",
    "Reflector",
    "ReflectorConfig",
    "Session",
    "View",
    "__version__",
    "hookimpl",
    "join",
    "open_client",
    "open_reflector",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'million' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
