"""A real local Ray head for tests, started with `ray start --head` on 127.0.0.1.

Several of these can run at once on one machine (free ports, own temp dir), and stopping
one never touches another: the head runs under `--block` in its own process group and is
stopped by signalling that group, not by `ray stop` (which kills every Ray on the box).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

from tests.support import REPO_ROOT
from tests.support.servers import free_port
RAY = str(Path(sys.executable).with_name("ray"))



class LocalRayHead:
    def __init__(self, num_cpus: int = 4, extra_args: Optional[list[str]] = None,
                 env: Optional[dict[str, str]] = None):
        self.num_cpus = num_cpus
        self.port = free_port()
        self.dashboard_port = free_port()
        self.extra_args = extra_args or []
        # Short path: Ray's unix sockets live under it and must stay < 108 chars.
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        # Token auth on, as Ray 2.60 recommends: a token of this head's own (so heads of
        # parallel tests don't share ~/.ray/auth_token); every client gets it in cli().
        token = Path(self.temp_dir) / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.token = token.read_text()
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO_ROOT),
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    # `python` in a job's entrypoint must be this interpreter (the venv's)
                    "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
                    **(env or {})}
        self.proc: Optional[subprocess.Popen] = None
        self.log = Path(self.temp_dir) / "ray_start.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout: float = 90) -> "LocalRayHead":
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
               f"--num-cpus={self.num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
               # the job agent's port is fixed (52365) by default: two heads at once collide
               f"--dashboard-agent-listen-port={free_port()}",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats", *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:  # up means: the dashboard's State API lists the head's raylet as ALIVE
                if self._node_alive():
                    return self
            except Exception:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"Ray head not up in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def _node_alive(self) -> bool:
        """Whether the State API lists an ALIVE node. The job API alone came up before the
        raylet had registered on a loaded box, and a driver joining then failed with "No node
        info found matching attributes"."""
        req = urllib.request.Request(f"{self.dashboard_url}/api/v0/nodes?limit=10",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            nodes = json.loads(r.read())["data"]["result"]["result"]
        return any(n.get("state") == "ALIVE" for n in nodes)

    def cli(self, *args: str, timeout: float = 600, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
        """Run a `ray` subcommand against this head (e.g. `job submit`)."""
        full_env = {**self.env, "RAY_ADDRESS": self.address, **(env or {})}
        if args and args[0] == "job":
            full_env["RAY_ADDRESS"] = self.dashboard_url
        return subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout,
                              env=full_env, cwd=REPO_ROOT)

    def submit(self, *entrypoint: str, timeout: float = 600, working_dir: str = ".") -> subprocess.CompletedProcess:
        """`ray job submit --working-dir . -- ENTRYPOINT`, waiting for the job to end."""
        return self.cli("job", "submit", "--working-dir", working_dir, "--runtime-env-json",
                        json.dumps({"excludes": [".venv", "runs", ".git", "*.egg-info"]}),
                        "--", *entrypoint, timeout=timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        # Anything of this head still alive (raylet, gcs, workers) shares its temp dir.
        subprocess.run(["pkill", "-9", "-f", self.temp_dir], check=False)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None

    def __enter__(self) -> "LocalRayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
