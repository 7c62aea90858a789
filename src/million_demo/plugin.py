"""The demo plugin: prepare repeats the input, compute returns it, collect sums.

Each step first waits ``delay_ms`` (plugin option, default 0), to stand in for
real work: ``million run --plugin demo --option delay_ms=75``. ``check_options``
refuses a ``delay_ms`` that is not a number before the run starts.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

import million

_logger = logging.getLogger("million_demo")


async def _delay(options: dict[str, Any]) -> None:
    delay_ms = options.get("delay_ms", 0)
    if delay_ms:
        await trio.sleep(delay_ms / 1000)


@million.hookimpl
def check_options(input: Any, options: dict[str, Any]) -> None:
    delay_ms = options.get("delay_ms", 0)
    if type(delay_ms) not in (int, float) or not 0 <= delay_ms <= 3_600_000:
        raise ValueError(f"delay_ms must be a number of milliseconds from 0 to 3600000, not {delay_ms!r}")


@million.hookimpl
async def prepare_inputs(input: Any, count: int, options: dict[str, Any]) -> list[Any]:
    await _delay(options)
    return [input] * count


@million.hookimpl
async def compute(input: Any, index: int, options: dict[str, Any]) -> Any:
    await _delay(options)
    return input


@million.hookimpl
async def collect_results(outputs: list[Any], options: dict[str, Any]) -> Any:
    await _delay(options)
    return sum(outputs)


@million.hookimpl
def log(record: dict[str, Any]) -> None:
    _logger.debug("%s", record)
