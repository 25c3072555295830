"""Library noise off by default, all of it back with `--verbose` (`JobConfig.verbose`).

The job's own lines (`data:`, `[job]`, `[train]`) are what a user reads. Left alone, the
libraries under it print several hundred more on the tiny job; most say nothing about the
run. What is turned off here, and why each is safe:

- Ray Data's INFO lines (execution plans, "Starting execution", the every-10-s progress
  report where output is not a terminal, the training streams' tqdm bars from their
  coordinator actors): the data stage prints its own summary line and the stall watchdog
  reports a stage that stops. Ray Data's WARNING and ERROR lines still print; on a terminal
  the data stage's bars stay, redrawn in place.
- Ray Train's INFO lines (worker-group start, "Reporting training result", checkpoint paths):
  `RunConfig(logging_config=LoggingConfig("WARNING"))`, Ray Train's own switch, and the one
  module whose logger escapes it.
- Hugging Face's progress bars for writing and loading weights, and the `print`s of
  DeepSpeed's `zero_to_fp32` while the model is exported (`export_output`).
- Python warnings known to be harmless, by the exact start of their message
  (`HARMLESS_WARNINGS`, each with its reason). Every other warning still prints.

Some noise is fixed at its cause instead, whatever `verbose` says: the local cluster runs the
dashboard (Ray Train's `PlacementGroupCleaner` asks the State API, which lives there, about
the controller every second; without it every query failed with a warning: hundreds of lines,
and a cleaner that could never clean), DeepSpeed's accelerator is named on CPU workers
(`DS_ACCELERATOR=cpu`) rather than guessed with a warning, and the model's loss type is set.

On a cluster the job joins (`ray job submit`), the settings reach the job's own processes
(driver and training workers); Ray's daemons and Ray Data's actors log as that cluster was
started.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from typing import Iterator

# (start of the message, why it is harmless). Matched by prefix, category Warning.
HARMLESS_WARNINGS: tuple[tuple[str, str], ...] = (
    ("`ExecutionOptions.exclude_resources` is deprecated",
     "set by Ray Train's own DatasetManager (Ray 2.60), not by this project"),
    ("`torch.distributed.all_gather_into_tensor` is deprecated",
     "called by DeepSpeed's ZeRO-2 optimizer (DeepSpeed 0.19)"),
)

_state = {"verbose": True}  # until configure() runs: nothing is hidden by a bare import


def verbose() -> bool:
    return _state["verbose"]


def warnings_option() -> str:
    """The filters as PYTHONWARNINGS entries, for processes started by the local cluster."""
    return ",".join(f"ignore:{msg}:Warning" for msg, _ in HARMLESS_WARNINGS)


def filter_warnings() -> None:
    for msg, _ in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(msg), category=Warning)


def configure(verbose_: bool) -> None:
    """Set this process (and a local cluster it will start) quiet or verbose. Call before Ray
    starts; idempotent."""
    _state["verbose"] = bool(verbose_)
    if verbose_:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every worker's line, not "[repeated 2x]"
        return
    filter_warnings()
    if warnings_option() not in os.environ.get("PYTHONWARNINGS", ""):
        os.environ["PYTHONWARNINGS"] = ",".join(x for x in (os.environ.get("PYTHONWARNINGS"), warnings_option()) if x)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def quiet_data_context() -> None:
    """Ray Data's progress reports at INFO, which the level set above silences: in the
    training streams' coordinator actors (not a terminal) through the logging reporter
    instead of tqdm bars. On a terminal the data stage keeps its bars, redrawn in place.
    No-op when verbose. (Disabling the bars instead makes Ray Data warn that they are.)"""
    if verbose():
        return
    from ray.data import DataContext

    DataContext.get_current().use_ray_tqdm = False


def train_log_level() -> str:
    """Ray Train's console level (RunConfig.logging_config)."""
    return "INFO" if verbose() else "WARNING"


def worker_setup(verbose_: bool, use_gpu: bool) -> None:
    """In each training worker, before DeepSpeed is imported."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # named, not guessed with a warning
    configure(verbose_)
    if verbose_:
        return
    try:  # Ray 2.60 names this module's logger by its file path, outside `ray.train`'s level
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)  # "Reporting training result N: ..." per rank
    except (ImportError, AttributeError):
        pass


@contextlib.contextmanager
def export_output() -> Iterator[None]:
    """DeepSpeed's zero_to_fp32 prints what it loads; kept only when verbose."""
    if verbose():
        yield
        return
    buf = io.StringIO()
    # The export reads the ZeRO shards on the driver's CPU: name DeepSpeed's accelerator there
    # rather than let it guess with a warning (a driver with CUDA detects it silently).
    named = "DS_ACCELERATOR" not in os.environ and not _has_cuda()
    if named:
        os.environ["DS_ACCELERATOR"] = "cpu"
    patched = _quiet_zero_to_fp32_bar()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    except BaseException:
        sys.stderr.write(buf.getvalue())  # a failed export shows everything it printed
        raise
    finally:
        if patched is not None:
            patched[0].tqdm = patched[1]
        if named:
            os.environ.pop("DS_ACCELERATOR", None)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _quiet_zero_to_fp32_bar():
    """zero_to_fp32's own tqdm bar ("Loading checkpoint shards"), off; (module, original)."""
    try:
        import functools

        from deepspeed.utils import zero_to_fp32
    except ImportError:
        return None
    original = zero_to_fp32.tqdm
    zero_to_fp32.tqdm = functools.partial(original, disable=True)
    return zero_to_fp32, original
