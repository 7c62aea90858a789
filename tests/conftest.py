"""Fixtures: a real reflector on 127.0.0.1 (port 0, in-memory store) and real clients.

The ``reflector`` runs once with each websocket engine; a module or test marked
``one_engine`` gets the default engine only (where the transport is tested elsewhere).
Tests marked ``slow`` are skipped, saying so, unless ``-m`` selects them
(``nox -s tests -- -m slow``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import million
from million.relay.config import ReflectorConfig
from million.wire.transport import ENGINES

SLOW = "slow: thousands of sessions; run them with nox -s tests -- -m slow"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "one_engine: the reflector fixture uses the default engine only")
    config.addinivalue_line("markers", SLOW)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``slow`` tests, with the reason, unless ``-m`` names them."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason=SLOW)
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)  # before the fixture's own params apply
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" in metafunc.fixturenames and metafunc.definition.get_closest_marker("one_engine"):
        metafunc.parametrize("engine", [ReflectorConfig().transport])


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The websocket engine of the ``reflector`` fixture."""
    return request.param


@pytest.fixture
async def reflector(engine: str) -> AsyncIterator[million.Reflector]:
    """An in-process reflector, once with each websocket engine."""
    async with million.open_reflector(ReflectorConfig(port=0, transport=engine)) as reflector:
        yield reflector


@pytest.fixture
async def client(reflector: million.Reflector) -> AsyncIterator[million.Client]:
    async with million.open_client(reflector.url, label="test") as client:
        yield client
