"""The tiny preset cut down to a short benchmark run, shared by benchmarks/train.py and fim.py."""

from __future__ import annotations


def short_tiny_job(output: str, files: int, workers: int, steps: int):
    """The tiny preset on `files` corpus files for `steps` steps on `workers` workers: one eval
    and one checkpoint at the end, no retries. Returned unvalidated: callers set more fields."""
    from training.config import JobConfig

    cfg = JobConfig.from_preset("tiny")
    cfg.output = output
    cfg.data.max_files = files
    cfg.data.valid_fraction = 0.1  # a small corpus still needs validation chunks for every worker
    cfg.train.num_workers = workers
    cfg.train.max_steps = steps
    cfg.train.eval_steps = cfg.train.save_steps = steps
    cfg.train.logging_steps = max(1, steps // 8)
    cfg.train.warmup_steps = max(1, steps // 10)
    cfg.train.max_failures = 0
    return cfg
