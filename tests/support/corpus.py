"""Real corpora for tests: files from the interpreter's standard library, in the forms users give."""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
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


@dataclass
class Planted:
    """A corpus folder with planted duplicates and what dedup must make of it."""
    root: Path
    exact: list[list[str]]  # groups of paths whose text is the same (up to whitespace)
    near: list[list[str]]  # groups of near copies (token-set Jaccard > 0.85 to the first)
    below: list[str]  # near copies under the threshold: must all be kept
    jaccard: dict[str, float]  # planted file -> true Jaccard to the file it was made from


def _jaccard(a: str, b: str) -> float:
    from training.data.minhash import tokens

    ta, tb = tokens(a), tokens(b)
    return len(ta & tb) / len(ta | tb)


def write_planted_corpus(root: Path, plain: int = 40) -> Planted:
    """`plain` distinct stdlib files under base/, and planted copies of some of them in other
    folders (so that they fall into other blocks): exact copies, a whitespace-only variant,
    near copies (a renamed variable, an added comment, three changed lines) and two copies
    just under Jaccard 0.85 (a trimmed file, a file with extra names appended)."""
    import re

    from training.data.minhash import tokens

    files = stdlib_files(plain)
    texts = {f"base/{f.name}": f.read_text(encoding="utf-8") for f in files}
    bases = [k for k, t in texts.items() if len(tokens(t)) >= 220][:7]
    assert len(bases) == 7, "too few big stdlib files for the planted corpus"
    t = [texts[k] for k in bases]
    out: dict[str, str] = dict(texts)
    out["a_copy/first.py"] = t[0]
    out["zz/deep/copy.py"] = t[0]
    out["ws/variant.py"] = t[1].replace("    ", "\t").replace("\n", "  \r\n")
    names = sorted((n for n in set(re.findall(r"\b[a-z_][a-z_0-9]{3,}\b", t[2]))
                    if len(re.findall(rf"\b{n}\b", t[2])) >= 3 and n not in ("self", "return", "import")),
                   key=lambda n: (-len(n), n))
    out["near/renamed.py"] = re.sub(rf"\b{names[0]}\b", "renamed_thing", t[2])
    out["near/commented.py"] = "# An added comment about this module's cache layer\n" + t[3]
    lines = t[4].splitlines(keepends=True)
    for i, at in enumerate((len(lines) // 4, len(lines) // 2, 3 * len(lines) // 4)):
        lines[at] = f"changed_value_{i} = helper_call_{i}(argument_{i})\n"
    out["near/changed_lines.py"] = "".join(lines)
    # Under the threshold: the longest prefix whose Jaccard to the whole is <= 0.78.
    lines = t[5].splitlines(keepends=True)
    k = max(n for n in range(1, len(lines)) if _jaccard("".join(lines[:n]), t[5]) <= 0.78)
    out["below/trimmed.py"] = "".join(lines[:k])
    n = len(tokens(t[6]))
    extra = int(n * (1 / 0.77 - 1)) + 1
    out["below/appended.py"] = t[6] + "".join(f"extra_name_{i}()\n" for i in range(extra))
    for path, text in out.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text, encoding="utf-8", newline="")
    made = {"near/renamed.py": t[2], "near/commented.py": t[3], "near/changed_lines.py": t[4],
            "below/trimmed.py": t[5], "below/appended.py": t[6]}
    jac = {p: _jaccard(out[p], src) for p, src in made.items()}
    assert all(jac[p] > 0.88 for p in made if p.startswith("near/")), jac
    assert all(0.65 < jac[p] <= 0.78 for p in made if p.startswith("below/")), jac
    return Planted(root, exact=[[bases[0], "a_copy/first.py", "zz/deep/copy.py"], [bases[1], "ws/variant.py"]],
                   near=[[bases[2], "near/renamed.py"], [bases[3], "near/commented.py"],
                         [bases[4], "near/changed_lines.py"]],
                   below=["below/trimmed.py", "below/appended.py"], jaccard=jac)
