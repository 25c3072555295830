"""Append a benchmark's JSON line to benchmarks/RESULTS.md as one row of its log.

    .venv/bin/python benchmarks/serve.py | tee /dev/stderr | .venv/bin/python benchmarks/record.py
    .venv/bin/python benchmarks/record.py run.json --note "idle machine, --repeats 5"

Reads the last line of the input (a file, or stdin) that is a JSON object with a
"benchmark" key, and appends to RESULTS.md's "Log" table a row with the date (UTC), the
commit (`git rev-parse --short HEAD`, "+dirty" when the tree has uncommitted changes), the
machine (CPU model, cores, and the flags that decide the speed of this project's kernels,
read from /proc/cpuinfo; the GPU when torch sees one), the benchmark's headline figures and
the note. The whole line, with the same metadata, is appended to results.jsonl beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The flags the figures depend on: bf16 matmuls are fast only with avx512_bf16 or AMX.
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
LOG_HEADING = "## Log"
LOG_HEADER = ("| date (UTC) | commit | machine | benchmark | headline figures | note |\n"
              "|---|---|---|---|---|---|\n")


def cpu(cpuinfo: str = "/proc/cpuinfo") -> dict:
    fields: dict[str, str] = {}
    try:
        for line in Path(cpuinfo).read_text().splitlines():  # the first processor's block
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name") or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "cpu_flags": [f for f in FLAGS if f in flags]}


def gpu() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except (ImportError, RuntimeError):  # no torch, or a broken driver: the row says no GPU
        return None
    return None


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dig(d: dict, path: str):
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def headline(r: dict) -> str:
    """The figures each benchmark's targets are about, as `name value` pairs."""
    name = r.get("benchmark")
    if name == "tokenize":  # benchmarks/data_stage.py
        keys = ["ratio", "ours_kept_tokens_per_s_after_start", "best_ratio_possible", "chunks_agree", "files"]
    elif name == "data_stage":  # benchmarks/data_stage.py since dedup
        keys = ["corpus", "corpus_mb", "files"] + [f"ratio.{m}" for m in ("off", "exact", "near")] + [
            f"modes.{m}.{k}" for m in ("off", "exact", "near") for k in ("seconds", "peak_rss_mb")] + [
            "seed_seconds", "seed_peak_rss_mb", "near_share_of_time", "dedup_share_of_time", "repeats", "ratio_runs"]
    elif name == "train":
        keys = ["precision", "steps", "repeats"] + [
            f"{v}.{k}" for v in ("eager", "compile") if v in r
            for k in ("median_ratio", "ratio_range", "median_tokens_per_s.distributed",
                      "median_mfu_of_fp32_matmul", "median_final_eval_loss")] + [
            "weak_scaling.efficiency", "weak_scaling.one_worker_tokens_per_s", "weak_scaling.n_workers_tokens_per_s"]
    elif name == "serve":
        keys = ["ingress", "repeats", "checkpoint_source"] + [f"targets.{t}.value" for t in r.get("targets", {})]
        keys += ["targets.sampled_over_greedy_tokens_per_s_c32_64.ending_at_eos.value",
                 "direct_over_proxy.sampled_16_c32", "meets_targets"]
    elif name == "tiny_sweep":
        keys = ["precision", "best", "best_final_eval_loss", "best_looks_like_code", "best_looks_like_code_healed",
                "wall_s"]
    elif name == "engines":
        keys = ["models", "dtypes", "requests_per_worker", "failed_requests"] + [
            f"ratios.{k}" for k in r.get("ratios", {})]
    elif name == "bf16_agreement":
        keys = ["checkpoint_source", "prompts", "tokens", "token_agreement", "prefix_agreement",
                "identical_completions", "teacher_forced_agreement", "meets_target"]
    elif name == "fim":
        keys = ["model", "runs.fim_rate_0.final_eval_loss_l2r", "runs.fim_rate_0.5.final_eval_loss_l2r",
                "l2r_eval_loss_delta", "problems"]
    else:
        keys = [k for k, v in r.items() if isinstance(v, (int, float, str, bool)) and k != "benchmark"][:8]
    parts = []
    for k in keys:
        # fim's run names hold a dot ("fim_rate_0.5"): look those up whole
        v = dig(r, k) if not k.startswith("runs.") else dig(r.get("runs", {}).get(k[5:k.rindex(".")], {}),
                                                            k[k.rindex(".") + 1:])
        if v is not None:
            parts.append(f"{k.removeprefix('targets.').removesuffix('.value')} {json.dumps(v)}")
    if "load_avg_1m" in r or "load_avg_1m" in r.get("host", {}):
        parts.append(f"load_avg_1m {r.get('load_avg_1m', r.get('host', {}).get('load_avg_1m'))}")
    return "; ".join(parts)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", nargs="?", help="a file holding the benchmark's output (default: stdin)")
    ap.add_argument("--note", default="", help="what the row cannot say itself: load, flags given, ...")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--jsonl", default=str(HERE / "results.jsonl"))
    a = ap.parse_args()

    text = Path(a.input).read_text() if a.input else sys.stdin.read()
    result = None
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "benchmark" in obj:
            result = obj
    if result is None:
        print("error: no JSON line with a \"benchmark\" key in the input", file=sys.stderr)
        return 1

    machine = cpu()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "commit": commit(), **machine, "gpu": gpu(), "note": a.note}
    where = f"{machine['cpu_model']}, {machine['cores']} cores, {' '.join(machine['cpu_flags']) or 'no AVX2'}"
    where += f", {meta['gpu']}" if meta["gpu"] else ", no GPU"
    row = "| " + " | ".join(cell(x) for x in (
        meta["date"], meta["commit"], where, result["benchmark"], headline(result), a.note)) + " |\n"

    results = Path(a.results)
    doc = results.read_text() if results.exists() else "# Benchmark results\n"
    if LOG_HEADING + "\n" not in doc:
        doc = doc.rstrip("\n") + f"\n\n{LOG_HEADING}\n\nRows appended by `benchmarks/record.py`.\n\n{LOG_HEADER}"
    results.write_text(doc.rstrip("\n") + "\n" + row)  # the log is the file's last section
    with open(a.jsonl, "a") as f:
        f.write(json.dumps({**meta, "result": result}) + "\n")
    print(row, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
