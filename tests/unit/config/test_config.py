"""The typed config: presets, CLI flags, coercion and fail-fast validation."""

import json

import pytest

from training.config.cli import build_parser, parse
from training.config import ConfigError, DataConfig, JobConfig, TrainConfig, field_docs


def test_gpt2_small_preset_is_the_course_recipe():
    cfg = JobConfig.from_preset("gpt2-small").validate()
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (12, 12, 768)
    assert cfg.data.context_length == 128
    t = cfg.train
    assert (t.micro_batch_size, t.global_batch_size) == (32, 256)  # 32 x grad-accum 8 on one device
    assert (t.learning_rate, t.lr_scheduler_type, t.warmup_steps, t.weight_decay) == (5e-4, "cosine", 1000, 0.1)
    assert t.num_epochs == 1 and t.eval_steps == t.logging_steps == t.save_steps == 5000


def test_tiny_preset_is_small_and_valid():
    cfg = JobConfig.from_preset("tiny").validate()
    assert cfg.model.n_layer <= 2 and cfg.model.n_embd <= 256


def test_flags_override_preset_and_coerce_types():
    _, cfg = parse(["--preset", "tiny", "--max-steps", "7", "--no-gpu", "--keywords", "pandas, sklearn",
                    "--learning-rate", "1e-3", "--dedup", "--output", "somewhere"])
    assert cfg.train.max_steps == 7 and cfg.train.use_gpu is False
    assert cfg.data.keywords == ["pandas", "sklearn"] and cfg.data.dedup is True
    assert cfg.train.learning_rate == 1e-3 and cfg.output == "somewhere"
    _, default = parse([])  # the tiny preset's values where no flag is given
    assert default.train.use_gpu is None and default.train.max_steps == JobConfig.from_preset("tiny").train.max_steps
    _, gpt2 = parse(["--preset", "gpt2-small"])
    assert gpt2.train.max_steps is None  # the course recipe: one epoch


@pytest.mark.parametrize("argv, field", [
    (["--vocab-size", "abc"], "data.vocab_size"),
    (["--chunking", "slice"], "data.chunking"),
    (["--n-embd", "100", "--n-head", "3"], "model.n_embd"),
    (["--num-workers", "0"], "train.num_workers"),
    (["--valid-fraction", "1.5"], "data.valid_fraction"),
    (["--fim-rate", "1.5"], "data.fim_rate"),
    (["--fim-spm-rate", "-0.1"], "data.fim_spm_rate"),
    (["--deepspeed-config", "no/such/file.json"], "train.deepspeed_config"),
    (["--tokenizer", "no/such/dir"], "data.tokenizer"),
    (["--precision", "fp8"], "train.precision"),
    (["--shuffle-buffer", "-1"], "train.shuffle_buffer"),
    (["--global-batch-size", "0"], "train.global_batch_size"),
    (["--cpus-per-worker", "-0.5"], "train.cpus_per_worker"),
    (["--stall-timeout", "-1"], "train.stall_timeout"),
])
def test_bad_values_name_the_field(argv, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse(argv)


def test_deepspeed_config_that_does_not_parse(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse(["--deepspeed-config", str(bad)])


def test_unknown_yaml_key_and_preset(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match="max_stepz"):
        parse(["--config", str(y)])
    with pytest.raises(ConfigError, match="unknown preset"):
        parse(["--preset", "gpt5"])


def test_every_field_is_documented_and_in_help():
    help_text = build_parser().format_help()
    for cls in (DataConfig, TrainConfig):
        docs = field_docs(cls)
        for name in cls.__dataclass_fields__:
            assert docs.get(name), f"{cls.__name__}.{name} has no docstring"
            assert "--" + name.replace("_", "-") in help_text


def test_round_trip_json():
    cfg = JobConfig.from_preset("tiny")
    again = JobConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
