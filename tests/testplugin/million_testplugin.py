"""A plugin for million's tests, so that nothing is tested only with the demo.

- prepare: input i of a session is ``"<input>/<i>"``: every level leaves a trace.
- compute: ``"<input>@<global index>"``.
- collect: a digest of the outputs *in order*, so any reordering changes the answer.
- option ``slow``: global indexes whose computation creates ``<marker_dir>/<index>``
  and then waits (up to a minute) until ``<marker_dir>/go`` exists: a test can stop
  workers in the middle of a partition, then let the rest of the run go.
- option ``fail``: global indexes whose computation raises ``ValueError`` every time;
  ``flaky``: global indexes whose computation raises the first time in any process
  (it leaves ``<marker_dir>/flaky-<index>``) and then succeeds; ``broken``: global
  indexes whose computation raises until ``<marker_dir>/fixed`` exists.
- option ``fail_step``: ``"prepare"`` or ``"collect"``, a step that raises in every session.
- environment ``MILLION_TESTPLUGIN_LIE=N``: this process lies, returning ``"lie@<index>"``
  for every global index divisible by ``N`` (all liars lie alike: they collude).

``expected(...)`` computes the answer the same way without any network.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import million
from million.compute.tree import Spec

LIE = "MILLION_TESTPLUGIN_LIE"


@million.hookimpl
def prepare_inputs(input: Any, count: int, options: dict[str, Any]) -> list[Any]:
    if options.get("fail_step") == "prepare":
        raise RuntimeError("prepare refuses")
    return [f"{input}/{i}" for i in range(count)]


@million.hookimpl
def compute(input: Any, index: int, options: dict[str, Any]) -> Any:
    if index in options.get("fail", ()):
        raise ValueError(f"partition {index} cannot be computed")
    if index in options.get("broken", ()) and not (Path(options["marker_dir"]) / "fixed").exists():
        raise RuntimeError(f"partition {index} is broken until it is fixed")
    if index in options.get("flaky", ()):
        first = Path(options["marker_dir"]) / f"flaky-{index}"
        if not first.exists():
            first.touch()
            raise ConnectionError(f"partition {index} lost its connection, once")
    if index in options.get("slow", ()):
        markers = Path(options["marker_dir"])
        (markers / str(index)).touch()
        deadline = time.monotonic() + 60
        while not (markers / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    lie = int(os.environ.get(LIE, "0"))
    if lie and index % lie == 0:
        return f"lie@{index}"
    return f"{input}@{index}"


@million.hookimpl
def collect_results(outputs: list[Any], options: dict[str, Any]) -> Any:
    if options.get("fail_step") == "collect":
        raise RuntimeError("collect refuses")
    return hashlib.sha256(json.dumps(outputs).encode()).hexdigest()[:16]


def expected(input: Any, partitions: int, fanout: int) -> Any:
    """The answer a run must give, computed locally along the same tree."""
    return _expected(Spec("ordered", "", input, partitions, fanout))


def _expected(spec: Spec) -> Any:
    inputs = prepare_inputs(spec.input, spec.count, spec.options)
    if spec.leaf:
        outputs = [compute(inputs[i], spec.start + i, spec.options) for i in range(spec.count)]
    else:
        outputs = []
        for i in range(spec.count):
            _, options = spec.child("x", i, inputs[i])
            outputs.append(_expected(Spec.from_options(options)))
    return collect_results(outputs, spec.options)
