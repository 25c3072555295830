"""Checkpoint -> servable HF folder, checkpoint choice, and run.json's summary."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import pytest

from training.export.checkpoint import export_model, pick_checkpoint, smoke_generate, summarize, write_json


@dataclass
class _Result:  # the two fields of ray.train.Result that pick_checkpoint reads
    checkpoint: Any
    metrics: dict
    best_checkpoints: Optional[list] = None


def test_pick_checkpoint_prefers_lowest_eval_loss_then_later_step():
    best = pick_checkpoint(_Result("latest", {"step": 30}, [("a", {"eval_loss": 3.0, "step": 10}),
                                                           ("b", {"eval_loss": 2.5, "step": 20}),
                                                           ("c", {"eval_loss": 2.5, "step": 30})]))
    assert best[0] == "c"
    assert pick_checkpoint(_Result("latest", {"step": 5}, []))[0] == "latest"
    with pytest.raises(RuntimeError, match="without a checkpoint"):
        pick_checkpoint(_Result(None, {}, []))


def test_export_from_a_ray_checkpoint_gives_a_folder_pipeline_loads(tiny_checkpoint, tmp_path):
    import ray.train
    from transformers import AutoModelForCausalLM

    # A Ray Train checkpoint laid out as RayTrainReportCallback writes it: <ckpt>/checkpoint/
    ckpt_dir = tmp_path / "ray_ckpt"
    shutil.copytree(tiny_checkpoint, ckpt_dir / "checkpoint")
    for f in ("tokenizer.json", "tokenizer_config.json"):  # training checkpoints carry no tokenizer
        (ckpt_dir / "checkpoint" / f).unlink(missing_ok=True)
    out = export_model(ray.train.Checkpoint.from_directory(str(ckpt_dir)), tiny_checkpoint, tmp_path / "model",
                       fim_rate=0.5, fim_spm_rate=0.25)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    fim = json.loads((out / "fim.json").read_text())  # the service reads whether it can infill
    assert fim["fim_rate"] == 0.5 and fim["fim_spm_rate"] == 0.25 and fim["format"] == "starcoder"
    assert fim["tokens"]["middle"] == "<fim_middle>"
    assert (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.n_positions == 128
    text = smoke_generate(out, prompt="def add(a, b):\n", max_new_tokens=8)
    assert text.startswith("def add(a, b):\n") and len(text) > len("def add(a, b):\n")


def test_export_rejects_a_checkpoint_without_a_model(tmp_path):
    import ray.train

    (tmp_path / "empty" / "checkpoint").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="no Hugging Face model"):
        export_model(ray.train.Checkpoint.from_directory(str(tmp_path / "empty")), tmp_path, tmp_path / "m")


def test_summary_reports_attempts_losses_and_speed(tmp_path):
    events = [
        {"event": "attempt_start", "start_step": 0, "zero_stage": 2},
        {"event": "log", "step": 2, "loss": 5.0},
        {"event": "log", "step": 4, "eval_loss": 4.5},
        {"event": "attempt_start", "start_step": 4, "zero_stage": None},
        {"event": "log", "step": 6, "loss": 4.0},
        {"event": "log", "step": 6, "eval_loss": 4.2},
        {"event": "attempt_end", "start_step": 4, "step": 6, "seconds": 2.0, "tokens": 4096},
    ]
    s = summarize(events, workers=2, device="cpu", max_steps=6, tokens_per_step=2048, wall_s=9.5)
    assert s["steps"] == 6 and s["train_tokens"] == 6 * 2048
    assert s["tokens_per_s"] == 2048.0
    assert s["final_train_loss"] == 4.0 and s["final_eval_loss"] == 4.2
    assert abs(s["final_eval_perplexity"] - 66.686) < 0.01
    assert [a["start_step"] for a in s["attempts"]] == [0, 4] and s["resumed_from_step"] == 4
    p = write_json(tmp_path / "run.json", s)
    assert '"zero_stage": null' in p.read_text()  # from the engine's last attempt_start, which had none
