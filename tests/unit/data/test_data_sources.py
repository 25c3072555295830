"""Corpus resolution and reading: every source form, broken files counted, and bad
corpora failing on the driver with the field's name before any Ray work."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from tests.support.corpus import stdlib_files, write_codeparrot_parquet
from training.config import ConfigError, JobConfig
from training.data import sources
from training.data.pipeline import prepare_data

from tests.support import REPO_ROOT  # noqa: E402

REPO = REPO_ROOT


def test_default_corpus_is_the_stdlib_without_tests_or_site_packages():
    c = sources.resolve_corpus(None)
    rel = [Path(f).relative_to(c.root).parts for f in c.files]
    assert c.kind == "folder" and len(c.files) > 300
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(parts[:-1]) for parts in rel)
    assert ("asyncio", "base_events.py") in rel  # recursive
    assert len(sources.resolve_corpus(None, max_files=7).files) == 7


def test_folder_parquet_and_jsonl_resolve(tmp_path, small_corpus):
    assert sources.resolve_corpus(str(small_corpus)).kind == "folder"
    pq_file = write_codeparrot_parquet(tmp_path / "t" / "train.parquet", stdlib_files(10))
    c = sources.resolve_corpus(str(pq_file))
    assert c.kind == "table" and len(c.units) == 3  # 10 rows in row groups of 4: parallel read units
    assert sources.resolve_corpus(str(tmp_path / "t")).kind == "table"  # a folder of Parquet files
    jl = tmp_path / "x.jsonl"
    jl.write_text(json.dumps({"content": "x = 1\n"}) + "\n")
    assert sources.resolve_corpus(str(jl)).units == ((str(jl), -1),)


def _file(path: Path, data: "bytes | pa.Table") -> str:
    if isinstance(data, pa.Table):
        pq.write_table(data, path)
    else:
        path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "nope"), "not found"),
    (lambda p: (p / "empty_dir").mkdir() or str(p / "empty_dir"), "no .py, .parquet or .jsonl"),
    (lambda p: _file(p / "e.jsonl", b""), "is empty"),
    (lambda p: (p / "pkg").mkdir() or _file(p / "pkg" / "__init__.py", b"") and str(p / "pkg"), "are empty"),
    (lambda p: _file(p / "b.jsonl", b"[1, 2]\n"), "'content' field"),
    (lambda p: _file(p / "n.parquet", pa.table({"text": ["x"]})), "no 'content' column"),
    (lambda p: _file(p / "z.parquet", pa.table({"content": pa.array([], pa.string())})), "no rows"),
    (lambda p: _file(p / "bad.parquet", b"not parquet at all"), "not a readable Parquet"),
    (lambda p: _file(p / "notes.txt", b"hi"), "expected a folder"),
])
def test_bad_corpus_fails_with_the_field_name(tmp_path, make, message):
    with pytest.raises(ConfigError, match=message) as err:
        sources.resolve_corpus(make(tmp_path), "data.valid_corpus")
    assert str(err.value).startswith("data.valid_corpus=")


def test_hub_source_with_a_local_copy_fails_cleanly_when_missing(tmp_path):
    with pytest.raises(ConfigError, match="data.corpus=.*could not load"):
        sources.resolve_corpus("hf:" + str(tmp_path / "no_such_dataset"))


def test_reading_skips_and_counts_broken_files(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("print('hi')\n")
    broken = {"bin.py": b"\x00\x01\x02" * 10, "latin.py": "s = 'caf\u00e9'\n".encode("latin-1"), "empty.py": b"",
              "huge.py": b"x = 1\n" * 20_000, "blob.py": b"d = '" + b"Q" * 30_000 + b"'\n"}
    for name, raw in broken.items():
        (tmp_path / name).write_bytes(raw)
    files = [good] + [tmp_path / n for n in broken] + [tmp_path / "vanished.py"]
    counts: Counter = Counter()
    out = sources.read_py_files([str(f) for f in files], [f.name for f in files], 100_000, counts)
    assert out.column("path").to_pylist() == ["good.py"]
    assert out.column("content").to_pylist() == ["print('hi')\n"]
    assert counts == {"files_read": 7, "skipped:binary": 1, "skipped:not_utf8": 1, "skipped:empty": 1,
                      "skipped:too_large": 1, "skipped:long_line": 1, "skipped:unreadable": 1}


def test_jsonl_and_parquet_rows_are_checked_and_keyed(tmp_path):
    jl = tmp_path / "rows.jsonl"
    lines = [json.dumps({"repo_name": "a/b", "path": "x.py", "content": "x = 1\n"}), "{not json",
             json.dumps({"repo_name": "a/b", "path": "y.py", "content": ""}), json.dumps({"content": "y = 2\n"})]
    jl.write_text("\n".join(lines) + "\n")
    counts: Counter = Counter()
    table = pa.concat_tables([sources.rows_from_table(raw, 10_000, counts) for raw in sources.iter_raw(str(jl), -1, 2)])
    assert table.column("path").to_pylist()[0] == "a/b/x.py"  # repo_name/path is the split key
    assert len(table) == 2 and counts == {"files_read": 4, "skipped:bad_json": 1, "skipped:empty": 1}
    pq_file = write_codeparrot_parquet(tmp_path / "cp.parquet", stdlib_files(5), row_group_size=2)
    got = [sources.rows_from_table(raw, 10_000_000, Counter()) for rg in range(3)
           for raw in sources.iter_raw(str(pq_file), rg, 64)]
    assert sum(len(t) for t in got) == 5 and got[0].column("path").to_pylist()[0].startswith("org/repo0/src/")


def test_prepare_data_rejects_bad_corpora_before_starting_ray(tmp_path):
    assert not ray.is_initialized()
    for corpus, valid, field in ((str(tmp_path / "missing"), None, "data.corpus"),
                                 (None, str(tmp_path / "missing_valid"), "data.valid_corpus")):
        cfg = JobConfig(output=str(tmp_path / "out"))
        cfg.data.corpus, cfg.data.valid_corpus = corpus, valid
        with pytest.raises(ConfigError, match=field):
            prepare_data(cfg)
    cfg = JobConfig(output=str(tmp_path / "out"))
    cfg.data.chunking = "sliding"
    with pytest.raises(ConfigError, match="data.chunking"):
        prepare_data(cfg)
    assert not ray.is_initialized()
    assert not (tmp_path / "out" / "data").exists()


@pytest.mark.parametrize("flags, message", [
    (["--corpus", "/definitely/not/here"], "data.corpus='/definitely/not/here': not found"),
    (["--chunking", "sliding"], "must be one of truncate, pack"),
    (["--valid-fraction", "1.5"], "data.valid_fraction=1.5"),
])
def test_cli_fails_fast_with_a_message_naming_the_flag(tmp_path, flags, message):
    res = subprocess.run([sys.executable, "training/run.py", "--prepare-only", "--output", str(tmp_path / "o"), *flags],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr
    assert "Started a local Ray instance" not in res.stderr + res.stdout
