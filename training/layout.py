"""The run folder: where every stage of one run reads and writes (`OUTPUT/` = `--output`).

    OUTPUT/
      tokenizer/            the tokenizer the data stage trained (or was given)
      data/train/, valid/   128-token chunks as Parquet (the data stage)
      data/stats.json       what the data stage read, skipped, dropped and kept
      data/duplicates.jsonl, near_duplicates.jsonl
                            the files dedup dropped and the twin each one was dropped for
      data/_staging/        shards being written (moved to train/ and valid/ at the end)
      run_state.json        the Ray Train run name, storage and config (written before training)
      metrics.jsonl         one JSON event per log/eval step (rank 0)
      ray_results/          Ray Train's checkpoints (unless train.storage_path says elsewhere)
      tensorboard/, mlruns/ experiment tracking
      model/                the servable Hugging Face folder: config.json, model.safetensors,
                            tokenizer files, fim.json, README.md (the model card)
      loss.png, run.json    the loss curve and the run's summary

One module names them so that the data stage, the job, the export, evaluation and the
model card agree; the service reads only `model/`.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
TRAIN_SPLIT, VALID_SPLIT = "train", "valid"
STATS_FILE = "stats.json"
DUPLICATES_FILE = "duplicates.jsonl"
NEAR_DUPLICATES_FILE = "near_duplicates.jsonl"
STAGING_DIR = "_staging"
RUN_STATE_FILE = "run_state.json"
METRICS_FILE = "metrics.jsonl"
RAY_RESULTS_DIR = "ray_results"
TENSORBOARD_DIR = "tensorboard"
MLRUNS_DIR = "mlruns"
MODEL_DIR = "model"
LOSS_PLOT_FILE = "loss.png"
SUMMARY_FILE = "run.json"
# Inside model/: how the checkpoint was trained to infill (training/fim_format.py), and
# the model card (training/export/model_card.py).
FIM_FILE = "fim.json"
MODEL_CARD_FILE = "README.md"


class RunLayout:
    """The paths of one run folder."""

    def __init__(self, output: str | Path):
        self.root = Path(output)

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER_DIR

    @property
    def data(self) -> Path:
        return self.root / DATA_DIR

    @property
    def train_split(self) -> Path:
        return self.data / TRAIN_SPLIT

    @property
    def valid_split(self) -> Path:
        return self.data / VALID_SPLIT

    @property
    def stats(self) -> Path:
        return self.data / STATS_FILE

    @property
    def duplicates(self) -> Path:
        return self.data / DUPLICATES_FILE

    @property
    def near_duplicates(self) -> Path:
        return self.data / NEAR_DUPLICATES_FILE

    @property
    def staging(self) -> Path:
        return self.data / STAGING_DIR

    @property
    def run_state(self) -> Path:
        return self.root / RUN_STATE_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def ray_results(self) -> Path:
        return self.root / RAY_RESULTS_DIR

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def mlruns(self) -> Path:
        return self.root / MLRUNS_DIR

    @property
    def model(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def loss_plot(self) -> Path:
        return self.root / LOSS_PLOT_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    def is_run(self) -> bool:
        """A folder this job wrote (it has a run state or metrics)."""
        return self.run_state.is_file() or self.metrics.is_file()
