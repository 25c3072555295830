"""--report-to: where rank 0's tracker writes, and an HF Trainer reporting through it for real.

The full job's TensorBoard files are read back in tests/e2e/test_job.py (the submitted run).
Here the same Trainer subclass and callbacks the workers use run in-process for a few steps
with MLflow's own file store, and MLflow's client reads every metric back at its steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.config import ConfigError, JobConfig
from training.train.tracking import callback, missing_package, settings

# What every tracker must hold (names as HF's integrations write them).
TRAIN_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_s")
EVAL_KEYS = ("eval_loss", "eval_perplexity")


def test_settings_put_the_logs_in_the_run_folder(tmp_path):
    assert settings("tensorboard", tmp_path, "r", "e") == {"report_to": "tensorboard",
                                                           "dir": str(tmp_path / "tensorboard")}
    ml = settings("mlflow", tmp_path, "train_1", "codecomplete-tiny")
    assert ml["uri"] == (tmp_path / "mlruns").as_uri() and ml["experiment"] == "codecomplete-tiny"
    assert settings("mlflow", tmp_path, "r", "e", "http://127.0.0.1:5000")["uri"] == "http://127.0.0.1:5000"
    assert callback(settings("none", tmp_path, "r", "e")) is None
    assert callback(settings("tensorboard", tmp_path, "r", "e")).logging_dir == str(tmp_path / "tensorboard")


def test_config_checks_report_to_before_any_work():
    cfg = JobConfig.from_preset("tiny")
    assert cfg.train.report_to == "tensorboard" and missing_package("tensorboard") is None
    with pytest.raises(ConfigError, match="train.report_to"):
        cfg.update({"train": {"report_to": "wandb"}})
    cfg.update({"train": {"tracking_uri": "http://127.0.0.1:5000"}})
    with pytest.raises(ConfigError, match="train.tracking_uri=.*is for --report-to mlflow"):
        cfg.validate()


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, context: int = 16, vocab: int = 64):
        g = torch.Generator().manual_seed(0)
        self.rows = torch.randint(vocab, (n, context), generator=g)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def test_mlflow_run_holds_every_metric_at_the_logged_steps(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow-skinny is in the dev extras; install them")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(var, "")  # the callback sets them (as on rank 0); restored afterwards
        monkeypatch.delenv(var)
    from mlflow.tracking import MlflowClient
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from training.train.loop import ProgressCallback, RankAwareTrainer

    tracking = settings("mlflow", tmp_path, "train_test", "codecomplete-test")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_layer=1, n_head=2, n_embd=32))
    args = TrainingArguments(output_dir=str(tmp_path / "scratch"), per_device_train_batch_size=4,
                             per_device_eval_batch_size=4, max_steps=4, logging_steps=1, eval_strategy="steps",
                             eval_steps=2, save_strategy="no", report_to=[], run_name="train_test",
                             disable_tqdm=True, use_cpu=True, learning_rate=1e-3, warmup_steps=1)
    trainer = RankAwareTrainer(model=model, args=args, train_dataset=Tokens(32), eval_dataset=Tokens(8))
    trainer.add_callback(ProgressCallback({"max_steps": 4}, rank=0, world=1, tokens_per_step=4 * 16))
    trainer.add_callback(callback(tracking))  # what train_func does on rank 0
    trainer.train()

    client = MlflowClient(tracking["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("codecomplete-test").experiment_id])
    assert run.info.run_name == "train_test" and run.info.status == "FINISHED"
    steps = {k: sorted(m.step for m in client.get_metric_history(run.info.run_id, k)) for k in TRAIN_KEYS + EVAL_KEYS}
    for k in TRAIN_KEYS:
        assert steps[k] == [1, 2, 3, 4], (k, steps[k])
    for k in EVAL_KEYS:
        assert steps[k] == [2, 4], (k, steps[k])
    tps = client.get_metric_history(run.info.run_id, "tokens_per_s")
    assert all(m.value > 0 for m in tps)
    assert Path(tmp_path / "mlruns").is_dir()  # the local file store, in the run folder
