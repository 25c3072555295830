"""Ray Train checkpoint -> a servable Hugging Face folder, and the run's summary.

The checkpoint may live on this machine or in cloud storage (`--storage-path s3://...`):
`Checkpoint.as_directory()` gives a local folder either way (a download when remote), so
the export never assumes the driver shares a disk with the workers.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Optional

from training.fim_format import write_fim_metadata

HF_SUBDIR = "checkpoint"  # RayTrainReportCallback.CHECKPOINT_NAME


def pick_checkpoint(result: Any) -> tuple[Any, dict[str, Any]]:
    """The kept checkpoint with the lowest eval loss (ties: the later step), else the latest."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if m and "eval_loss" in m]
    if scored:
        return min(scored, key=lambda cm: (float(cm[1]["eval_loss"]), -int(cm[1].get("step", 0))))
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint: nothing to export")
    return result.checkpoint, dict(result.metrics or {})


def zero_checkpoint_dir(src: Path) -> Optional[Path]:
    """The DeepSpeed checkpoint inside an HF checkpoint folder (global_stepN/ + `latest`)."""
    return src if (src / "latest").is_file() and any(src.glob("global_step*")) else None


def load_fp32_model(src: Path) -> Any:
    """The model with its fp32 master weights.

    Under bf16/fp16 the module weights HF saves are 16-bit roundings of the weights the
    optimizer keeps; the fp32 ones live in the ZeRO optimizer shards. DeepSpeed's
    zero_to_fp32 gathers them from all ranks' shards (every rank's shard is in the Ray Train
    checkpoint). Without a ZeRO checkpoint, the saved weights are loaded as fp32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ds_dir = zero_checkpoint_dir(src)
    if ds_dir is None:
        return AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(src)), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}  # tied to the input embedding
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"ZeRO checkpoint in {src} does not match the model: missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    return model


def export_model(checkpoint: Any, tokenizer_dir: str | Path, out_dir: str | Path,
                 fim_rate: float = 0.0, fim_spm_rate: float = 0.5) -> Path:
    """Write config.json + fp32 model.safetensors (+ generation config) + the tokenizer + fim.json
    (the data's FIM rate and format) to out_dir."""
    from training.data.tokenizer import load_tokenizer

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    with checkpoint.as_directory() as d:
        src = Path(d) / HF_SUBDIR
        if not (src / "config.json").is_file():
            raise RuntimeError(f"checkpoint {checkpoint.path} has no Hugging Face model under {HF_SUBDIR}/")
        model = load_fp32_model(src)
    model.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(tokenizer_dir).save_pretrained(str(out))
    write_fim_metadata(out, fim_rate, fim_spm_rate)
    return out


def smoke_generate(model_dir: str | Path, prompt: str = "def fibonacci(n):", max_new_tokens: int = 24) -> str:
    """Load the folder the way a user will (pipeline) and complete a prompt greedily: proves it
    serves. The prompt ends before the newline: the byte-level BPE merges a newline with the
    next line's indentation ("\n   " + " return"), so a prompt ending in a bare "\n" hands the
    model a token it saw only before blank or unindented lines, and a small model answers with
    blank lines (benchmarks/tiny_sweep.py counts both ways)."""
    from transformers import GenerationConfig, pipeline

    gen = pipeline("text-generation", model=str(model_dir), tokenizer=str(model_dir), device="cpu")
    # One GenerationConfig rather than keyword arguments, and no clean-up of spaces (a BPE
    # decodes its own spaces): both otherwise cost a transformers warning in the job's output.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=gen.tokenizer.eos_token_id)
    out = gen(prompt, generation_config=config, clean_up_tokenization_spaces=False)
    return out[0]["generated_text"]


def summarize(events: list[dict[str, Any]], *, workers: int, device: str, max_steps: int, tokens_per_step: int, wall_s: float,
              exported: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """run.json: what ran, how fast, how well. Built from metrics.jsonl's events."""
    logs = [e for e in events if e.get("event") == "log"]
    train_losses = [e for e in logs if "loss" in e]
    eval_losses = [e for e in logs if "eval_loss" in e]
    attempts = [e for e in events if e.get("event") == "attempt_start"]
    ends = [e for e in events if e.get("event") == "attempt_end"]
    final_step = max([int(e["step"]) for e in logs + ends] or [0])
    train_seconds = sum(float(e["seconds"]) for e in ends)
    trained_tokens = sum(int(e["tokens"]) for e in ends)
    final_eval = eval_losses[-1]["eval_loss"] if eval_losses else None
    return {
        "workers": workers,
        "device": device,
        # as the DeepSpeed engine that ran reported it (rank 0, attempt_start), not the config file
        "zero_stage": attempts[-1].get("zero_stage") if attempts else None,
        "compiled": attempts[-1].get("compiled") if attempts else None,  # torch.compile, likewise
        "param_dtype": attempts[-1].get("param_dtype") if attempts else None,  # the module's weights as trained
        "steps": final_step,
        "max_steps": max_steps,
        "tokens_per_step": tokens_per_step,
        "train_tokens": final_step * tokens_per_step,
        # tokens computed in the (last pieces of the) attempts that ended cleanly, over their time
        "tokens_per_s": round(trained_tokens / train_seconds, 1) if train_seconds > 0 else None,
        "final_train_loss": train_losses[-1]["loss"] if train_losses else None,
        "final_eval_loss": final_eval,
        "final_eval_perplexity": math.exp(min(final_eval, 50.0)) if final_eval is not None else None,
        # world size and grad-accum per attempt: an elastic run's restarts may differ in both
        "attempts": [{"start_step": int(a["start_step"]), "world_size": a.get("world_size"),
                      "gradient_accumulation_steps": a.get("gradient_accumulation_steps")} for a in attempts],
        # the step the last attempt started from: > 0 after a restart or --resume
        "resumed_from_step": int(attempts[-1]["start_step"]) if attempts else 0,
        "train_seconds": round(train_seconds, 3),
        "wall_time_s": round(wall_s, 3),
        "exported": exported or {},
    }


def write_json(path: str | Path, obj: dict[str, Any]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    return p
