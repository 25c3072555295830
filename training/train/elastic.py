"""Resuming on another world size: the ZeRO-2 optimizer state, re-sharded through DeepSpeed's
universal checkpoint.

An elastic run (`--num-workers MIN-MAX`) restarts from its latest checkpoint with however
many workers the cluster can hold. ZeRO-2 saves one optimizer shard per rank (its slice of
the fp32 master weights and of Adam's two moments, as one flat buffer per parameter group,
padded for that world size), and DeepSpeed's normal load refuses shards written by another
world size. So when the checkpoint's shard count is not this attempt's world size, each rank
converts the checkpoint to DeepSpeed's *universal* format (`ds_to_universal`: one folder per
parameter holding its full fp32 weight, exp_avg, exp_avg_sq and the step) and loads it with
`checkpoint.load_universal`, which slices each parameter for the new partitioning. Weights,
both moments and Adam's step come back exactly; the scheduler and the step count come from
the same checkpoint (HF's trainer_state.json and DeepSpeed's model states).

Why this and not the alternatives (docs/training.md, "Elastic workers"): ZeRO's
`elastic_checkpoint` option re-partitions in the optimizer, but DeepSpeed's engine refuses a
changed data-parallel size before getting there; re-sharding the fp32 master weights by hand
would drop Adam's moments or copy DeepSpeed's private flat-buffer layout into this project.
The universal format is DeepSpeed's own, versioned, and what it documents for this case.

Cost: the conversion reads the whole optimizer state once per rank (three fp32 copies of the
model) and only on an attempt whose world size differs from the checkpoint's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path
from typing import Any, Optional

SHARD = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def latest_tag(hf_checkpoint: str | Path) -> Optional[str]:
    """DeepSpeed's tag (global_stepN) of an HF checkpoint folder, from its `latest` file."""
    latest = Path(hf_checkpoint, "latest")
    return latest.read_text().strip() if latest.is_file() else None


def saved_world_size(hf_checkpoint: str | Path) -> Optional[int]:
    """How many ranks wrote the ZeRO optimizer shards of this checkpoint (None: no shards)."""
    tag = latest_tag(hf_checkpoint)
    if tag is None:
        return None
    ranks = {int(m.group(1)) for f in Path(hf_checkpoint, tag).glob("*optim_states.pt") if (m := SHARD.search(f.name))}
    return len(ranks) or None


def universal_checkpoint(hf_checkpoint: str | Path, work_dir: str | Path) -> str:
    """A copy of the HF checkpoint folder (links to its files) with the DeepSpeed checkpoint
    converted to the universal format, and `latest_universal` naming it. The source is never
    written to (it may be Ray Train's storage itself)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    src, dst = Path(hf_checkpoint), Path(work_dir)
    tag = latest_tag(src)
    if tag is None:
        raise FileNotFoundError(f"{src}: no DeepSpeed `latest` file, not a ZeRO checkpoint")
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():  # trainer_state.json, rng states, model weights, tokenizer...
        link = dst / entry.name
        if not link.exists():
            link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    universal = f"{tag}_universal"
    args = argparse.Namespace(input_folder=str(src / tag), output_folder=str(dst / universal),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True,
                              # HF's engine does not record Megatron's parallelism info; for a
                              # plain data-parallel model the defaults it injects are right.
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints, once per rank
        ds_to_universal(args)
    (dst / "latest_universal").write_text(universal)
    return str(dst)


def use_universal_checkpoint(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config that loads a universal checkpoint."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def optimizer_state_summary(engine: Any, world: int) -> Optional[dict[str, float]]:
    """Sums over the whole optimizer state, the same on any world size: squared norms of the
    fp32 master weights and of Adam's moments (each rank holds a slice; padding is zeros) and
    Adam's step. Equal before a save and after the load on another world size = restored.
    Collective: every rank must call it."""
    import torch
    import torch.distributed as dist

    zero = getattr(engine, "optimizer", None)
    base = getattr(zero, "optimizer", None)
    if base is None or not hasattr(zero, "single_partition_of_fp32_groups"):
        return None
    sums = torch.zeros(3, dtype=torch.float64)
    step = 0.0
    for flat in zero.single_partition_of_fp32_groups:
        sums[0] += flat.detach().double().pow(2).sum()
        state = base.state.get(flat, {})
        for i, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
            if key in state:
                sums[i] += state[key].detach().double().pow(2).sum()
        if "step" in state:
            step = float(state["step"])
    if world > 1 and dist.is_initialized():
        dist.all_reduce(sums)
    return {"master_sq": float(sums[0]), "exp_avg_sq_norm": float(sums[1]), "exp_avg_sq_sq": float(sums[2]),
            "adam_step": step}


def stale_uploads(run_name: str, rank: int, tmp: Optional[str] = None) -> list[Path]:
    """Staging folders of this rank left by an attempt killed during an upload."""
    import tempfile

    return sorted(Path(tmp or tempfile.gettempdir()).glob(f"codecomplete_{run_name}_upload_rank{rank}_*"))


def upload_prefix(run_name: str, rank: int) -> str:
    return f"codecomplete_{run_name}_upload_rank{rank}_"


