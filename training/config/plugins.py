"""Plugins named in an environment variable: `pkg.module[:function][,other.module]`.

The one loader behind both plugin variables, CODECOMPLETE_TRAIN_PLUGINS (training/train/
plugins.py: every Ray Train worker's Trainer) and CODECOMPLETE_ENGINE_PLUGINS
(serving/engine/plugins.py: every replica's engine).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Optional

from training.config.fields import ConfigError

DEFAULT_FUNCTION = "install"


class PluginError(ConfigError, RuntimeError):
    """A named plugin cannot be imported or lacks its function. The message names both."""


def plugin_specs(env: str, value: Optional[str] = None) -> list[str]:
    """The entries of the variable `env` (or of `value`): comma-separated, blanks ignored."""
    raw = os.environ.get(env, "") if value is None else value
    return [spec.strip() for spec in raw.split(",") if spec.strip()]


def load_plugin(spec: str, env: str, kind: str, signature: str) -> tuple[Any, Callable[..., Any]]:
    """(module, function) of one entry; PluginError naming it if either is missing."""
    name, _, func = spec.partition(":")
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise PluginError(f"{env}: cannot import {kind} plugin {name!r}: {e}") from None
    fn = getattr(module, func or DEFAULT_FUNCTION, None)
    if not callable(fn):
        raise PluginError(f"{env}: {kind} plugin {spec!r} has no {func or DEFAULT_FUNCTION}{signature} function")
    return module, fn
