"""Serve a checkpoint: `python serving/run.py --checkpoint runs/tiny/model [--host 127.0.0.1] [--port 8000]`.

Checks the checkpoint (fails in a second, naming it, before any Ray work), joins the Ray
cluster in RAY_ADDRESS or starts a local one, starts Serve's HTTP proxy on host:port,
deploys the completion app, prints its URL and serves until Ctrl-C / SIGTERM.
With `--ingress direct` each replica also serves HTTP itself, with no proxy in between
(Ray Serve's throughput-optimised mode, serving/deployment/ingress.py): the URLs it prints after
"replicas:" answer the same API without the proxy's per-request cost (docs/serving.md).
For clusters, `serve deploy serving/config.yaml` does the same from a config file.

The flags are the fields of ServeConfig (serving/serve_config.py), their help its docstrings.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

# `python serving/run.py` puts serving/ on sys.path, not the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.deployment.ingress import cluster_has_direct_ingress, replica_urls, use_direct_ingress  # noqa: E402
from serving.engine.engine import CheckpointError, check_checkpoint  # noqa: E402
from serving.serve_config import DEFAULTS, ServeConfig  # noqa: E402
from training.config.cli import add_config_flags, flag, overrides  # noqa: E402
from training.config.fields import ConfigError, set_field  # noqa: E402

APP_NAME = "complete"


def parse(argv: list[str] | None = None) -> ServeConfig:
    """argv -> a validated ServeConfig; a bad value exits 2 with a message naming its flag."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(ap, ServeConfig)
    for action in ap._actions:  # the help says each default, from the one place it is set
        default = getattr(DEFAULTS, action.dest, None)
        if default is not None:
            action.help = f"{action.help} (default: {default:g})" if isinstance(default, float) else \
                f"{action.help} (default: {default})"
    args = ap.parse_args(argv)
    cfg = ServeConfig()
    try:
        for name, value in overrides(args, ServeConfig).items():
            set_field(cfg, name, value, flag(name))
        return cfg.validate()
    except ConfigError as e:
        ap.error(str(e))


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    try:
        checkpoint = check_checkpoint(Path(str(cfg.checkpoint)).expanduser().resolve())
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    joined = bool(os.environ.get("RAY_ADDRESS"))
    if cfg.ingress == "direct" and not joined:
        use_direct_ingress()  # before Ray starts and before ray.serve loads

    from ray import serve

    from serving.deployment.engine_choice import (choose_engine, cluster_gpus, cpu_has_native_bf16, model_params,
                                                  replica_gpus, vllm_installed)
    from serving.deployment.replica import Completer, deploy_options, key_env
    from training.ray_utils import init_ray

    init_ray()
    if cfg.ingress == "direct" and joined and not cluster_has_direct_ingress():
        print("error: --ingress direct: this cluster's workers do not have RAY_SERVE_THROUGHPUT_OPTIMIZED=1; "
              "start it with `RAY_SERVE_THROUGHPUT_OPTIMIZED=1 ray start ...` on every node", file=sys.stderr)
        return 2
    try:
        engine = choose_engine(cfg.engine, cluster_gpus(), vllm_installed(), model_params(str(checkpoint)),
                               cpu_has_native_bf16())
    except ValueError as e:
        print(f"error: --engine: {e}", file=sys.stderr)
        return 2
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    opts = deploy_options(num_cpus=cfg.num_cpus, num_replicas=cfg.num_replicas, env_vars=key_env(),
                          num_gpus=replica_gpus(engine, cfg.num_gpus, cluster_gpus()),
                          max_batch_size=cfg.max_batch_size, max_queued=cfg.max_queued)
    app = Completer.options(**opts).bind(
        checkpoint=str(checkpoint), model_name=cfg.model_name, num_threads=cfg.torch_threads,
        max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_s,
        stream_interval_s=cfg.stream_interval_s, engine=engine, dtype=cfg.dtype,
        max_queued=cfg.max_queued, retry_after_s=cfg.retry_after_s)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    auth = "on (Authorization: Bearer $COMPLETE_API_KEY)" if key_env() else "off"
    print(f"serving {checkpoint} at http://{host}:{cfg.port} on the {engine} engine  (POST /complete, /v1/completions; "
          f"auth {auth}; Ctrl-C to stop)", flush=True)
    if cfg.ingress == "direct":
        print("replicas: " + " ".join(replica_urls(APP_NAME, bind_host=cfg.host)), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    print("stopping", flush=True)
    if joined:
        serve.delete(APP_NAME)  # leave the cluster's other apps and Serve itself alone
    else:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
