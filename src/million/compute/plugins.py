"""Finding a plugin by name and calling its hooks.

``load_plugin("demo")`` loads exactly the entry point ``demo`` of the group
``million`` into its own pluggy manager. ``Plugin`` calls the hooks the way the
computation needs them: awaited, off the event loop when synchronous, with their
results checked.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
import traceback
from collections.abc import Callable
from functools import partial
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pluggy
import trio

from million.compute import hookspecs
from million.compute.reports import MAX_ERROR
from million.replica.state import MAX_DEPTH, is_json
from million.wire import codec

__all__ = [
    "Batch",
    "HookFailed",
    "Plugin",
    "PluginError",
    "Result",
    "find_plugins",
    "installed_plugins",
    "load_plugin",
    "plugin_from_object",
]

GROUP = "million"
T = TypeVar("T")
log = logging.getLogger(__name__)


class PluginError(Exception):
    """A plugin is missing, of another version, or refuses a run's options."""


class HookFailed(Exception):
    """A hook raised, or returned what the computation cannot use: ``error`` says how,
    with the end of the traceback, in at most ``MAX_ERROR`` characters."""

    def __init__(self, hook: str, error: str) -> None:
        super().__init__(f"{hook}: {error}")
        self.hook = hook
        self.error = error


@attrs.frozen
class Result:
    """A value a hook returned, encoded once as JSON: it is sent as these bytes and
    decoded only where it is read."""

    raw: bytes

    @classmethod
    def of(cls, value: Any) -> Result:
        """``value`` encoded; ``TypeError`` if it is not JSON."""
        return cls(codec.compact(codec.dumps(value)))

    def embed(self) -> Any:
        """The encoded value, to put as it is inside a value being encoded (an event)."""
        return codec.fragment(self.raw)

    def value(self) -> Any:
        return codec.loads(self.raw)


class Plugin:
    """A named, versioned plugin and its pluggy manager."""

    def __init__(self, name: str, version: str, manager: pluggy.PluginManager) -> None:
        self.name = name
        self.version = version
        self.manager = manager
        self._hooks: dict[str, tuple[Callable[..., Any], bool]] = {}  # name -> (hook, all async)
        #: Synchronous hooks running at once, in worker threads: as many as bots call them
        #: (``crew``), else trio's default limit.
        self.threads: trio.CapacityLimiter | None = None

    def __repr__(self) -> str:
        return f"<plugin {self.name} {self.version}>"

    async def check_options(self, input: Any, options: dict[str, Any]) -> None:
        """``PluginError`` saying why, if the plugin refuses this input or these options
        (its ``check_options`` hook raised ``ValueError`` or ``TypeError``)."""
        if not self.manager.hook.check_options.get_hookimpls():
            return
        try:
            await self._call("check_options", input=input, options=options)
        except (ValueError, TypeError) as exc:
            raise PluginError(f"plugin {self.name} refuses the run: {exc}") from None
        except Exception as exc:
            raise PluginError(f"plugin {self.name}: check_options raised {_last_line(exc)}") from None

    async def prepare_inputs(self, input: Any, count: int, options: dict[str, Any]) -> Result:
        """The prepared inputs; ``HookFailed`` if the hook raised or returned something else
        than a list of ``count`` JSON values."""
        hook = "prepare_inputs"
        inputs = await self._guarded(hook, input=input, count=count, options=options)
        if not isinstance(inputs, list) or len(inputs) != count:
            got = f"a list of {len(inputs)}" if isinstance(inputs, list) else type(inputs).__name__
            raise HookFailed(hook, f"plugin {self.name}: it must return a list of {count} inputs, not {got}")
        return self._encode(inputs, hook, each=True)

    async def compute(self, input: Any, index: int, options: dict[str, Any]) -> Result:
        batch = await self.compute_some([(input, index)], options, Batch(0))
        if batch.error is not None:
            raise HookFailed("compute", batch.error)
        return Result.of(batch.outputs[0])

    async def compute_some(
        self, items: list[tuple[Any, int]], options: dict[str, Any], batch: Batch
    ) -> Batch:
        """``batch``, holding the outputs of the first of ``items`` (input, global index), in
        order, and the ms each took: no more than are done by its deadline, and at least one
        unless the first fails. If an item fails (its hook raised, or returned what
        ``_encode`` refuses), the batch ends before it with its ``error``. A synchronous
        hook computes the lot in one thread hop (``_sync``); meanwhile ``batch.outputs``
        grows as they are done."""
        hook, asynchronous = self._hooks.get("compute") or self._hook("compute")
        if not asynchronous:
            await self._sync(partial(_compute_sync, hook, items, options, batch))
        else:
            for input, index in items:
                try:
                    output = await hook(input=input, index=index, options=options)
                except Exception as exc:
                    batch.error = describe(exc)
                    break
                if not batch.add(output):
                    break
        self._check_outputs(batch)
        return batch

    def _check_outputs(self, batch: Batch) -> None:
        """Cut ``batch`` at its first output that ``_encode`` refuses, which becomes its error."""
        try:
            self._encode(batch.outputs, "compute", each=True)  # the common case: all at once
        except HookFailed:
            for position, output in enumerate(batch.outputs):
                try:
                    self._encode(output, "compute")
                except HookFailed as exc:
                    batch.cut(position, exc.error)
                    return

    async def collect_results(self, outputs: list[Any], options: dict[str, Any]) -> Result:
        """The collected output; ``HookFailed`` if the hook raised or returned no JSON value."""
        result = await self._guarded("collect_results", outputs=outputs, options=options)
        return self._encode(result, "collect_results")

    def log(self, record: dict[str, Any]) -> None:
        """Tell the plugin's ``log`` hooks; one that raises is logged, not raised."""
        try:
            self.manager.hook.log(record=record)
        except Exception as exc:
            log.warning("plugin %s: log raised %s", self.name, _last_line(exc))

    async def _guarded(self, hook_name: str, **kwargs: Any) -> Any:
        """``_call``, with what the hook raises as ``HookFailed`` (a hook the plugin lacks
        is its ``PluginError``)."""
        if hook_name not in self._hooks:
            self._hook(hook_name)
        try:
            return await self._call(hook_name, **kwargs)
        except Exception as exc:
            raise HookFailed(hook_name, describe(exc)) from exc

    async def _call(self, hook_name: str, **kwargs: Any) -> Any:
        hook, asynchronous = self._hooks.get(hook_name) or self._hook(hook_name)
        if asynchronous:
            result = hook(**kwargs)
        else:
            result = await self._sync(_calling(hook, kwargs))
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _sync(self, call: Callable[[], T]) -> T:
        """``call()`` of a synchronous hook, in a worker thread: synchronous code may be
        CPU-bound, and even a hook that is quick as a rule must not stall the event loop
        (the connection's heartbeat, the other bots) the one time it is not."""
        return await trio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=self.threads)

    def _hook(self, hook_name: str) -> tuple[Callable[..., Any], bool]:
        hook = getattr(self.manager.hook, hook_name)
        impls = hook.get_hookimpls()
        if not impls:
            raise PluginError(f"plugin {self.name} does not implement {hook_name}")
        asynchronous = all(inspect.iscoroutinefunction(impl.function) for impl in impls)
        lone = len(impls) == 1 and not (impls[0].hookwrapper or impls[0].wrapper)
        self._hooks[hook_name] = found = (_direct(impls[0]) if lone else hook, asynchronous)
        return found

    def _encode(self, value: Any, hook_name: str, each: bool = False) -> Result:
        """``value`` encoded once; ``HookFailed`` unless the model can keep it (``is_json``,
        of each item with ``each``): models ignore what they cannot keep."""
        try:
            result = Result.of(value)
        except TypeError as exc:
            raise HookFailed(
                hook_name, f"plugin {self.name}: it returned a value that is not JSON: {exc}"
            ) from None
        if not all(map(is_json, value if each else [value])):
            raise HookFailed(
                hook_name,
                f"plugin {self.name}: it returned a value nested deeper than {MAX_DEPTH} levels,"
                " or with an integer beyond 64 bits or a float that is not finite",
            )
        return result


class Batch:
    """Outputs computed in turn, and the ms each took, within a time budget; and the
    ``error`` of the item after them, if it failed."""

    def __init__(self, seconds: float) -> None:
        self.outputs: list[Any] = []
        self.ms: list[int] = []
        self.error: str | None = None
        self.deadline = (last := time.perf_counter()) + seconds
        self.last = last

    @classmethod
    def of(cls, outputs: list[Any], ms: list[int]) -> Batch:
        """A batch of outputs computed before."""
        batch = cls(0)
        batch.outputs, batch.ms = outputs, ms
        return batch

    def cut(self, position: int, error: str) -> None:
        """The batch ends before output ``position``, which failed with ``error``."""
        del self.outputs[position:], self.ms[position:]
        self.error = error

    def add(self, output: Any) -> bool:
        """Count ``output``; whether there is time for another."""
        now = time.perf_counter()
        self.outputs.append(output)
        self.ms.append(round((now - self.last) * 1000))
        self.last = now
        return now < self.deadline


def _compute_sync(
    hook: Callable[..., Any], items: list[tuple[Any, int]], options: dict[str, Any], batch: Batch
) -> None:
    for input, index in items:
        try:
            output = hook(input=input, index=index, options=options)
        except Exception as exc:
            batch.error = describe(exc)
            break
        if not batch.add(output):
            break


def describe(exc: BaseException) -> str:
    """A hook's exception as a worker reports it: the traceback from the plugin's code on
    (million's own frames left out), ending with the exception, in at most ``MAX_ERROR``
    characters (the end kept)."""
    trace = traceback.TracebackException.from_exception(exc, limit=-20)
    trace.stack = traceback.StackSummary.from_list([f for f in trace.stack if not _ours(f.filename)])
    text = "".join(trace.format()).rstrip()
    return text if len(text) <= MAX_ERROR else "…" + text[-(MAX_ERROR - 1) :]


def _ours(filename: str) -> bool:
    """Whether a frame is million's, or of the libraries through which it calls hooks."""
    return filename.startswith(_PACKAGE) or any(f"{os.sep}{name}{os.sep}" in filename for name in _CALLERS)


def _last_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(exc)).strip()


_CALLERS = ("trio", "outcome", "pluggy")
_PACKAGE = str(Path(__file__).resolve().parent.parent) + os.sep  # million's own modules


def _direct(impl: pluggy.HookImpl) -> Callable[..., Any]:
    """A lone implementation called as pluggy calls it (with the arguments it names),
    without pluggy's dispatch, which costs more than a small partition's computation."""
    function, names = impl.function, impl.argnames
    return lambda **kwargs: function(*[kwargs[name] for name in names])


def _calling(hook: Callable[..., Any], kwargs: dict[str, Any]) -> Callable[[], Any]:
    return lambda: hook(**kwargs)


def _manager(name: str, module: object) -> pluggy.PluginManager:
    manager = pluggy.PluginManager("million")
    manager.add_hookspecs(hookspecs)
    manager.register(module, name)
    return manager


def installed_plugins() -> dict[str, str]:
    """Names of the installed plugins and their distributions' versions."""
    return {ep.name: ep.dist.version if ep.dist else "0" for ep in entry_points(group=GROUP)}


_found: dict[str, EntryPoint] = {}  # entry point name -> the entry point


def find_plugins() -> None:
    """Note where each installed plugin is, once per process, as ``load_plugin`` would on
    first loading it: then no run waits while every distribution's metadata is read."""
    if not _found:
        for entry in entry_points(group=GROUP):
            _found.setdefault(entry.name, entry)


def load_plugin(name: str) -> Plugin:
    """Load the plugin installed under entry point ``name``; PluginError if there is none.
    An entry point found once is remembered: reading every distribution's metadata takes
    longer than starting a run's bots."""
    entry = _found.get(name)
    if entry is None:
        found = list(entry_points(group=GROUP, name=name))
        if not found:
            installed = ", ".join(sorted(installed_plugins())) or "none"
            raise PluginError(f"no plugin named {name!r} is installed (installed: {installed})")
        entry = _found[name] = found[0]
    try:
        module = entry.load()
    except Exception as exc:
        raise PluginError(f"plugin {name!r} failed to load: {exc}") from exc
    return Plugin(name, entry.dist.version if entry.dist else "0", _manager(name, module))


def plugin_from_object(name: str, obj: object, version: str = "0") -> Plugin:
    """A plugin made from an object with hookimpls, without an entry point (tests, scripts)."""
    return Plugin(name, version, _manager(name, obj))
