"""Engine plugins (serving/engine/plugins.py): the modules CODECOMPLETE_ENGINE_PLUGINS names
are imported and installed on the engine, and a bad name stops with a message naming it."""

from __future__ import annotations

import pytest

from serving.engine.plugins import PLUGINS_ENV, install_plugins, plugin_names
from tests.support import engine_faults


def test_the_variable_names_modules_that_wrap_the_engine(engine, monkeypatch):
    monkeypatch.setenv(PLUGINS_ENV, f" {engine_faults.__name__} ,")
    monkeypatch.setenv(engine_faults.MARKER_ENV, "#plugged#")
    assert plugin_names() == [engine_faults.__name__]
    try:
        assert install_plugins(engine) == [engine_faults.__name__]
        with pytest.raises(Exception, match="injected test fault"):
            engine.complete("#plugged# x", max_new_tokens=4)
        assert engine.complete("x = ", max_new_tokens=4).completion_tokens >= 1
    finally:
        engine_faults.uninstall(engine)
    assert engine.complete("#plugged# x", max_new_tokens=4).completion_tokens >= 1  # uninstalled


def test_unset_installs_nothing_and_a_bad_plugin_is_named(engine, monkeypatch):
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    assert install_plugins(engine) == [] and "sample" not in vars(engine)
    with pytest.raises(RuntimeError, match="no_such_plugin_module"):
        install_plugins(engine, "no_such_plugin_module")
    with pytest.raises(RuntimeError, match="has no install"):
        install_plugins(engine, "json")
