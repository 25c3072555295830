"""The Ray Serve side of serving: the replica (one engine behind the FastAPI app), its ingress
modes, its Prometheus metrics and its malloc settings.

`serving.deployment:build` is the import path `serve run` / `serve deploy` take. It is
resolved lazily so that `serving.deployment.ingress` can be imported (and set the
throughput-optimised environment) before Ray Serve itself loads.
"""

from typing import Any

__all__ = ["build", "Completer", "deploy_options", "key_env"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from serving.deployment import replica

        return getattr(replica, name)
    raise AttributeError(f"module 'serving.deployment' has no attribute {name!r}")
