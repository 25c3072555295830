"""The licence filter (`--licenses`) on CodeParrot's schema through the real source reader,
and the clear error for a corpus that has no licence column, before Ray starts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from tests.support import REPO_ROOT
from tests.support.corpus import stdlib_files, write_codeparrot_parquet
from training.config import ConfigError, JobConfig
from training.data import sources
from training.data.licenses import check_license_counts, check_licenses, license_problem, normalize_licenses
from training.data.pipeline import prepare_data

LICENSES = ["mit", "apache-2.0", "gpl-3.0", None, "MIT", "bsd-3-clause", "", "Apache-2.0 "]
ALLOWED = ["mit", "Apache-2.0"]


def test_license_problem_is_case_insensitive_and_never_assumes_a_missing_one():
    allowed = normalize_licenses(ALLOWED)
    assert [license_problem(x, allowed) for x in LICENSES] == [
        None, None, "license_not_allowed", "license_missing", None, "license_not_allowed", "license_missing", None]


def test_parquet_in_codeparrots_schema_through_the_real_reader(tmp_path):
    files = stdlib_files(len(LICENSES))
    pq_file = write_codeparrot_parquet(tmp_path / "cp" / "train.parquet", files, row_group_size=3, licenses=LICENSES)
    assert pq.read_schema(pq_file).names == ["repo_name", "path", "copies", "size", "content", "license"]
    corpus = sources.resolve_corpus(str(tmp_path / "cp"))
    assert "license" in corpus.columns
    check_licenses(ALLOWED, corpus)  # has the column: no error
    counts: Counter = Counter()
    kept = pa.concat_tables([sources.rows_from_table(raw, 10_000_000, counts, ALLOWED)
                             for f, rg in corpus.units for raw in sources.iter_raw(f, rg, 2)])
    expected = [f"org/repo{i % 3}/src/{f.name}" for i, (f, lic) in enumerate(zip(files, LICENSES))
                if lic and lic.strip().lower() in ("mit", "apache-2.0")]
    assert kept.column("path").to_pylist() == expected and len(expected) == 4
    assert kept.column("content").to_pylist()[0] == files[0].read_text(encoding="utf-8")
    assert counts == {"files_read": 8, "skipped:license_not_allowed": 2, "skipped:license_missing": 2}
    # The tokenizer's sample reads through the same filter.
    assert [p for p, _ in sources.iter_texts(corpus, 10_000_000, licenses=ALLOWED)] == expected
    # Without --licenses every row passes, licence or not.
    assert len(list(sources.iter_texts(corpus, 10_000_000))) == len(LICENSES)


def test_jsonl_rows_carry_their_licence_too(tmp_path):
    jl = tmp_path / "rows.jsonl"
    rows = [{"repo_name": "a/b", "path": f"{i}.py", "content": f"x = {i}\n", "license": lic}
            for i, lic in enumerate(["mit", "gpl-2.0", None])]
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts: Counter = Counter()
    table = pa.concat_tables([sources.rows_from_table(raw, 10_000, counts, ["mit"])
                              for raw in sources.iter_raw(str(jl), -1, 2)])  # two raw batches
    assert table.column("path").to_pylist() == ["a/b/0.py"]
    assert counts == {"files_read": 3, "skipped:license_not_allowed": 1, "skipped:license_missing": 1}


def test_a_corpus_without_a_licence_column_is_refused_naming_both_fields(tmp_path, small_corpus):
    folder = sources.resolve_corpus(str(small_corpus))
    with pytest.raises(ConfigError, match=r"^data.licenses='apache-2.0,mit': data.corpus='.*' is a folder of .py files"):
        check_licenses(["MIT", "apache-2.0"], folder)
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(pa.table({"path": ["a.py"], "content": ["x = 1\n"]}), plain / "a.parquet")
    with pytest.raises(ConfigError, match=r"data.valid_corpus=.* has no 'license' column \(columns: content, path\)"):
        check_licenses(["mit"], None, sources.resolve_corpus(str(plain), "data.valid_corpus"))
    write_codeparrot_parquet(plain / "b.parquet", stdlib_files(2))  # one file with it, one without
    with pytest.raises(ConfigError, match="has no 'license' column in every file"):
        check_licenses(["mit"], sources.resolve_corpus(str(plain)))
    check_licenses([], folder)  # no filter, no requirement
    hub_unknown = sources.Corpus("hub", "org/set", "data.corpus", columns=None)
    check_licenses(["mit"], hub_unknown)  # columns unknown before reading: decided on the rows


def test_rows_decide_when_the_columns_were_unknown():
    with pytest.raises(ConfigError, match=r"data.licenses='mit': none of the 5 rows read has a 'license' value"):
        check_license_counts(["mit"], {"files_read": 5, "files_skipped": {"license_missing": 5}})
    stats = {"files_read": 5, "files_skipped": {"license_missing": 2, "license_not_allowed": 1}}
    check_license_counts(["mit"], stats)
    assert stats["warnings"] == ["2 of 5 rows had no 'license' value and were dropped"]
    check_license_counts([], {"files_read": 5, "files_skipped": {"license_missing": 5}})  # filter off


def test_prepare_data_refuses_licences_on_a_folder_before_starting_ray(tmp_path, small_corpus):
    assert not ray.is_initialized()
    cfg = JobConfig(output=str(tmp_path / "out"))
    cfg.data.corpus, cfg.data.licenses = str(small_corpus), ["mit"]
    with pytest.raises(ConfigError, match="data.licenses='mit': data.corpus=.* is a folder of .py files"):
        prepare_data(cfg)
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_cli_names_the_flag_and_starts_no_ray(tmp_path, small_corpus):
    res = subprocess.run([sys.executable, "training/run.py", "--prepare-only", "--output", str(tmp_path / "o"),
                          "--corpus", str(small_corpus), "--licenses", "mit,apache-2.0"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "data.licenses='apache-2.0,mit': data.corpus=" in res.stderr
    assert "Started a local Ray instance" not in res.stderr + res.stdout
