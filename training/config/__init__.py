"""Typed configs: the mechanism (fields.py, cli.py) and the training job's config (job.py)."""

from training.config.fields import (CONFIG_DIR, REPO_ROOT, Config, ConfigError, check, coerce, field_docs,
                                    preset_path, resolve_path, set_field)
from training.config.job import SECTIONS, TOP_LEVEL, DataConfig, JobConfig, ModelConfig, TrainConfig

__all__ = ["CONFIG_DIR", "REPO_ROOT", "Config", "ConfigError", "check", "coerce", "field_docs", "preset_path",
           "resolve_path", "set_field", "SECTIONS", "TOP_LEVEL", "DataConfig", "JobConfig", "ModelConfig",
           "TrainConfig"]
