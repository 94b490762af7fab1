"""A per-hook cache of the callables `AddonManager.trigger_event` runs.

mitmproxy dispatches every event by walking its whole addon chain: for each of its ~35 built-in
addons (and ours) it enters `safecall()`, creates an `invoke_addon` coroutine and walks the
addon's sub-addons with `getattr(addon, event.name)`, whether or not the addon has that hook.
A small proxied request fires ~12 events, so ~280 of those visits for ~22 real hook calls: about
as much CPU as the gateway's own work (see docs/upstream-dispatch-cache.md, where this is
proposed to mitmproxy). This patch replaces `AddonManager.trigger_event` with one that looks the
hook callables up once per hook name and keeps them until the chain changes.

Semantics kept (tests/unit/test_mitmcompat.py runs each against the original):
- callables run in the order mitmproxy would call them (chain order, each addon before its
  sub-addons, depth first); awaitable results are awaited;
- an exception in one top-level addon's tree is logged by mitmproxy's own `safecall` and skips
  the rest of that tree only, then dispatch continues with the next addon; `AddonHalt` stops the
  event for everyone; `OptionsError` propagates;
- a hook attribute that is a module is skipped, one that is not callable is logged as
  mitmproxy's `AddonManagerError` when its turn comes.

What the cache follows: the callables are looked up again after `add`, `register`, `remove` and
`clear` (adding, removing and reloading scripts all go through them) and after every synchronous
`trigger` (configure events: ScriptLoader reorders scripts there), and always for the lifecycle
events `load`, `running`, `configure` and `done`, which go to the original code. It does not see
an addon that assigns a different hook method to itself at run time, or that changes its
`addons` list outside those calls; no addon in mitmproxy or in the gateway does either (checked
by a contract test), and `invalidate(manager)` exists for one that would.

`SLUICEGATE_DISPATCH_CACHE=0` in the environment leaves mitmproxy's dispatch alone (to measure
the difference, or should an addon ever need mitmproxy's own lookups).

Internals touched: `AddonManager.trigger_event`, `.trigger`, `.register`, `.remove`, `.clear`,
`.chain`, `mitmproxy.addonmanager.traverse` and `safecall`, identical in 11.0.x and 12.x.
"""

from __future__ import annotations

import functools
import inspect
import os
import types
from collections.abc import Callable, Sequence
from typing import Any, Final

from mitmproxy import addonmanager, exceptions, hooks

from sluicegate import mitmcompat

_CACHE: Final = "_sluicegate_dispatch"
_MARK: Final = "_sluicegate_dispatch_cached"
# Events dispatched by mitmproxy's own code, uncached: the chain changes around them.
UNCACHED: Final = frozenset({"load", "running", "configure", "done"})

Groups = tuple[tuple[Callable[..., Any], ...], ...]


def _not_callable(addon: Any, name: str) -> Callable[..., Any]:
    """Stands for a hook attribute that is not callable: raises what mitmproxy raises."""

    def raise_error(*_: Any) -> None:
        raise exceptions.AddonManagerError(f"Addon handler {name} ({addon}) not callable")

    return raise_error


def lookup(chain: Sequence[Any], name: str) -> Groups:
    """Per top-level addon with a `name` hook in its tree: its callables, in mitmproxy's order
    (as `AddonManager._iter_hooks` finds them)."""
    groups = []
    for top in chain:
        funcs: list[Callable[..., Any]] = []
        for addon in addonmanager.traverse([top]):
            func = getattr(addon, name, None)
            if not func or isinstance(func, types.ModuleType):
                continue
            funcs.append(func if callable(func) else _not_callable(addon, name))
        if funcs:
            groups.append(tuple(funcs))
    return tuple(groups)


def invalidate(manager: Any) -> None:
    """Forget `manager`'s cached callables (the next event looks them up again)."""
    manager.__dict__.pop(_CACHE, None)


def _groups(manager: Any, name: str) -> Groups:
    cache: dict[str, Groups] | None = manager.__dict__.get(_CACHE)
    if cache is None:
        cache = manager.__dict__[_CACHE] = {}
    groups = cache.get(name)
    if groups is None:
        groups = cache[name] = lookup(manager.chain, name)
    return groups


def _cached_trigger_event(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def trigger_event(self: Any, event: hooks.Hook) -> None:
        name = event.name
        if name in UNCACHED:
            await original(self, event)
            return
        groups = _groups(self, name)
        args = event.args()
        for funcs in groups:
            try:
                with addonmanager.safecall():
                    for func in funcs:
                        result = func(*args)
                        if result is not None and inspect.isawaitable(result):
                            await result
            except exceptions.AddonHalt:
                return

    setattr(trigger_event, _MARK, True)
    return trigger_event


def _invalidating(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        invalidate(self)
        try:
            return method(self, *args, **kwargs)
        finally:
            invalidate(self)

    setattr(wrapper, _MARK, True)
    return wrapper


PATCHED: Final = ("add", "register", "remove", "clear", "trigger")
# The originals, for the contract tests to compare against.
ORIGINALS: dict[str, Callable[..., Any]] = {}


def enabled() -> bool:
    """Whether the environment allows the cache (`SLUICEGATE_DISPATCH_CACHE=0` does not)."""
    return os.environ.get("SLUICEGATE_DISPATCH_CACHE", "1") != "0"


def installed() -> bool:
    return bool(getattr(addonmanager.AddonManager.trigger_event, _MARK, False))


def install() -> None:
    """Cache hook lookups on every AddonManager from now on (idempotent)."""
    mitmcompat.require("dispatch_cache")
    cls = addonmanager.AddonManager
    if installed() or not enabled():
        return
    for name in (*PATCHED, "trigger_event"):
        ORIGINALS[name] = getattr(cls, name)
    for name in PATCHED:
        setattr(cls, name, _invalidating(getattr(cls, name)))
    cls.trigger_event = _cached_trigger_event(cls.trigger_event)  # type: ignore[method-assign]
