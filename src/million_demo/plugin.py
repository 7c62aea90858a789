"""The demo plugin: prepare repeats the input, compute returns it, collect sums.

Each step first waits ``delay_ms`` (plugin option, default 0), to stand in for real
work: ``million run --plugin demo --option delay_ms=75``. The hooks are plain functions,
as CPU-bound work is: million runs them in a worker thread, off the event loop.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import million

_logger = logging.getLogger("million_demo")


def _delay(options: dict[str, Any]) -> None:
    delay_ms = options.get("delay_ms", 0)
    if delay_ms:
        time.sleep(delay_ms / 1000)


@million.hookimpl
def prepare_inputs(input: Any, count: int, options: dict[str, Any]) -> list[Any]:
    _delay(options)
    return [input] * count


@million.hookimpl
def compute(input: Any, index: int, options: dict[str, Any]) -> Any:
    _delay(options)
    return input


@million.hookimpl
def collect_results(outputs: list[Any], options: dict[str, Any]) -> Any:
    _delay(options)
    return sum(outputs)


@million.hookimpl
def log(record: dict[str, Any]) -> None:
    _logger.debug("%s", record)
