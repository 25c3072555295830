"""Real corpora for tests: files from the interpreter's standard library, in the forms users give."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(n: int) -> list[Path]:
    """n real, deterministic, medium-sized Python files from the standard library."""
    files = sorted(p for p in STDLIB.glob("*.py") if 2_000 < p.stat().st_size < 60_000)
    return files[:n]


def write_codeparrot_parquet(path: Path, files: list[Path], row_group_size: int = 4) -> Path:
    """A CodeParrot-schema table (repo_name, path, copies, size, content, license)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {"repo_name": [f"org/repo{i % 3}" for i in range(len(files))], "path": [f"src/{f.name}" for f in files],
            "copies": ["1"] * len(files), "size": [str(f.stat().st_size) for f in files],
            "content": [f.read_text(encoding="utf-8") for f in files], "license": ["mit"] * len(files)}
    pq.write_table(pa.table(rows), path, row_group_size=row_group_size)
    return path
