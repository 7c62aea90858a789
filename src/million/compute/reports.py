"""The shapes of what workers send a ``Computation``: requests for partitions, batches of
their outputs, and a session's inputs.

Part of the model (deterministic, no I/O): a handler ignores an event whole unless its
data has the shape these functions check, the same way on every replica.
"""

from __future__ import annotations

from typing import Any

from million.compute.votes import is_tally
from million.replica.state import INT64_MAX, is_json

__all__ = ["MAX_ERROR", "STEPS", "is_batch", "is_failure", "is_inputs", "is_request", "voted_value"]

MAX_FAILURE = 4096  # characters of a child's reason for failing
MAX_ERROR = 3000  # characters of a failed attempt's error (a hook's traceback, its end)
STEPS = {"prepare": "prepare_inputs", "collect": "collect_results"}  # a claimed step -> its hook


def is_request(data: Any) -> bool:
    """Whether ``data`` is ``{"id": n, "want": k}`` with whole numbers, ``n`` from 0 to
    2**63 - 1 (it is kept in the state)."""
    if type(data) is not dict:
        return False
    ident, want = data.get("id"), data.get("want")
    return type(ident) is int and 0 <= ident <= INT64_MAX and type(want) is int


def is_batch(data: Any, count: int, leaf: bool) -> bool:
    """Whether ``data`` is ``{"results": [report, ...], "next"?: request}`` with from one
    report to ``count``, each as ``is_report`` says for a session of ``count`` partitions."""
    if not (type(data) is dict and ("next" not in data or is_request(data["next"]))):
        return False
    reports = data.get("results")
    if type(reports) is not list or not 0 < len(reports) <= count:
        return False
    return all(is_report(report, count, leaf) for report in reports)


def is_report(data: Any, count: int, leaf: bool) -> bool:
    """Whether ``data`` is ``{"index": i, "output": o, "ms"?: n, "tally"?: t}``: ``i`` one
    of ``count`` partitions, ``o`` a value a model may keep, and a child's ``tally`` (or
    ``{"index": i, "failed": why}``) in an interior session."""
    if type(data) is not dict:
        return False
    index, ms = data.get("index"), data.get("ms", 0)
    if not (type(index) is int and 0 <= index < count and type(ms) is int and 0 <= ms < 2**40):
        return False
    if "failed" in data:
        failed, retryable = data["failed"], data.get("retryable", False)
        return not leaf and type(failed) is str and len(failed) <= MAX_FAILURE and type(retryable) is bool
    if not ("output" in data and is_json(data["output"])):
        return False
    return leaf or is_tally(data.get("tally"))


def is_failure(data: Any, count: int, leaf: bool) -> bool:
    """Whether ``data`` is a failed attempt: ``{"index": i, "error": text}`` at a leaf's
    partition ``i``, or ``{"step": "prepare" | "collect", "error": text}``."""
    if type(data) is not dict or len(data) != 2:
        return False
    error, index, step = data.get("error"), data.get("index"), data.get("step")
    if not (type(error) is str and len(error) <= MAX_ERROR):
        return False
    if "index" in data:
        return leaf and type(index) is int and 0 <= index < count
    return type(step) is str and step in STEPS


def is_inputs(data: Any, count: int) -> bool:
    """Whether ``data`` is ``{"inputs": [one per partition], "next"?: request}``."""
    if not (type(data) is dict and ("next" not in data or is_request(data["next"]))):
        return False
    inputs = data.get("inputs")
    return type(inputs) is list and len(inputs) == count and all(is_json(item) for item in inputs)


def voted_value(report: dict[str, Any]) -> Any:
    """The value a report votes for: a leaf's output; a child's output (its tally is
    counted apart: each identity works its own copy of a child), or its failure."""
    if "failed" in report:
        return {"failed": report["failed"], "retryable": report.get("retryable", False)}
    if "tally" in report:
        return {"output": report["output"]}
    return report["output"]
