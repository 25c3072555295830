"""Engine benchmark: `python benchmarks/engines.py [--checkpoint DIR ...]` (also
`benchmarks/serve.py --engines`), one JSON line.

In one invocation, on the same checkpoints, with vLLM's benchmark client's request shape
(a streamed /v1/completions, `ignore_eos`, `repetition_penalty` 1.0, `stream_options`):
  - plain `vllm serve` (the baseline),
  - this service on the vLLM engine (serving/run.py --engine vllm, default proxy ingress),
  - this service on the native engine (fp32 only: it computes in the checkpoint's fp32),
at concurrency 1, 8 and 32, 16- and 64-token completions, fp32 and (where the CPU has
avx512_bf16 / amx_bf16) bf16: completion tokens/s and p50 latency per row, failed requests,
and the ratios the issue's targets name (service on vLLM / plain vLLM at c8 and c32).
Without --checkpoint, `--models` (default `tiny,12x768`): `tiny` is the tiny preset's shape
trained 60 steps by the tests' trainer, `LxD` a random-init GPT-2 of L layers D wide (D/64
heads, context 1,024) with tiny's tokenizer; `12x768` is reported as `gpt2-small-shape`. Step
times do not depend on the weights, so a shape between the two locates the crossover of
`--engine auto` (serving/deployment/engine_choice.py). Each row carries the model's parameter
count. Each server is started as a subprocess on a free loopback port and stopped before the
next; its output goes to a log file in a temporary folder (named on stderr); a server that
fails gives an entry in `server_errors` with its log's last line, and the run goes on.

Bounding a run: a row sends `--requests-per-worker` x concurrency requests (after one warm-up
request per worker). The default matrix (2 models x 3 servers x 2 lengths x 3 concurrencies,
fp32) spends most of its time on the gpt2-small shape and in vLLM's start-up (its
torch.compile); on 2 cores, `--requests-per-worker 2` is what fits a run into minutes
(benchmarks/RESULTS.md gives a run's wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT = "def read_config(path):\n    with open(path) as f:\n        data = json.load(f)\n    return "


def random_shape(tokenizer_from: Path, out: Path, n_layer: int = 12, n_embd: int = 768) -> Path:
    """A random-init GPT-2 of that shape (gpt2-small's by default: 12 x 768, 12 heads, context
    1,024) saved with `tokenizer_from`'s tokenizer: step times do not depend on the weights."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(tokenizer_from))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=1024, n_layer=n_layer, n_head=max(1, n_embd // 64),
                     n_embd=n_embd, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            rc = proc.returncode  # a signal's name says more than -4 (SIGILL: a kernel this CPU lacks)
            how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with {rc}"
            raise RuntimeError(f"server {how} before it was healthy")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


def start(server: str, checkpoint: Path, dtype: str, port: int, name: str, cpus: int, log: Path) -> subprocess.Popen:
    from serving.engine.vllm_engine import cpu_environment

    env = {**os.environ, **cpu_environment(cpus)}
    if server == "vllm-serve":
        ctx = json.loads((checkpoint / "config.json").read_text())["n_positions"]
        cmd = [sys.executable, str(REPO / "benchmarks" / "vllm_cli.py"), "serve", str(checkpoint), "--port", str(port),
               "--host", "127.0.0.1", "--dtype", dtype, "--max-model-len", str(ctx), "--enable-prefix-caching",
               "--served-model-name", name, "--max-num-seqs", "64"]
    else:
        cmd = [sys.executable, str(REPO / "serving" / "run.py"), "--checkpoint", str(checkpoint), "--port", str(port),
               "--engine", server, "--dtype", dtype, "--model-name", name, "--num-cpus", str(cpus)]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    return lines[-1][-300:] if lines else ""


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def load(url: str, name: str, tokens: int, concurrency: int, per_worker: int) -> dict:
    from serving.loadtest import run_load, summarize

    def body(i: int) -> dict:
        return {"model": name, "prompt": f"# request {i}\n" + PROMPT, "max_tokens": tokens, "repetition_penalty": 1.0,
                "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    run_load(url, body, concurrency, concurrency, path="/v1/completions", stream=True, timeout_s=600)  # warm
    results, wall = run_load(url, body, concurrency * per_worker, concurrency, path="/v1/completions",
                             stream=True, timeout_s=600)
    s = summarize(results, wall)
    return {k: s[k] for k in ("tokens_per_s", "p50_s", "ttft_p50_s", "requests", "ok") if k in s}


def main() -> int:
    from serving.deployment.engine_choice import model_params
    from serving.engine.dtypes import cpu_flags, resolve_dtype
    from tests.support.servers import free_port

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=None, help="repeat for several (default: --models)")
    ap.add_argument("--models", default="tiny,12x768", help="without --checkpoint: tiny (trained) and LxD random-init shapes")
    ap.add_argument("--servers", default="vllm-serve,vllm,native")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--tokens", default="16,64")
    ap.add_argument("--dtypes", default="auto", help="comma list; auto: float32, and bfloat16 where the CPU has it")
    ap.add_argument("--requests-per-worker", type=int, default=4, help="a row's requests per concurrent client")
    ap.add_argument("--num-cpus", type=int, default=1, help="CPUs of the service's replica / vLLM's threads")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="engines-bench-"))
    if args.checkpoint:
        checkpoints = {Path(c).name if Path(c).name != "model" else Path(c).parent.name: Path(c) for c in args.checkpoint}
    else:
        from benchmarks.serve import stand_in_checkpoint

        tiny = stand_in_checkpoint(tmp / "tiny" / "model")
        checkpoints = {}
        for m in args.models.split(","):
            if m == "tiny":
                checkpoints[m] = tiny
            else:
                layers, width = (int(x) for x in m.split("x"))
                name = "gpt2-small-shape" if (layers, width) == (12, 768) else m
                checkpoints[name] = random_shape(tiny, tmp / m / "model", layers, width)
    dtypes = ["float32"] + (["bfloat16"] if resolve_dtype("auto", "cpu", cpu_flags=cpu_flags()) == "bfloat16" else []) \
        if args.dtypes == "auto" else args.dtypes.split(",")
    conc, toks = [int(c) for c in args.concurrency.split(",")], [int(t) for t in args.tokens.split(",")]
    rows, errors = [], []
    print(f"server logs: {tmp}", file=sys.stderr, flush=True)
    for model, ckpt in checkpoints.items():
        params = model_params(str(ckpt))
        for dtype in dtypes:
            for server in args.servers.split(","):
                if server == "native" and dtype != "float32":
                    continue
                port = free_port()
                url, t0 = f"http://127.0.0.1:{port}", time.perf_counter()
                log = tmp / f"{model}-{dtype}-{server}.log"
                proc = start(server, ckpt, dtype, port, model, args.num_cpus, log)
                try:
                    wait_healthy(url, proc)
                    startup = round(time.perf_counter() - t0, 1)
                    for t in toks:
                        for c in conc:
                            rows.append({"model": model, "params": params, "dtype": dtype, "server": server,
                                         "tokens": t, "concurrency": c, "startup_s": startup,
                                         **load(url, model, t, c, args.requests_per_worker)})
                            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                except (RuntimeError, TimeoutError, OSError) as e:  # this server only: the others still run
                    errors.append({"model": model, "dtype": dtype, "server": server,
                                   "error": f"{e}; log: {last_line(log)}"})
                    print(json.dumps(errors[-1]), file=sys.stderr, flush=True)
                finally:
                    stop(proc)
    def tps(**k):
        return next((r["tokens_per_s"] for r in rows if all(r[a] == b for a, b in k.items())), None)
    ratios = {}
    for model in checkpoints:
        for dtype in dtypes:
            for c in (8, 32):
                for t in toks:
                    base, ours = tps(model=model, dtype=dtype, server="vllm-serve", concurrency=c, tokens=t), \
                        tps(model=model, dtype=dtype, server="vllm", concurrency=c, tokens=t)
                    if base and ours:
                        ratios[f"{model}_{dtype}_{t}_c{c}_service_vllm_over_vllm_serve"] = round(ours / base, 3)
        # The crossover of --engine auto: the native engine over the vLLM engine, same service, same ingress.
        for c in conc:
            for t in toks:
                native, ours = tps(model=model, server="native", concurrency=c, tokens=t), \
                    tps(model=model, dtype="float32", server="vllm", concurrency=c, tokens=t)
                if native and ours:
                    ratios[f"{model}_float32_{t}_c{c}_native_over_service_vllm"] = round(native / ours, 3)
    print(json.dumps({"benchmark": "engines", "models": {m: model_params(str(c)) for m, c in checkpoints.items()},
                      "dtypes": dtypes, "requests_per_worker": args.requests_per_worker, "rows": rows,
                      "ratios": ratios, "failed_requests": sum(r["requests"] - r["ok"] for r in rows),
                      "server_errors": errors,
                      "host": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
