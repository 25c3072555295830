"""Training plugins (training/train/plugins.py): named by one variable, checked on the driver,
installed on every worker's Trainer. The e2e tests in tests/e2e/test_job.py use them for faults."""

from __future__ import annotations

import pytest

from training.config import ConfigError
from training.train.plugins import PLUGINS_ENV, PluginContext, driver_settings, install_plugins, plugin_specs


class FakeTrainer:
    def __init__(self):
        self.callbacks = []
        self.train_dataset = None

    def add_callback(self, cb):
        self.callbacks.append(cb)

    def compute_loss(self, model, inputs, *a, **kw):
        return 2.0


def test_unset_installs_nothing(monkeypatch):
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    assert plugin_specs() == []
    trainer = FakeTrainer()
    assert install_plugins(trainer, driver_settings(), PluginContext(0, 1, "out")) is trainer


def test_a_plugin_that_does_not_load_fails_on_the_driver_naming_it():
    with pytest.raises(ConfigError, match=f"{PLUGINS_ENV}: cannot import training plugin 'no.such.module'"):
        driver_settings("no.such.module")
    with pytest.raises(ConfigError, match="has no missing"):
        driver_settings("tests.support.train_faults:missing")


def test_the_driver_hands_the_plugins_settings_to_the_workers(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAIN_FAULT_SKIP_REDUCE_RANK", "0")
    monkeypatch.setenv("TRAIN_FAULT_UNRELATED", "x")
    settings = driver_settings(" tests.support.train_faults:skip_reduce , tests.support.train_faults:kill_worker")
    assert settings["specs"] == ["tests.support.train_faults:skip_reduce", "tests.support.train_faults:kill_worker"]
    assert settings["env"] == {"TRAIN_FAULT_SKIP_REDUCE_RANK": "0"}
    monkeypatch.delenv("TRAIN_FAULT_SKIP_REDUCE_RANK")  # the worker reads the driver's value, not its own
    trainer = FakeTrainer()
    install_plugins(trainer, settings, PluginContext(rank=0, world=1, output=str(tmp_path)))
    assert trainer.compute_loss(None, {}) == 0.0  # rank 0's loss is zeroed
    assert len(trainer.callbacks) == 1  # the last rank (0 of 1) got the kill callback
    other = FakeTrainer()
    install_plugins(other, settings, PluginContext(rank=1, world=2, output=str(tmp_path)))
    assert other.compute_loss(None, {}) == 2.0 and len(other.callbacks) == 1
