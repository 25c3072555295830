"""Real corpora for tests: files from the interpreter's standard library, in the forms users give."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(n: int) -> list[Path]:
    """n real, deterministic, medium-sized Python files from the standard library."""
    files = sorted(p for p in STDLIB.glob("*.py") if 2_000 < p.stat().st_size < 60_000)
    return files[:n]


def write_codeparrot_parquet(path: Path, files: list[Path], row_group_size: int = 4,
                             licenses: Optional[list[Optional[str]]] = None) -> Path:
    """A CodeParrot-schema table (repo_name, path, copies, size, content, license); every row
    `mit` unless `licenses` gives each row's (None: no value)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {"repo_name": [f"org/repo{i % 3}" for i in range(len(files))], "path": [f"src/{f.name}" for f in files],
            "copies": ["1"] * len(files), "size": [str(f.stat().st_size) for f in files],
            "content": [f.read_text(encoding="utf-8") for f in files],
            "license": pa.array(licenses if licenses is not None else ["mit"] * len(files), pa.string())}
    pq.write_table(pa.table(rows), path, row_group_size=row_group_size)
    return path


def held_out_chunks(checkpoint, n: int = 12, length: int = 128):
    """Real code the tiny checkpoint was not trained on, tokenized with its tokenizer, cut into
    n full chunks (an int32 array n x length)."""
    import numpy as np

    from training.data.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    ids: list[int] = []
    for f in stdlib_files(80)[60:]:  # train_tiny trains on the first 60
        ids += tok(f.read_text(encoding="utf-8"))["input_ids"] + [tok.eos_token_id]
        if len(ids) >= n * length:
            break
    return np.array(ids[: n * length], dtype=np.int32).reshape(n, length)
