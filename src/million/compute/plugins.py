"""Finding a plugin by name and calling its hooks.

``load_plugin("demo")`` loads exactly the entry point ``demo`` of the group
``million`` into its own pluggy manager. ``Plugin`` calls the hooks the way the
computation needs them: awaited, off the event loop when synchronous, with their
results checked.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from functools import partial
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

import attrs
import pluggy
import trio

from million.compute import hookspecs
from million.replica.state import MAX_DEPTH, is_json
from million.wire import codec

__all__ = ["Plugin", "PluginError", "Result", "installed_plugins", "load_plugin", "plugin_from_object"]

GROUP = "million"
T = TypeVar("T")


class PluginError(Exception):
    """A plugin is missing, of another version, or broke its contract."""


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
        #: Synchronous hooks running at once, in worker threads: one per bot of the process
        #: (``crew``), else trio's default limit.
        self.threads: trio.CapacityLimiter | None = None

    def __repr__(self) -> str:
        return f"<plugin {self.name} {self.version}>"

    async def prepare_inputs(self, input: Any, count: int, options: dict[str, Any]) -> Result:
        inputs = await self._call("prepare_inputs", input=input, count=count, options=options)
        if not isinstance(inputs, list) or len(inputs) != count:
            got = f"a list of {len(inputs)}" if isinstance(inputs, list) else type(inputs).__name__
            raise PluginError(
                f"plugin {self.name}: prepare_inputs must return a list of {count} inputs, not {got}"
            )
        return self._encode(inputs, "prepare_inputs", each=True)

    async def compute(self, input: Any, index: int, options: dict[str, Any]) -> Result:
        outputs, _ = await self.compute_some([(input, index)], options, 0)
        return Result.of(outputs[0])

    async def compute_some(
        self, items: list[tuple[Any, int]], options: dict[str, Any], seconds: float
    ) -> tuple[list[Any], list[int]]:
        """The outputs of the first of ``items`` (input, global index), in order, and the
        ms each took: at least one, and no more than are done within ``seconds``; checked
        as ``_encode`` checks values, all at once. A synchronous hook computes them in one
        go (``_sync``): one thread hop for the lot."""
        hook, asynchronous = self._hooks.get("compute") or self._hook("compute")
        if not asynchronous:
            batch = await self._sync(partial(self._compute_sync, hook, items, options, seconds))
        else:
            batch = _Batch(seconds)
            for input, index in items:
                if not batch.add(await hook(input=input, index=index, options=options)):
                    break
        self._encode(batch.outputs, "compute", each=True)  # checked whole, sent in the event
        return batch.outputs, batch.ms

    def _compute_sync(
        self, hook: Callable[..., Any], items: list[tuple[Any, int]], options: dict[str, Any], seconds: float
    ) -> _Batch:
        batch = _Batch(seconds)
        for input, index in items:
            if not batch.add(hook(input=input, index=index, options=options)):
                break
        return batch

    async def collect_results(self, outputs: list[Any], options: dict[str, Any]) -> Result:
        result = await self._call("collect_results", outputs=outputs, options=options)
        return self._encode(result, "collect_results")

    def log(self, record: dict[str, Any]) -> None:
        self.manager.hook.log(record=record)

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
        """``value`` encoded once; ``PluginError`` unless the model can keep it (``is_json``,
        of each item with ``each``): models ignore what they cannot keep."""
        try:
            result = Result.of(value)
        except TypeError as exc:
            raise PluginError(
                f"plugin {self.name}: {hook_name} returned a value that is not JSON: {exc}"
            ) from None
        if not all(map(is_json, value if each else [value])):
            raise PluginError(
                f"plugin {self.name}: {hook_name} returned a value nested deeper than {MAX_DEPTH} levels,"
                " or with an integer beyond 64 bits or a float that is not finite"
            )
        return result


class _Batch:
    """Outputs computed in turn, and the ms each took, within a time budget."""

    def __init__(self, seconds: float) -> None:
        self.outputs: list[Any] = []
        self.ms: list[int] = []
        self.deadline = (last := time.perf_counter()) + seconds
        self.last = last

    def add(self, output: Any) -> bool:
        """Count ``output``; whether there is time for another."""
        now = time.perf_counter()
        self.outputs.append(output)
        self.ms.append(round((now - self.last) * 1000))
        self.last = now
        return now < self.deadline


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
