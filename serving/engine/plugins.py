"""Engine plugins: modules named in an environment variable that may wrap an Engine's steps.

    CODECOMPLETE_ENGINE_PLUGINS=pkg.module[,other.module]

Each module is imported when a replica (serving/deployment/replica.py) has loaded its engine, and its
`install(engine)` is called once, before the engine serves anything. A plugin may replace
the engine's `prefill`, `forward` or `sample` attributes (the calls the decode loop makes,
serving/engine/scheduler.py) with wrappers around them: to trace or time them, to check
their results, or to make them fail for a chosen request and see that it fails alone
(what the service's own tests do). Unset, nothing is imported. A plugin that cannot be
imported, or lacks `install`, stops the replica with an error naming it.
"""

from __future__ import annotations

from typing import Any

from training.config.plugins import load_plugin, plugin_specs

PLUGINS_ENV = "CODECOMPLETE_ENGINE_PLUGINS"


def plugin_names(value: str | None = None) -> list[str]:
    """The module names in the variable (comma-separated; blanks ignored)."""
    return plugin_specs(PLUGINS_ENV, value)


def install_plugins(engine: Any, value: str | None = None) -> list[str]:
    """Import each plugin named in PLUGINS_ENV (or `value`) and install it on the engine;
    returns their names."""
    names = plugin_names(value)
    for name in names:
        _, install = load_plugin(name, PLUGINS_ENV, "engine", "(engine)")
        install(engine)
    return names
