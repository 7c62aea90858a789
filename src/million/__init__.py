"""million: one computation over up to a million partitions, on workers that come and go."""

__version__ = "0.1.0"

from million.client import Client, ClientError, open_client
from million.hookspecs import hookimpl
from million.model import Model, Random
from million.protocol import ProtocolError
from million.reflector import Reflector, ReflectorConfig, open_reflector
from million.session import JoinError, Session, join
from million.view import View

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
