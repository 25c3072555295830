"""Quiet by default: only the known-harmless warnings are filtered, by their exact message."""

from __future__ import annotations

import os
import subprocess
import sys

from training import log_noise

WARN = """
import warnings
warnings.warn("`ExecutionOptions.exclude_resources` is deprecated and will be removed", DeprecationWarning)
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
warnings.warn("ExecutionOptions.exclude_resources is deprecated (no backticks: another message)", FutureWarning)
warnings.warn("a real problem", UserWarning)
"""


def child_stderr(env: dict[str, str]) -> str:
    # Not this process's PYTHONWARNINGS: a job run earlier in this process (run_job) may have set it.
    base = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, "-c", WARN], capture_output=True, text=True,
                          env={**base, **env}).stderr


def test_processes_of_a_quiet_job_drop_exactly_the_known_harmless_warnings(monkeypatch):
    loud = child_stderr({})
    assert "exclude_resources` is deprecated" in loud and "all_gather_into_tensor" in loud  # they do print

    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    saved = dict(os.environ)
    try:
        log_noise.configure(False)
        quiet_env = {"PYTHONWARNINGS": os.environ["PYTHONWARNINGS"]}
    finally:
        os.environ.clear()
        os.environ.update(saved)
        log_noise._state["verbose"] = True
    quiet = child_stderr(quiet_env)
    assert "`ExecutionOptions.exclude_resources` is deprecated" not in quiet
    assert "all_gather_into_tensor" not in quiet
    assert "no backticks: another message" in quiet  # a prefix match, not a word match
    assert "a real problem" in quiet


def test_verbose_filters_nothing():
    saved = dict(os.environ)
    try:
        os.environ.pop("PYTHONWARNINGS", None)
        log_noise.configure(True)
        assert "PYTHONWARNINGS" not in os.environ and log_noise.train_log_level() == "INFO"
    finally:
        os.environ.clear()
        os.environ.update(saved)
