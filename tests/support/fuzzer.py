"""schemathesis over a running service's OpenAPI schema, with every check (the suite's fuzzer)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

CONFIG = Path(__file__).with_name("schemathesis.toml")


def fuzz(schema_url: str, seed: int, examples: int, workdir: Path, headers: tuple[str, ...] = ()) -> tuple[int, str]:
    """schemathesis with every check over every route of the running service; (cases, output)."""
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", schema_url, "--checks", "all", "--seed", str(seed),
           "--max-examples", str(examples), "--workers", "8", "--generation-database", "none",
           "--suppress-health-check", "all", "--request-timeout", "60", "--no-color"]
    for h in headers:
        cmd += ["-H", h]
    # cwd: schemathesis keeps a cache folder (.schemathesis/) where it runs.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=workdir)
    out = proc.stdout + proc.stderr
    cases = re.search(r"(\d+) generated", out)
    # A failing case's curl line can hold a megabyte of body: shorten lines, not the report.
    short = "\n".join(line if len(line) <= 400 else line[:400] + f" ...[{len(line)} chars]" for line in out.splitlines())
    assert proc.returncode == 0 and cases, f"schemathesis (seed {seed}) found problems:\n{short[-12000:]}"
    return int(cases.group(1)), out
