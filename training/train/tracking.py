"""Experiment tracking (`--report-to tensorboard|mlflow|none`) through the HF Trainer's own integrations.

The driver decides where the run's logs go (`settings`); rank 0 alone attaches Hugging Face's
`TensorBoardCallback` or `MLflowCallback` (`callback`). Only rank 0: on CPU workers accelerate
believes every rank is "process 0 of 1", so HF's own `report_to` would make every rank write.
The callback sees the logs after RankAwareTrainer averaged the losses over ranks and the
progress callback added tokens/s, so what TensorBoard or MLflow shows is what metrics.jsonl holds.

TensorBoard writes on the node of rank 0: with workers on other nodes, OUTPUT must be a
shared folder (the cluster's /shared), or use MLflow with a tracking server.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

from training.layout import RunLayout

PACKAGES = {"tensorboard": ("tensorboard", "the tensorboard package (pip install tensorboard)"),
            "mlflow": ("mlflow", "MLflow (pip install 'codecomplete[mlflow]', i.e. mlflow-skinny)")}


def missing_package(report_to: str) -> Optional[str]:
    """What to install for this tracker, or None when it is importable here."""
    if report_to not in PACKAGES:
        return None
    module, what = PACKAGES[report_to]
    if report_to == "tensorboard" and importlib.util.find_spec("tensorboardX") is not None:
        return None  # HF's callback writes with tensorboardX when tensorboard itself is absent
    return None if importlib.util.find_spec(module) is not None else what


def settings(report_to: str, output: Path, run_name: str, experiment: str,
             tracking_uri: Optional[str] = None) -> dict[str, Any]:
    """Where rank 0 reports (driver side; paths are absolute, as the workers need them)."""
    if report_to == "tensorboard":
        return {"report_to": "tensorboard", "dir": str(RunLayout(output).tensorboard)}
    if report_to == "mlflow":
        return {"report_to": "mlflow", "uri": tracking_uri or RunLayout(output).mlruns.resolve().as_uri(),
                "experiment": experiment, "run_name": run_name}
    return {"report_to": "none"}


def callback(tracking: Optional[dict[str, Any]]) -> Optional[Any]:
    """The HF integration callback for rank 0, configured from `settings`; None for none."""
    kind = (tracking or {}).get("report_to", "none")
    if kind == "tensorboard":
        from transformers.integrations import TensorBoardCallback

        cb = TensorBoardCallback()
        cb.logging_dir = tracking["dir"]  # instead of HF's output_dir/runs/DATE (a scratch folder here)
        return cb
    if kind == "mlflow":
        from transformers.integrations import MLflowCallback

        # MLflowCallback reads these in its setup, on the first train-begin.
        os.environ["MLFLOW_TRACKING_URI"] = tracking["uri"]
        os.environ["MLFLOW_EXPERIMENT_NAME"] = tracking["experiment"]
        if tracking["uri"].startswith("file:"):
            # MLflow 3 keeps its file store only behind this switch (a database or a server is
            # its recommended backend); a local file store needs nothing installed or running.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return MLflowCallback()
    return None
