"""Training plugins: modules named in an environment variable that may add to each worker's Trainer.

    CODECOMPLETE_TRAIN_PLUGINS=pkg.module[:function][,other.module]

The driver (training/train/job.py) reads the variable when the run starts and imports each
module there first, so a plugin that cannot be imported, or lacks its function, fails the
run at once with an error naming it (exit 2), before any worker starts. The names then
travel to the Ray Train workers with the loop config (under `ray job submit` the workers
do not see the driver's environment), and every worker imports the modules and calls
`function(trainer, context)` (`install` unless named) once its Hugging Face Trainer is
built, before training starts. A plugin may add callbacks (`trainer.add_callback`), wrap
the trainer's methods (`compute_loss`, ...) or its training stream (`train_dataset`): to
trace or record what a rank does, or to make one rank fail and see the run recover
(tests/support/train_faults.py). Unset, nothing is imported.

A plugin's own settings are environment variables too; it lists their names in a module
attribute `ENV_VARS`, and the driver hands their values to the workers as `context.env`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from training.config.plugins import load_plugin, plugin_specs as _specs

PLUGINS_ENV = "CODECOMPLETE_TRAIN_PLUGINS"


@dataclass
class PluginContext:
    """What a plugin is told about the worker it runs in."""

    rank: int
    world: int
    output: str
    """The run folder (OUTPUT/)."""
    env: dict[str, str] = field(default_factory=dict)
    """The driver's values of the variables the plugins list in ENV_VARS."""
    sink: Any = None
    """The metrics sink actor: `emit` adds an event to OUTPUT/metrics.jsonl."""

    def emit(self, event: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.log.remote(event)


def plugin_specs(value: Optional[str] = None) -> list[str]:
    """The entries of the variable (comma-separated; blanks ignored)."""
    return _specs(PLUGINS_ENV, value)


def load(spec: str) -> tuple[Any, Callable[..., Any]]:
    """(module, function) of one entry; a ConfigError naming it if either is missing."""
    return load_plugin(spec, PLUGINS_ENV, "training", "(trainer, context)")


def driver_settings(value: Optional[str] = None) -> dict[str, Any]:
    """On the driver: check every plugin loads; the specs and the env values they asked for."""
    specs = plugin_specs(value)
    env: dict[str, str] = {}
    for spec in specs:
        module, _ = load(spec)
        for var in getattr(module, "ENV_VARS", ()):
            if var in os.environ:
                env[var] = os.environ[var]
    if specs:
        print(f"[job] training plugins: {', '.join(specs)}", flush=True)
    return {"specs": specs, "env": env}


def install_plugins(trainer: Any, settings: Optional[dict[str, Any]], context: PluginContext) -> Any:
    """In a worker: call every plugin on the trainer; a plugin may return a replacement."""
    if not settings:
        return trainer
    context.env = dict(settings.get("env", {}))
    for spec in settings.get("specs", []):
        _, fn = load(spec)
        trainer = fn(trainer, context) or trainer
    return trainer
