"""Elastic worker ranges, the batch/worker check before any data is read, and --corpus
without --valid-corpus. No cluster: the job must refuse these before it starts one."""

from __future__ import annotations

import pytest

from training.config import ConfigError, JobConfig
from training.config.cli import parse
from training.train.elastic import saved_world_size
from training.train.plan import Plan, accumulation_table, check_batch, plan_batch, plan_workers


def cap(cpus: float) -> dict[str, float]:
    return {"CPU": cpus, "GPU": 0.0, "CPU_now": cpus, "GPU_now": 0.0, "autoscaling": 0.0}


@pytest.mark.parametrize("given, parsed", [("2-8", (2, 8)), (" 1 - 2 ", (1, 2)), ("4", 4), ("3-3", 3), ("none", None)])
def test_num_workers_takes_a_count_or_a_range_on_the_command_line(given, parsed):
    _, cfg = parse(["--preset", "tiny", "--num-workers", given, "--global-batch-size", "840",
                    "--micro-batch-size", "1"])
    assert cfg.train.num_workers == parsed


def test_num_workers_range_in_yaml_and_bad_spellings(tmp_path):
    for spelling in ("1-2", "[1, 2]"):
        path = tmp_path / "c.yaml"
        path.write_text(f"train:\n  num_workers: {spelling}\n  global_batch_size: 16\n  micro_batch_size: 8\n")
        assert JobConfig.from_preset(str(path)).validate().train.num_workers == (1, 2)
    for bad, why in (("2-1", "MIN <= MAX"), ("a-b", "MIN-MAX"), ("0-2", ">= 1"), ("1-2-3", "MIN-MAX")):
        with pytest.raises(ConfigError, match=rf"train\.num_workers.*{why}"):
            parse(["--preset", "tiny", "--num-workers", bad])


def test_a_range_plans_accumulation_per_world_size_and_one_schedule():
    cfg = JobConfig.from_preset("tiny")
    cfg.train.num_workers, cfg.train.global_batch_size, cfg.train.micro_batch_size = (1, 2), 16, 8
    cfg.train.max_steps = None  # one epoch (the tiny preset fixes its steps)
    plan = plan_batch(cfg, {"chunks_train": 1001, "chunks_valid": 10}, plan_workers(cfg, cap(2)))
    assert plan.elastic and plan.scaling_workers() == (1, 2)
    assert plan.accumulation == {1: 2, 2: 1}  # micro 8 x workers x accum = 16 on both sizes
    assert all(plan.micro_batch_size * w * a == 16 for w, a in plan.accumulation.items())
    # One epoch counted on the size that drops the most chunks (2 equal shards of 500: 62 steps,
    # one shard of 1001: 62 as well here); the schedule is fixed for the run whatever the size.
    assert plan.max_steps == min(1001 // 16, (1001 // 2) // 8)
    # The CPU share is planned for the range's top: both workers fit with room for the reads.
    assert plan.workers * plan.cpus_per_worker < 2 and plan.read_cpus > 0
    fixed = Plan(workers=2, use_gpu=False, cpus_per_worker=0.5, read_cpus=0.25)
    assert not fixed.elastic and fixed.scaling_workers() == 2


def test_the_course_recipe_refuses_a_range_with_sizes_that_break_its_batch_naming_those_that_keep_it():
    cfg = JobConfig.from_preset("gpt2-small")
    cfg.train.num_workers = (2, 8)
    with pytest.raises(ConfigError) as e:
        check_batch(cfg)
    msg = str(e.value)
    assert msg.startswith("train.num_workers=2-8: the global batch 256")
    assert "holds on 1, 2, 4, 8 worker(s), not on 3, 5, 6, 7" in msg and "(1-2)" in msg and "(4, 8)" in msg
    assert accumulation_table(256, 32, 1, 2) == {1: 8, 2: 4}
    cfg.train.num_workers = (1, 2)
    check_batch(cfg)  # the course recipe's elastic range on 1-2 workers: accepted


def test_gpt2_small_with_3_workers_fails_on_the_batch_before_any_data_or_hub_read(tmp_path, capsys, monkeypatch):
    """Issue #21 §5: the batch/worker check comes before the data stage and before Ray starts.
    The corpus does not exist and the hub is off: reaching either would be another error."""
    import ray

    from training.run import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    code = main(["--preset", "gpt2-small", "--num-workers", "3", "--corpus", str(tmp_path / "no_such_corpus"),
                 "--valid-corpus", "huggingface-course/codeparrot-ds-valid", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: train.global_batch_size=256: not divisible by "
                                                   "train.micro_batch_size=32 x 3 workers = 96")
    assert not ray.is_initialized() and not out.exists()


def test_corpus_without_valid_corpus_splits_the_corpus_and_says_so(tmp_path, capsys):
    _, cfg = parse(["--preset", "gpt2-small", "--corpus", str(tmp_path)])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert cfg.data.valid_corpus is None and cfg.data.corpus == str(tmp_path)
    assert len(lines) == 1 and "--corpus without --valid-corpus" in lines[0]
    assert "huggingface-course/codeparrot-ds-valid" in lines[0] and "0.05 hash split" in lines[0]
    # Given both, or a preset without a validation corpus: nothing changes, nothing is said.
    _, cfg = parse(["--preset", "gpt2-small", "--corpus", str(tmp_path), "--valid-corpus", "v"])
    assert cfg.data.valid_corpus == "v"
    _, cfg = parse(["--preset", "tiny", "--corpus", str(tmp_path)])
    assert cfg.data.valid_corpus is None and capsys.readouterr().out == ""
    _, cfg = parse(["--preset", "gpt2-small"])
    assert cfg.data.valid_corpus == "huggingface-course/codeparrot-ds-valid"


def test_saved_world_size_counts_the_zero_shards_of_the_latest_tag(tmp_path):
    assert saved_world_size(tmp_path) is None  # not a DeepSpeed checkpoint
    (tmp_path / "latest").write_text("global_step6\n")
    tag = tmp_path / "global_step6"
    tag.mkdir()
    (tmp_path / "global_step4").mkdir()  # an older tag's shards do not count
    for r in range(3):
        (tmp_path / "global_step4" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    for r in range(2):
        (tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert saved_world_size(tmp_path) == 2
