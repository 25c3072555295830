"""The evaluation CLI's typed config: one field per flag, its docstring the flag's help.

Built on training/config/fields.py like the training job's config, and turned into flags by
training/config/cli.py: `--max-files` is `perplexity.max_files`. Every section checks its
own fields and `EvalConfig.check` what spans them, before any Ray work; a bad value is a
ConfigError whose message names the flag (`--n must be >= 1 (got 0)`), which the CLI prints
as one `error:` line with exit status 2.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

from training.config.cli import add_config_flags, flag, overrides
from training.config.fields import Config, ConfigError, set_field

Split = Literal["train", "valid", "all"]
Benchmark = Literal["single-line", "multi-line", "random-span", "random-span-light"]


def _at_least_one(section: object, names: Sequence[str]) -> None:
    for name in names:
        v = getattr(section, name)
        if v is not None and v < 1:
            raise ConfigError(f"{flag(name)} must be >= 1 (got {v})")


@dataclass
class TargetConfig:
    checkpoint: Optional[str] = None
    """a Hugging Face model folder (a run's OUTPUT/model/) or a run's OUTPUT"""

    endpoint: Optional[str] = None
    """URL of a running OpenAI-compatible server (…/v1/completions); HumanEval only"""

    model_name: Optional[str] = None
    """model name sent to --endpoint (default: the first of GET /v1/models)"""

    api_key: Optional[str] = None
    """bearer token for --endpoint (default: $COMPLETE_API_KEY)"""

    run: Optional[str] = None
    """the training run's OUTPUT folder (loss curve, data settings); found automatically when
    --checkpoint is OUTPUT or OUTPUT/model"""

    def validate(self, name: str = "target") -> None:
        if not self.checkpoint and not self.endpoint:
            raise ConfigError("give --checkpoint DIR or --endpoint URL")
        if self.checkpoint and self.endpoint:
            raise ConfigError("give --checkpoint or --endpoint, not both")
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"--endpoint {self.endpoint!r}: must be an http(s) URL")


@dataclass
class PerplexityConfig:
    perplexity: bool = True
    """the validation loss / perplexity job (--no-perplexity skips it)"""

    corpus: Optional[str] = None
    """held-out corpus (same forms as training's --corpus); scored whole"""

    split: Optional[Split] = None
    """which hash split of the corpus to score: train, valid or all (default: all with --corpus,
    else valid)"""

    max_files: Optional[int] = None
    """read at most this many corpus files"""

    max_chunks: Optional[int] = None
    """score at most this many chunks"""

    def validate(self, name: str = "perplexity") -> None:
        _at_least_one(self, ("max_files", "max_chunks"))


@dataclass
class HumanEvalConfig:
    humaneval: bool = False
    """run HumanEval (executes generated code, sandboxed)"""

    infilling: Optional[Benchmark] = None
    """run a HumanEval-infilling benchmark: single-line, multi-line, random-span or
    random-span-light (fill-in-the-middle; executes code, sandboxed)"""

    n: int = 1
    """samples per problem (200 for the paper's pass@100)"""

    temperature: float = 0.2
    """0 = greedy"""

    top_p: float = 0.95
    """nucleus sampling's probability mass"""

    max_new_tokens: Optional[int] = None
    """tokens per completion (default: 256, at most half the model's context)"""

    problems: Optional[int] = None
    """only the first N problems (quick runs); also --limit"""

    task_ids: Optional[str] = None
    """comma-separated task ids, e.g. HumanEval/0,HumanEval/7"""

    seed: int = 0
    """sampling seed"""

    timeout: float = 5.0
    """wall-clock seconds per sample"""

    memory_mb: int = 1024
    """address-space limit per sample"""

    exec_workers: Optional[int] = None
    """samples executed in parallel (default: cores)"""

    save_samples: bool = False
    """keep every completion and outcome in the JSON"""

    unsafe_sandbox: bool = False
    """run generated code under the audit-hook guard alone where bubblewrap cannot run
    (no file-system isolation: the code can read what this user can; docs/evaluation.md)"""

    def limits(self) -> "Any":
        """The sandbox's limits for one sample (training/eval/sandbox.py)."""
        from training.eval.sandbox import Limits

        return Limits(timeout_s=self.timeout, memory_mb=self.memory_mb,
                      isolation="guard" if self.unsafe_sandbox else "bwrap")

    def validate(self, name: str = "humaneval") -> None:
        _at_least_one(self, ("n", "memory_mb", "problems", "max_new_tokens", "exec_workers"))
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"--temperature must be in [0, 2] (got {self.temperature})")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.timeout <= 0:
            raise ConfigError(f"--timeout must be > 0 (got {self.timeout})")

    def task_id_list(self) -> Optional[list[str]]:
        return [t.strip() for t in self.task_ids.split(",") if t.strip()] if self.task_ids else None


@dataclass
class RunConfig:
    workers: int = 1
    """Ray actors that load the serving engine (each 1 CPU)"""

    batch_size: int = 16
    """chunks / prompts per model call"""

    report: Optional[str] = None
    """write eval.json, report.md (and loss.png) to this folder"""

    json: Optional[str] = None
    """where to write the results JSON (default: REPORT/eval.json or ./eval.json)"""

    def validate(self, name: str = "run") -> None:
        _at_least_one(self, ("workers", "batch_size"))


@dataclass
class EvalConfig(Config):
    target: TargetConfig = field(default_factory=TargetConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    humaneval: HumanEvalConfig = field(default_factory=HumanEvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def check(self) -> None:
        if self.target.endpoint and not (self.humaneval.humaneval or self.humaneval.infilling):
            raise ConfigError("--endpoint evaluates HumanEval only: add --humaneval or --infilling")


def build_parser(description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="training/eval/evaluate.py", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, EvalConfig, synonyms={"problems": ("--limit",)})
    return parser


def parse(argv: Optional[Sequence[str]] = None, description: str = "") -> EvalConfig:
    """argv -> a validated EvalConfig; ConfigError naming the flag on a bad value."""
    args = build_parser(description).parse_args(argv)
    cfg = EvalConfig()
    for section, values in overrides(args, EvalConfig).items():
        for name, value in values.items():
            set_field(getattr(cfg, section), name, value, flag(name))
    return cfg.validate()


__all__ = ["EvalConfig", "TargetConfig", "PerplexityConfig", "HumanEvalConfig", "RunConfig", "build_parser",
           "parse", "ConfigError"]

