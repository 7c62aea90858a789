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
from importlib.metadata import entry_points
from typing import Any

import attrs
import pluggy
import trio

from million.compute import hookspecs
from million.replica.state import MAX_DEPTH, is_json
from million.wire import codec

__all__ = ["Plugin", "PluginError", "Result", "installed_plugins", "load_plugin", "plugin_from_object"]

GROUP = "million"


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
        return (await self.compute_some([(input, index)], options, 0))[0][0]

    async def compute_some(
        self, items: list[tuple[Any, int]], options: dict[str, Any], seconds: float
    ) -> list[tuple[Result, int]]:
        """The outputs of the first of ``items`` (input, global index), in order, with the
        ms each took: at least one, and no more than are done within ``seconds``. A
        synchronous hook computes them in one worker thread: one hop for the lot."""
        hook, asynchronous = self._hooks.get("compute") or self._hook("compute")
        if not asynchronous:
            call = partial(self._compute_sync, hook, items, options, seconds)
            return await trio.to_thread.run_sync(call, abandon_on_cancel=True)
        batch = _Batch(seconds)
        for input, index in items:
            if not batch.add(self._encode(await hook(input=input, index=index, options=options), "compute")):
                break
        return batch.done

    def _compute_sync(
        self, hook: Callable[..., Any], items: list[tuple[Any, int]], options: dict[str, Any], seconds: float
    ) -> list[tuple[Result, int]]:
        batch = _Batch(seconds)
        for input, index in items:
            if not batch.add(self._encode(hook(input=input, index=index, options=options), "compute")):
                break
        return batch.done

    async def collect_results(self, outputs: list[Any], options: dict[str, Any]) -> Result:
        result = await self._call("collect_results", outputs=outputs, options=options)
        return self._encode(result, "collect_results")

    def log(self, record: dict[str, Any]) -> None:
        self.manager.hook.log(record=record)

    async def _call(self, hook_name: str, **kwargs: Any) -> Any:
        hook, asynchronous = self._hooks.get(hook_name) or self._hook(hook_name)
        if asynchronous:
            result = hook(**kwargs)
        else:  # synchronous code may be CPU-bound: keep it off the event loop
            result = await trio.to_thread.run_sync(_calling(hook, kwargs), abandon_on_cancel=True)
        if inspect.isawaitable(result):
            result = await result
        return result

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
    """Outputs computed in turn, each with the ms it took, within a time budget."""

    def __init__(self, seconds: float) -> None:
        self.done: list[tuple[Result, int]] = []
        self.deadline = (last := time.perf_counter()) + seconds
        self.last = last

    def add(self, output: Result) -> bool:
        """Count ``output``; whether there is time for another."""
        now = time.perf_counter()
        self.done.append((output, round((now - self.last) * 1000)))
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


def load_plugin(name: str) -> Plugin:
    """Load the plugin installed under entry point ``name``; PluginError if there is none."""
    found = list(entry_points(group=GROUP, name=name))
    if not found:
        installed = ", ".join(sorted(installed_plugins())) or "none"
        raise PluginError(f"no plugin named {name!r} is installed (installed: {installed})")
    entry = found[0]
    try:
        module = entry.load()
    except Exception as exc:
        raise PluginError(f"plugin {name!r} failed to load: {exc}") from exc
    return Plugin(name, entry.dist.version if entry.dist else "0", _manager(name, module))


def plugin_from_object(name: str, obj: object, version: str = "0") -> Plugin:
    """A plugin made from an object with hookimpls, without an entry point (tests, scripts)."""
    return Plugin(name, version, _manager(name, obj))
