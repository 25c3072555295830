"""One typed config for the whole job.

The CLI (`training/run.py`), the YAML presets under `configs/` and the job itself all
read and write this one structure, so a flag, a preset key and a field are the same
thing with the same name. Each field's docstring is its documentation: the CLI's
`--help` is generated from them.

Precedence, lowest first: dataclass defaults < preset YAML (`--preset` / `--config`)
< command-line flags. `JobConfig.validate()` runs before any Ray work starts: each
section checks its own fields, so a bad value fails in a second with a message that names
the field (the mechanism is training/config/fields.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from training.config.fields import Config, ConfigError, check, preset_path, resolve_path


class WorkerCount:
    """The type of `train.num_workers`: a count (`4`) or an elastic range (`2-8`, YAML `2-8` or
    `[2, 8]`). Parsed to an int, or to a (min, max) tuple when min < max."""

    @staticmethod
    def coerce_config_value(value: Any, where: str) -> Any:
        raw = value
        if isinstance(value, str):
            value = value.strip()
            parts = [p.strip() for p in value.split("-")] if "-" in value.lstrip("-") else [value]
            value = parts if len(parts) == 2 else value
        try:
            if isinstance(value, (list, tuple)):
                if len(value) != 2:
                    raise ValueError
                lo, hi = (int(str(v)) for v in value)
                return lo if lo == hi else (lo, hi)
            if isinstance(value, bool):
                raise ValueError
            return int(str(value)) if not isinstance(value, int) else value
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={raw!r}: must be a count (4) or a range MIN-MAX (2-8)") from None


def worker_range(num_workers: Any) -> Optional[tuple[int, int]]:
    """(min, max) of train.num_workers, or None when it is unset."""
    if num_workers is None:
        return None
    if isinstance(num_workers, (list, tuple)):
        return int(num_workers[0]), int(num_workers[1])
    return int(num_workers), int(num_workers)


@dataclass
class DataConfig:
    corpus: Optional[str] = None
    """Training corpus: a folder of .py files (recursive), a .jsonl/.json/.parquet file or a
    folder of them with a `content` column, or a hub data set name such as
    `huggingface-course/codeparrot-ds-train`. None means the running interpreter's standard
    library sources (tests excluded), which every machine has."""

    valid_corpus: Optional[str] = None
    """Separate validation corpus (same forms as `corpus`). None means a deterministic
    hash split of `corpus` by `valid_fraction`."""

    valid_fraction: float = 0.05
    """Fraction of files sent to validation when there is no `valid_corpus`. The split is a
    hash of the file's path (or repo_name + path), so it never changes between runs."""

    tokenizer: Optional[str] = None
    """A Hugging Face tokenizer folder to use. None means: train a byte-level BPE on the
    training split and save it under `OUTPUT/tokenizer/`."""

    vocab_size: int = 8000
    """Vocabulary size of a tokenizer trained by the job (the course's has 52,000)."""

    tokenizer_train_files: int = 2000
    """How many training files (at most) the tokenizer is trained on."""

    context_length: int = 128
    """Tokens per training chunk, and the model's n_positions."""

    chunking: Literal["truncate", "pack"] = "truncate"
    """`truncate`: each file cut into context_length pieces, short tail dropped (the course recipe's).
    `pack`: files joined with the end-of-text token and cut into full chunks (little dropped)."""

    dedup: bool = False
    """Drop exact copies: files whose text is the same once all whitespace is removed. The
    copy kept is the same on every run (the smallest path; training copies before
    validation ones); the dropped ones are listed in OUTPUT/data/duplicates.jsonl."""

    near_dedup: Optional[float] = None
    """Also drop near copies, CodeParrot's way: files whose MinHash-estimated Jaccard
    similarity (token sets, 256 permutations, LSH) is at least this (CodeParrot: 0.85); one
    file of each cluster is kept. Needs `dedup`. Listed in OUTPUT/data/near_duplicates.jsonl
    with the twin kept and the estimate. None: off."""

    quality_filter: bool = False
    """CodeParrot's four line/character filters: auto-generated header, max line length > 1,000,
    mean line length > 100, alphanumeric fraction < 0.25 (the first four rules of `clean codeparrot`)."""

    clean: Optional[str] = None
    """A cleaning recipe. `codeparrot`: CodeParrot's whole preprocessing filter, in its order: the
    four quality filters, characters per token < 1.5 (the run's tokenizer), config or test files
    and files without def/class/for/while each dropped with probability 0.7, files with at most
    4 '=' dropped; each rule counted by name in stats.json. None (or `none`): no recipe."""

    clean_seed: int = 0
    """Seed of the recipe's probabilistic rules; with a file's content it decides that file,
    the same on every worker, retry and CPU count."""

    licenses: list[str] = field(default_factory=list)
    """Keep only rows whose `license` column is one of these (case-insensitive), e.g.
    mit,apache-2.0,bsd-3-clause (CodeParrot's schema). Rows without a licence are dropped too.
    Needs a Parquet/JSONL/hub corpus with that column. Empty keeps all."""

    keywords: list[str] = field(default_factory=list)
    """Keep only files that mention one of these (the course used
    pandas,sklearn,matplotlib,seaborn to make codeparrot-ds). Empty keeps all."""

    max_file_bytes: int = 1_000_000
    """Files larger than this are skipped and counted (huge single lines, data dumps)."""

    max_files: Optional[int] = None
    """Read at most this many corpus files (None: all). For quick runs."""

    tokenizer_actors: int = 2
    """Size of the Ray Data actor pool that reads, filters and tokenizes (at most one per
    block). Each takes up to one logical CPU and encodes on its share of its node's cores;
    two keep both cores of a small machine busy, where one actor left a core idle while it
    read and wrote between its encode calls."""

    batch_rows: int = 256
    """Files per `map_batches` batch in the tokenizing stage (a folder corpus: one block per
    batch). Larger batches spread Ray Data's per-block cost over more files; smaller ones
    spread a small corpus over more actors."""

    fim_rate: float = 0.0
    """Fraction of training chunks rewritten for fill-in-the-middle (prefix/suffix/middle with
    the <fim_*> sentinels, StarCoder's format). 0: left to right only (the course recipe's data); the
    presets use 0.5 (Bavarian et al. 2022). Validation chunks always stay left to right."""

    fim_spm_rate: float = 0.5
    """Of the FIM chunks, the fraction in SPM order (suffix first) rather than PSM."""

    fim_seed: int = 0
    """Seed of the FIM draws; with the chunk's content it fixes each chunk's split."""

    def validate(self, name: str = "data") -> None:
        def ok(cond: bool, field: str, why: str) -> None:
            check(cond, f"{name}.{field}", getattr(self, field), why)

        ok(0.0 <= self.valid_fraction < 1.0, "valid_fraction", "must be in [0, 1)")
        ok(self.vocab_size >= 300, "vocab_size", "must be >= 300 (256 bytes + specials + merges)")
        ok(self.context_length >= 8, "context_length", "must be >= 8")
        ok(self.chunking in ("truncate", "pack"), "chunking", "must be 'truncate' or 'pack'")
        ok(self.max_file_bytes > 0, "max_file_bytes", "must be > 0")
        ok(self.max_files is None or self.max_files > 0, "max_files", "must be > 0")
        ok(self.tokenizer_actors >= 1, "tokenizer_actors", "must be >= 1")
        ok(self.batch_rows >= 1, "batch_rows", "must be >= 1")
        ok(0.0 <= self.fim_rate <= 1.0, "fim_rate", "must be in [0, 1]")
        ok(0.0 <= self.fim_spm_rate <= 1.0, "fim_spm_rate", "must be in [0, 1]")
        ok(self.tokenizer_train_files >= 1, "tokenizer_train_files", "must be >= 1")
        ok(self.near_dedup is None or (isinstance(self.near_dedup, (int, float))
                                       and 0.0 < self.near_dedup < 1.0), "near_dedup", "must be in (0, 1)")
        ok(self.near_dedup is None or self.dedup, "near_dedup", "needs data.dedup (exact copies go first)")
        ok(all(isinstance(k, str) and k.strip() for k in self.keywords), "keywords", "must be non-empty strings")
        from training.data.filters import CLEAN_RECIPES

        ok(self.clean is None or self.clean in CLEAN_RECIPES, "clean",
           f"must be one of none, {', '.join(CLEAN_RECIPES)}")
        ok(all(isinstance(k, str) and k.strip() for k in self.licenses), "licenses", "must be non-empty strings")
        if self.tokenizer is not None:
            ok(Path(self.tokenizer).is_dir(), "tokenizer", "is not a folder")


@dataclass
class ModelConfig:
    n_layer: int = 12
    """Transformer blocks (GPT-2 small: 12)."""

    n_head: int = 12
    """Attention heads per block (GPT-2 small: 12)."""

    n_embd: int = 768
    """Hidden width (GPT-2 small: 768). Must be divisible by n_head."""

    dropout: float = 0.1
    """Dropout on residuals, embeddings and attention (GPT-2's default)."""

    def validate(self, name: str = "model") -> None:
        for f in ("n_layer", "n_head", "n_embd"):
            check(getattr(self, f) >= 1, f"{name}.{f}", getattr(self, f), "must be >= 1")
        check(self.n_embd % self.n_head == 0, f"{name}.n_embd", self.n_embd,
              f"must be divisible by {name}.n_head={self.n_head}")
        check(0.0 <= self.dropout < 1.0, f"{name}.dropout", self.dropout, "must be in [0, 1)")


@dataclass
class TrainConfig:
    num_workers: Optional[WorkerCount] = None
    """Ray Train workers: a count, or an elastic range MIN-MAX (`2-8`): the run starts with what
    the cluster can give within it, restarts smaller from the latest checkpoint when a node
    is lost and grows back when nodes return, keeping the global batch (every size in the
    range must divide it). None: what the cluster offers (GPUs if it has them, else 2)."""

    use_gpu: Optional[bool] = None
    """Train on GPUs (NCCL) or CPUs (gloo). None: GPUs exactly when the cluster has them."""

    cpus_per_worker: Optional[float] = None
    """Logical CPUs each training worker reserves (fractions allowed). None: 1 on GPU workers;
    CPU workers together take at most half of the cluster's CPUs (at most 1 each), so that
    Ray Data's reads of the stream always have room."""

    global_batch_size: int = 256
    """Sequences per optimizer step over all workers (the recipe: 32 x grad-accum 8 = 256).
    Gradient accumulation is derived: global / (micro_batch_size x workers)."""

    micro_batch_size: int = 32
    """Chunks per worker per forward pass (the course recipe: 32)."""

    learning_rate: float = 5e-4
    """Peak learning rate (the course recipe: 5e-4)."""

    lr_scheduler_type: str = "cosine"
    """Any Hugging Face scheduler name (the course recipe: cosine)."""

    warmup_steps: int = 1000
    """Linear warmup steps (the course recipe: 1,000)."""

    weight_decay: float = 0.1
    """AdamW weight decay (the course recipe: 0.1)."""

    num_epochs: int = 1
    """Passes over the training chunks; sets max_steps unless `max_steps` is given."""

    max_steps: Optional[int] = None
    """Optimizer steps to run. None: one epoch's worth times num_epochs."""

    eval_steps: int = 5000
    """Evaluate on the validation split every this many steps."""

    logging_steps: int = 5000
    """Log train loss and learning rate every this many steps."""

    save_steps: int = 5000
    """Checkpoint every this many steps (through Ray Train)."""

    keep_checkpoints: int = 2
    """Checkpoints kept, best by eval loss."""

    max_failures: int = 2
    """Worker-group restarts (from the latest checkpoint) before the run fails; -1: no limit.
    A node that dies without notice (killed, crashed) counts here."""

    max_preemption_failures: int = -1
    """Restarts after node preemptions (a node Ray is told is being reclaimed: spot/preemptible
    instances), counted apart from max_failures; -1: no limit, so a preempted node is always
    a restart from the latest checkpoint, never a failed run."""

    preemption_grace_s: float = 0.0
    """Seconds the surviving workers may keep running past a preemption's deadline (to finish
    a checkpoint upload) before Ray Train restarts them."""

    resize_interval_s: float = 60.0
    """Elastic runs (num_workers MIN-MAX): how often Ray Train checks whether the cluster can
    now hold more workers; growing restarts the workers from the latest checkpoint."""

    async_checkpoint: bool = True
    """Upload checkpoints in the background (Ray Train's CheckpointUploadMode.ASYNC): training
    goes on while a save is copied to storage_path, and the local copy is deleted once
    uploaded. False: each save blocks until its upload is done."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs that have it natively, else fp16; on CPUs bf16 where every worker's
    CPU has native bf16 (avx512_bf16 or AMX in /proc/cpuinfo), else fp32. bf16 on CPU workers
    runs DeepSpeed's bf16 engine (fp32 master weights); elsewhere it is slower than fp32
    (docs/training.md)."""

    compile: bool = False
    """torch.compile the model inside the DeepSpeed engine (Inductor; needs a C++ compiler on
    CPU workers). Pays a one-off compile per worker for faster steps; benchmarks/train.py
    measures both (docs/training.md)."""

    deepspeed_config: str = "configs/deepspeed/zero2.json"
    """DeepSpeed JSON config (relative paths are taken from the repo root)."""

    seed: int = 42
    """Seed for weights, data order and dropout."""

    shuffle_buffer: int = 10_000
    """Chunks in each worker's local shuffle buffer; 0 keeps the stream's order. The course recipe's
    Trainer shuffles the whole set; unshuffled, a batch holds consecutive chunks of a few
    files and the model learns measurably worse for the same tokens."""

    storage_path: Optional[str] = None
    """Where Ray Train keeps checkpoints: a local path or a cloud URI (s3://, gs://) that every
    node can reach. None: OUTPUT/ray_results."""

    resume: Optional[str] = None
    """An earlier run's OUTPUT folder: continue from its latest checkpoint (same worker count)."""

    report_to: Literal["tensorboard", "mlflow", "none"] = "tensorboard"
    """Experiment tracking through the HF Trainer's own integration, on rank 0: TensorBoard event
    files under OUTPUT/tensorboard/, or an MLflow run (see tracking_uri); none: metrics.jsonl only.
    Train loss, eval loss and perplexity, learning rate, grad norm and tokens/s at each log step."""

    tracking_uri: Optional[str] = None
    """MLflow tracking URI for report_to=mlflow (http://HOST:5000, sqlite:///mlflow.db, file:/PATH).
    None: a local file store, file:OUTPUT/mlruns. Training workers must be able to reach it."""

    stall_timeout: float = 300.0
    """Seconds a stage (data stage, worker start, training stream) may make no progress
    before the job fails with the pending resource demand named. 0 disables the watchdog."""

    def validate(self, name: str = "train") -> None:
        def ok(cond: bool, field: str, why: str) -> None:
            check(cond, f"{name}.{field}", getattr(self, field), why)

        lo_hi = worker_range(self.num_workers)
        ok(lo_hi is None or lo_hi[0] >= 1, "num_workers", "must be >= 1")
        ok(lo_hi is None or lo_hi[0] <= lo_hi[1], "num_workers", "a range must be MIN-MAX with MIN <= MAX")
        ok(self.max_preemption_failures >= -1, "max_preemption_failures", "must be >= -1 (-1: retry forever)")
        ok(self.preemption_grace_s >= 0, "preemption_grace_s", "must be >= 0")
        ok(self.resize_interval_s >= 0, "resize_interval_s", "must be >= 0")
        ok(self.cpus_per_worker is None or self.cpus_per_worker >= 0, "cpus_per_worker", "must be >= 0")
        ok(self.report_to in ("tensorboard", "mlflow", "none"), "report_to", "must be tensorboard, mlflow or none")
        if self.report_to != "none":
            from training.train.tracking import missing_package

            missing = missing_package(self.report_to)
            ok(missing is None, "report_to", f"needs {missing} (or --report-to none)")
        ok(self.tracking_uri is None or self.report_to == "mlflow", "tracking_uri", "is for --report-to mlflow")
        ok(self.stall_timeout >= 0, "stall_timeout", "must be >= 0 (0: no watchdog)")
        for f in ("micro_batch_size", "global_batch_size", "num_epochs", "eval_steps",
                  "logging_steps", "save_steps", "keep_checkpoints"):
            ok(getattr(self, f) >= 1, f, "must be >= 1")
        ok(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        ok(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")
        ok(self.learning_rate > 0, "learning_rate", "must be > 0")
        ok(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        ok(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        ok(self.max_failures >= -1, "max_failures", "must be >= -1 (-1: retry forever)")
        ok(self.precision in ("auto", "fp32", "bf16", "fp16"), "precision", "must be auto, fp32, bf16 or fp16")
        load_deepspeed_config(self.deepspeed_config, f"{name}.deepspeed_config")
        if self.resume is not None:
            ok(Path(self.resume).is_dir(), "resume", "is not a run folder")


def load_deepspeed_config(path: str, name: str = "train.deepspeed_config") -> dict[str, Any]:
    """Parse and sanity-check the DeepSpeed JSON; one-line ConfigError otherwise."""
    p = resolve_path(path)
    try:
        raw = json.loads(p.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{name}={path!r}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{name}={path!r}: not valid JSON ({e})") from None
    check(isinstance(raw, dict), name, path, "must hold a JSON object")
    zero = raw.get("zero_optimization", {})
    check(isinstance(zero, dict) and zero.get("stage", 0) in (0, 1, 2, 3), name, path,
          "zero_optimization.stage must be 0, 1, 2 or 3")
    # On CPU workers accelerate reports world size 1, so HF would fill "auto" with
    # micro x accum x 1 while DeepSpeed sees N ranks and asserts (docs/training.md).
    check(raw.get("train_batch_size") != "auto", name, path, 'drop "train_batch_size": "auto" '
          "(it is derived from micro batch x grad-accum x workers)")
    return raw


@dataclass
class JobConfig(Config):
    preset: str = "custom"
    """Name of the preset this config came from."""

    output: str = "runs/default"
    """Where the run writes: tokenizer/, data/, model/, metrics.jsonl, loss.png, run.json."""

    verbose: bool = False
    """Print what the libraries log (Ray's INFO lines, Ray Data's progress bars, every worker's
    line undeduplicated, warnings known to be harmless, DeepSpeed's export prints). Off: the
    job's own lines and every warning or error that may matter (training/log_noise.py)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_preset(cls, name_or_path: str) -> "JobConfig":
        path = preset_path(name_or_path)
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        raw.setdefault("preset", path.stem)
        return cls.from_dict(raw, source=str(path))

    def check(self) -> None:
        check(bool(self.output), "output", self.output, "must be a path")


# The sections, as the CLI and older callers name them.
SECTIONS: dict[str, type] = JobConfig.sections()
TOP_LEVEL = JobConfig.top_level()
