"""Serve a checkpoint: `python serving/run.py --checkpoint runs/tiny/model [--host 127.0.0.1] [--port 8000]`.

Checks the checkpoint (fails in a second, naming it, before any Ray work), joins the Ray
cluster in RAY_ADDRESS or starts a local one, starts Serve's HTTP proxy on host:port,
deploys the completion app, prints its URL and serves until Ctrl-C / SIGTERM.
With `--ingress direct` each replica also serves HTTP itself, with no proxy in between
(Ray Serve's throughput-optimised mode, serving/deployment/ingress.py): the URLs it prints after
"replicas:" answer the same API, with 2.4x the requests/s on 2 cores (docs/serving.md).
For clusters, `serve deploy serving/config.yaml` does the same from a config file.
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

from serving.engine.engine import CheckpointError, check_checkpoint  # noqa: E402
from serving.deployment.ingress import INGRESS_MODES, cluster_has_direct_ingress, replica_urls, use_direct_ingress  # noqa: E402

APP_NAME = "complete"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the training run's OUTPUT/model/ folder")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--num-replicas", type=int, default=1)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica (= torch threads)")
    ap.add_argument("--max-batch-size", type=int, default=64, help="rows decoding together in a replica")
    ap.add_argument("--batch-wait-ms", type=float, default=0.0,
                    help="how long a request that finds the decode loop idle waits for company (0: none)")
    ap.add_argument("--stream-interval-ms", type=float, default=20.0,
                    help="a streamed request's text after the first goes out at most this often (0: every step)")
    ap.add_argument("--ingress", choices=INGRESS_MODES, default="proxy",
                    help="proxy: all requests through Serve's HTTP proxy; direct: each replica also serves "
                         "HTTP on its own port (a local cluster is started that way; a joined one must be)")
    ap.add_argument("--model-name", default=None, help="name in responses and /v1/models (default: run folder)")
    args = ap.parse_args(argv)
    for name in ("num_replicas", "max_batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.port < 65536:
        ap.error("--port must be in 1..65535")
    if args.num_cpus <= 0 or args.batch_wait_ms < 0 or args.stream_interval_ms < 0:
        ap.error("--num-cpus must be > 0, --batch-wait-ms and --stream-interval-ms >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        checkpoint = check_checkpoint(Path(args.checkpoint).expanduser().resolve())
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    joined = bool(os.environ.get("RAY_ADDRESS"))
    if args.ingress == "direct" and not joined:
        use_direct_ingress()  # before Ray starts and before ray.serve loads

    from ray import serve

    from serving.deployment.replica import Completer, deploy_options, key_env
    from training.ray_utils import init_ray

    init_ray()
    if args.ingress == "direct" and joined and not cluster_has_direct_ingress():
        print("error: --ingress direct: this cluster's workers do not have RAY_SERVE_THROUGHPUT_OPTIMIZED=1; "
              "start it with `RAY_SERVE_THROUGHPUT_OPTIMIZED=1 ray start ...` on every node", file=sys.stderr)
        return 2
    serve.start(http_options={"host": args.host, "port": args.port})
    opts = deploy_options(num_cpus=args.num_cpus, num_replicas=args.num_replicas, env_vars=key_env())
    app = Completer.options(**opts).bind(
        checkpoint=str(checkpoint), model_name=args.model_name, num_threads=max(1, int(args.num_cpus)),
        max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000.0,
        stream_interval_s=args.stream_interval_ms / 1000.0)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    auth = "on (Authorization: Bearer $COMPLETE_API_KEY)" if key_env() else "off"
    print(f"serving {checkpoint} at http://{host}:{args.port}  (POST /complete, /v1/completions; "
          f"auth {auth}; Ctrl-C to stop)", flush=True)
    if args.ingress == "direct":
        print("replicas: " + " ".join(replica_urls(APP_NAME, bind_host=args.host)), flush=True)

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
