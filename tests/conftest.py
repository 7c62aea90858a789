"""Fixtures: a real reflector on 127.0.0.1 (port 0, in-memory store) and real clients."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import million
from million.relay.config import ReflectorConfig
from million.wire.transport import ENGINES


@pytest.fixture(params=ENGINES)
async def reflector(request: pytest.FixtureRequest) -> AsyncIterator[million.Reflector]:
    """An in-process reflector, once with each websocket engine."""
    async with million.open_reflector(ReflectorConfig(port=0, transport=request.param)) as reflector:
        yield reflector


@pytest.fixture
async def client(reflector: million.Reflector) -> AsyncIterator[million.Client]:
    async with million.open_client(reflector.url, label="test") as client:
        yield client
