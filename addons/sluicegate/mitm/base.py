"""What every sluicegate addon shares: the config option, and refusing traffic without a config.

Each addon declares the same `sluicegate_config` option (mitmproxy accepts identical
declarations), so any addon also works on its own with `mitmdump -s`. The file is parsed once per
version (`config.load_cached`) however many addons ask for it.
"""

from __future__ import annotations

import logging
from collections.abc import Set
from typing import Any

from mitmproxy import ctx

from sluicegate import config as config_mod
from sluicegate.mitm import guard

logger = logging.getLogger("sluicegate")

OPTION = "sluicegate_config"
OPTION_HELP = "Path of the sluicegate YAML config file (required)."

_reported: set[tuple[str, str]] = set()


def _report_once(key: str, message: str) -> None:
    """Log a config problem at error level once, not once per addon.

    At start-up, mitmdump exits non-zero when an error is logged, which is what we want for a bad
    config; at run time the addons stay loaded but refuse all traffic until the config is fixed.
    """
    if (key, message) not in _reported:
        _reported.add((key, message))
        logger.error("sluicegate: %s", message)


def current_config() -> config_mod.Config | None:
    """The config named by the `sluicegate_config` option, or None (problems logged) if invalid."""
    path = ctx.options.sluicegate_config
    if not path:
        _report_once("", f"no config: pass --set {OPTION}=PATH (see README, 'Configuration')")
        return None
    try:
        return config_mod.load_cached(path)
    except config_mod.ConfigError as e:
        for problem in e.problems:
            _report_once(path, f"config error: {problem}")
        return None


class GatewayAddon:
    """Base class: declares the shared option, tracks liveness, (re)builds state from the config.

    Subclasses implement `apply(config)`, which builds their runtime objects and may raise (the
    addon then stays unconfigured). Hooks wrapped with `guard.fail_closed` refuse every flow while
    `self.config` is None.
    """

    config: config_mod.Config | None = None

    def load(self, loader: Any) -> None:
        loader.add_option(OPTION, str, "", OPTION_HELP)
        guard.register_live(self)
        guard.ChainSentinel.install()

    def configure(self, updated: Set[str]) -> None:
        if OPTION not in updated and self.config is not None:
            return
        new = current_config()
        if new is None:
            self.config = None
            return
        if new is self.config:
            return
        try:
            self.apply(new)
        except Exception as e:
            self.config = None
            _report_once(
                type(self).__name__,
                f"{type(self).__name__} cannot start: {type(e).__name__}: {_safe(e)}",
            )
            return
        self.config = new

    def done(self) -> None:
        guard.unregister_live(self)

    def apply(self, config: config_mod.Config) -> None:
        """Build this addon's runtime state from a validated config."""


def _safe(e: Exception) -> str:
    """Exception text for start-up errors: these come from config and files, not traffic."""
    text = str(e)
    return text if len(text) < 500 else text[:500] + "..."
