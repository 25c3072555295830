"""One typed config for the whole job.

The CLI (`training/run.py`), the YAML presets under `configs/` and the job itself all
read and write this one structure, so a flag, a preset key and a field are the same
thing with the same name. Each field's docstring is its documentation: the CLI's
`--help` is generated from them.

Precedence, lowest first: dataclass defaults < preset YAML (`--preset` / `--config`)
< command-line flags. `JobConfig.validate()` runs before any Ray work starts, so a
bad value fails in a second with a message that names the field.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin, get_type_hints

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A config value is wrong. The message names the field."""


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
    """`truncate`: each file cut into context_length pieces, short tail dropped (the seed's).
    `pack`: files joined with the end-of-text token and cut into full chunks (little dropped)."""

    dedup: bool = False
    """Drop files whose content is an exact duplicate of one already seen."""

    quality_filter: bool = False
    """CodeParrot's filters: auto-generated header, max line length > 1,000, mean line length
    > 100, alphanumeric fraction < 0.25."""

    keywords: list[str] = field(default_factory=list)
    """Keep only files that mention one of these (the course used
    pandas,sklearn,matplotlib,seaborn to make codeparrot-ds). Empty keeps all."""

    max_file_bytes: int = 1_000_000
    """Files larger than this are skipped and counted (huge single lines, data dumps)."""

    max_files: Optional[int] = None
    """Read at most this many corpus files (None: all). For quick runs."""

    tokenizer_actors: int = 1
    """Size of the Ray Data actor pool that tokenizes. Each takes one logical CPU."""

    batch_rows: int = 64
    """Files per `map_batches` batch in the tokenizing stage."""

    fim_rate: float = 0.0
    """Fraction of training chunks rewritten for fill-in-the-middle (prefix/suffix/middle with
    the <fim_*> sentinels, StarCoder's format). 0: left to right only (the seed's data); the
    presets use 0.5 (Bavarian et al. 2022). Validation chunks always stay left to right."""

    fim_spm_rate: float = 0.5
    """Of the FIM chunks, the fraction in SPM order (suffix first) rather than PSM."""

    fim_seed: int = 0
    """Seed of the FIM draws; with the chunk's content it fixes each chunk's split."""


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


@dataclass
class TrainConfig:
    num_workers: Optional[int] = None
    """Ray Train workers. None: what the cluster offers (GPUs if it has them, else 2)."""

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
    """Chunks per worker per forward pass (the seed: 32)."""

    learning_rate: float = 5e-4
    """Peak learning rate (the seed: 5e-4)."""

    lr_scheduler_type: str = "cosine"
    """Any Hugging Face scheduler name (the seed: cosine)."""

    warmup_steps: int = 1000
    """Linear warmup steps (the seed: 1,000)."""

    weight_decay: float = 0.1
    """AdamW weight decay (the seed: 0.1)."""

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
    """Worker-group restarts (from the latest checkpoint) before the run fails."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs that support it, else fp16 on GPUs, fp32 on CPUs. bf16 on CPU
    workers runs DeepSpeed's bf16 engine (fp32 master weights): fast only on CPUs with
    avx512_bf16 or AMX (docs/training.md)."""

    compile: bool = False
    """torch.compile the model inside the DeepSpeed engine (Inductor; needs a C++ compiler on
    CPU workers). Pays a one-off compile per worker (~40 s for the tiny model on one core)
    for faster steps; benchmarks/train.py measures both (docs/training.md)."""

    deepspeed_config: str = "configs/deepspeed/zero2.json"
    """DeepSpeed JSON config (relative paths are taken from the repo root)."""

    seed: int = 42
    """Seed for weights, data order and dropout."""

    shuffle_buffer: int = 10_000
    """Chunks in each worker's local shuffle buffer; 0 keeps the stream's order. The seed's
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


@dataclass
class JobConfig:
    preset: str = "custom"
    """Name of the preset this config came from."""

    output: str = "runs/default"
    """Where the run writes: tokenizer/, data/, model/, metrics.jsonl, loss.png, run.json."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- building ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "JobConfig":
        cfg = cls()
        cfg.update(raw, source)
        return cfg

    @classmethod
    def from_preset(cls, name_or_path: str) -> "JobConfig":
        path = preset_path(name_or_path)
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        raw.setdefault("preset", path.stem)
        return cls.from_dict(raw, source=str(path))

    def update(self, raw: dict[str, Any], source: str = "config") -> None:
        """Overlay a nested dict ({"train": {"max_steps": 10}}) onto this config."""
        for key, value in raw.items():
            if key in SECTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: '{key}' must be a mapping")
                section = getattr(self, key)
                for k, v in value.items():
                    set_field(section, k, v, f"{source}: {key}.{k}")
            elif key in TOP_LEVEL:
                set_field(self, key, value, f"{source}: {key}")
            else:
                raise ConfigError(f"{source}: unknown key '{key}' (expected one of: {', '.join([*TOP_LEVEL, *SECTIONS])})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # ---- checking ---------------------------------------------------------------------

    def validate(self) -> "JobConfig":
        """Fail fast, before any cluster work, with the name of the wrong field."""
        d, m, t = self.data, self.model, self.train
        _check(0.0 <= d.valid_fraction < 1.0, "data.valid_fraction", d.valid_fraction, "must be in [0, 1)")
        _check(d.vocab_size >= 300, "data.vocab_size", d.vocab_size, "must be >= 300 (256 bytes + specials + merges)")
        _check(d.context_length >= 8, "data.context_length", d.context_length, "must be >= 8")
        _check(d.chunking in ("truncate", "pack"), "data.chunking", d.chunking, "must be 'truncate' or 'pack'")
        _check(d.max_file_bytes > 0, "data.max_file_bytes", d.max_file_bytes, "must be > 0")
        _check(d.max_files is None or d.max_files > 0, "data.max_files", d.max_files, "must be > 0")
        _check(d.tokenizer_actors >= 1, "data.tokenizer_actors", d.tokenizer_actors, "must be >= 1")
        _check(d.batch_rows >= 1, "data.batch_rows", d.batch_rows, "must be >= 1")
        _check(0.0 <= d.fim_rate <= 1.0, "data.fim_rate", d.fim_rate, "must be in [0, 1]")
        _check(0.0 <= d.fim_spm_rate <= 1.0, "data.fim_spm_rate", d.fim_spm_rate, "must be in [0, 1]")
        _check(d.tokenizer_train_files >= 1, "data.tokenizer_train_files", d.tokenizer_train_files, "must be >= 1")
        _check(all(isinstance(k, str) and k.strip() for k in d.keywords), "data.keywords", d.keywords, "must be non-empty strings")
        if d.tokenizer is not None:
            _check(Path(d.tokenizer).is_dir(), "data.tokenizer", d.tokenizer, "is not a folder")
        for name in ("n_layer", "n_head", "n_embd"):
            _check(getattr(m, name) >= 1, f"model.{name}", getattr(m, name), "must be >= 1")
        _check(m.n_embd % m.n_head == 0, "model.n_embd", m.n_embd, f"must be divisible by model.n_head={m.n_head}")
        _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
        _check(t.num_workers is None or t.num_workers >= 1, "train.num_workers", t.num_workers, "must be >= 1")
        _check(t.cpus_per_worker is None or t.cpus_per_worker >= 0, "train.cpus_per_worker", t.cpus_per_worker,
               "must be >= 0")
        _check(t.report_to in ("tensorboard", "mlflow", "none"), "train.report_to", t.report_to,
               "must be tensorboard, mlflow or none")
        if t.report_to != "none":
            from training.tracking import missing_package

            missing = missing_package(t.report_to)
            _check(missing is None, "train.report_to", t.report_to, f"needs {missing} (or --report-to none)")
        _check(t.tracking_uri is None or t.report_to == "mlflow", "train.tracking_uri", t.tracking_uri,
               "is for --report-to mlflow")
        _check(t.stall_timeout >= 0, "train.stall_timeout", t.stall_timeout, "must be >= 0 (0: no watchdog)")
        for name in ("micro_batch_size", "global_batch_size", "num_epochs", "eval_steps",
                     "logging_steps", "save_steps", "keep_checkpoints"):
            _check(getattr(t, name) >= 1, f"train.{name}", getattr(t, name), "must be >= 1")
        _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, "must be >= 1")
        _check(t.shuffle_buffer >= 0, "train.shuffle_buffer", t.shuffle_buffer, "must be >= 0")
        _check(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "must be > 0")
        _check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
        _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
        _check(t.max_failures >= -1, "train.max_failures", t.max_failures, "must be >= -1 (-1: retry forever)")
        _check(t.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision", t.precision, "must be auto, fp32, bf16 or fp16")
        _check(bool(self.output), "output", self.output, "must be a path")
        ds = resolve_path(t.deepspeed_config)
        _check(ds.is_file(), "train.deepspeed_config", t.deepspeed_config, "file not found")
        try:
            parsed = json.loads(ds.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"train.deepspeed_config: {t.deepspeed_config} is not valid JSON: {e}") from None
        _check(isinstance(parsed, dict), "train.deepspeed_config", t.deepspeed_config, "must hold a JSON object")
        if t.resume is not None:
            _check(Path(t.resume).is_dir(), "train.resume", t.resume, "is not a run folder")
        return self


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}")


def resolve_path(p: str) -> Path:
    """Relative config paths are taken from the current folder, then from the repo root."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"config file not found: {name_or_path}")
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset '{name_or_path}' (known: {', '.join(known)})")
    return candidate


# ---- typed field assignment ---------------------------------------------------------------


def set_field(obj: Any, name: str, value: Any, where: str) -> None:
    """Set obj.name = value, coercing strings from the CLI and checking the type."""
    hints = {k: v for k, v in get_type_hints(type(obj)).items() if k not in SECTIONS}
    if name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(obj))
        raise ConfigError(f"{where}: unknown field (known: {known})")
    setattr(obj, name, coerce(value, hints[name], where))


def coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Optional or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)][0]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return coerce(value, inner, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r}: must be one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: must be a list")
        return [coerce(v, args[0], where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}={value!r}: must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: must be an integer")
        try:
            if isinstance(value, str):
                value = float(value.replace("_", "")) if any(c in value for c in ".eE") else int(value.replace("_", ""))
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r}: must be an integer") from None
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r}: must be a number") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: must be a string")
        return str(value)
    return value


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (litgpt's convention)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
TOP_LEVEL = ("preset", "output")


def env_flag(name: str, default: bool = False) -> bool:
    v = os.environ.get(name)
    return default if v is None else v.lower() in ("1", "true", "yes", "on")
