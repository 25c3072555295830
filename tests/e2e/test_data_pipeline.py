"""The data stage end to end on real Ray (one local cluster for the module, 2 logical
CPUs: the budget that stalled the stream before), real tokenizer training, and a small
real corpus with broken files. Expected chunks are recomputed independently with the
saved HF tokenizer and the pure split function, so every count is checked exactly."""

from __future__ import annotations

import random
import shutil
import textwrap
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from tests.support.corpus import stdlib_files
from tests.support.corpus import write_codeparrot_parquet
from training.config import ConfigError, DataConfig, JobConfig
from training.data.filters import clean_problem
from training.data.licenses import license_problem, normalize_licenses
from training.data.pipeline import build_chunks, chunk_dataset, layout, prepare_data, staging_dir, write_splits
from training.data.sources import resolve_corpus
from training.data.split import split_of
from training.data.tokenizer import load_tokenizer

CTX = 128
BROKEN = {"bin.py": b"\x7fELF\x00\x00\x01" * 50, "latin.py": "s = 'caf\u00e9'\n".encode("latin-1") * 20,
          "empty.py": b"", "blob.py": b"B = '" + b"QUFB" * 6_000 + b"'\n", "huge.py": b"x = 1\n" * 50_000}


@pytest.fixture(scope="module", autouse=True)
def ray_two_cpus():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(small_corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(small_corpus, root, dirs_exist_ok=True)
    (root / "broken").mkdir()
    for name, raw in BROKEN.items():
        (root / "broken" / name).write_bytes(raw)
    return root


def job(output: Path, **data) -> JobConfig:
    cfg = JobConfig(output=str(output))
    base = dict(vocab_size=500, tokenizer_train_files=40, valid_fraction=0.2, max_file_bytes=200_000, batch_rows=8)
    for k, v in {**base, **data}.items():
        setattr(cfg.data, k, v)
    return cfg


def good_files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(root.rglob("*.py")) if p.parent.name != "broken"}


def expected_chunks(texts: dict[str, str], tok, valid_fraction: float, mode: str = "truncate") -> dict[str, Counter]:
    out: dict[str, list] = {"train": [], "valid": []}
    streams: dict[str, list] = {"train": [], "valid": []}
    for key, text in texts.items():
        ids = tok(text)["input_ids"]
        split = split_of(key, valid_fraction)
        if mode == "truncate":
            out[split] += [tuple(ids[i:i + CTX]) for i in range(0, len(ids) - CTX + 1, CTX)]
        else:
            streams[split] += ids + [tok.eos_token_id]
    if mode == "pack":
        for split, s in streams.items():
            out[split] = [tuple(s[i:i + CTX]) for i in range(0, len(s) - CTX + 1, CTX)]
    return {k: Counter(v) for k, v in out.items()}


def read_chunks(folder: Path, with_labels: bool = False) -> Counter:
    rows: list = []
    for f in sorted(folder.glob("*.parquet")):
        t = pq.read_table(f)
        assert t.column_names == ["input_ids", "labels"]
        ids = t.column("input_ids").to_pylist()
        if with_labels:
            rows += zip(map(tuple, ids), map(tuple, t.column("labels").to_pylist()))
            continue
        assert ids == t.column("labels").to_pylist()
        assert all(len(r) == CTX for r in ids)
        rows += map(tuple, ids)
    return Counter(rows)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    return prepare_data(job(tmp_path_factory.mktemp("run") / "out", corpus=str(corpus)))


@pytest.mark.timeout(240)
def test_prepare_data_counts_and_chunks_are_exact(prepared, corpus):
    s = prepared.stats
    assert s["files_read"] == 40 + len(BROKEN)
    assert s["files_skipped"] == {"binary": 1, "not_utf8": 1, "empty": 1, "long_line": 1, "too_large": 1}
    tok = load_tokenizer(prepared.tokenizer_dir)
    assert tok.eos_token == "<|endoftext|>" and len(tok) <= 500
    expected = expected_chunks(good_files(corpus), tok, 0.2)
    assert read_chunks(prepared.train_dir) == expected["train"]
    assert read_chunks(prepared.valid_dir) == expected["valid"]
    assert s["chunks_train"] == sum(expected["train"].values()) > 0
    assert s["chunks_valid"] == sum(expected["valid"].values()) > 0
    assert s["tokens_train"] == s["chunks_train"] * CTX
    assert 0 < s["chunk_yield"] < 1 and s["chunking"] == "truncate"
    assert s["encoder"] == "tiktoken"  # the job's own tokenizer takes the fast, exact path
    assert prepared.stats_path.is_file() and prepared.stats_path == prepared.root / "data" / "stats.json"


def test_same_config_reuses_the_data_without_recomputing(prepared, corpus):
    mtimes = {f: f.stat().st_mtime_ns for f in prepared.train_dir.glob("*.parquet")}
    again = prepare_data(job(prepared.root, corpus=str(corpus)))
    assert again.reused and again.stats == prepared.stats
    assert {f: f.stat().st_mtime_ns for f in again.train_dir.glob("*.parquet")} == mtimes


@pytest.mark.timeout(240)
def test_given_tokenizer_and_rerun_give_the_same_split_and_chunks(prepared, corpus, tmp_path):
    second = prepare_data(job(tmp_path / "out2", corpus=str(corpus), tokenizer=str(prepared.tokenizer_dir),
                              tokenizer_actors=2))  # 2 actors on 2 logical CPUs: must not stall
    assert read_chunks(second.train_dir) == read_chunks(prepared.train_dir)
    assert read_chunks(second.valid_dir) == read_chunks(prepared.valid_dir)


@pytest.mark.timeout(240)
def test_fim_rewrites_train_chunks_in_the_ray_stage_exactly_as_the_pure_transform(prepared, corpus, tmp_path):
    """fim_rate 0.5 with the same tokenizer: each train chunk is the seeded pure transform
    of the left-to-right chunk (labels -100 on <fim_pad>), validation stays left to right."""
    import numpy as np
    from tokenizers import Tokenizer

    from training.data.fim import codec_from_file, fim_chunks

    fim = prepare_data(job(tmp_path / "fim", corpus=str(corpus), tokenizer=str(prepared.tokenizer_dir),
                           fim_rate=0.5, fim_spm_rate=0.5, fim_seed=3))
    assert read_chunks(fim.valid_dir) == read_chunks(prepared.valid_dir)
    tj = str(prepared.tokenizer_dir / "tokenizer.json")
    enc = Tokenizer.from_file(tj)
    codec, ids = codec_from_file(tj, lambda s: enc.encode(s, add_special_tokens=False).ids)
    plain = np.array(sorted(read_chunks(prepared.train_dir).elements()), dtype=np.int32)
    inputs, labels = fim_chunks(plain, 3, codec, ids, 0.5, 0.5)
    expected = Counter(zip(map(tuple, inputs.tolist()), map(tuple, labels.tolist())))
    assert read_chunks(fim.train_dir, with_labels=True) == expected
    rewritten = sum(r[0] == ids.prefix for r in inputs)
    assert 0.25 * len(plain) < rewritten < 0.75 * len(plain)
    assert fim.stats["fingerprint"] != prepared.stats["fingerprint"]


@pytest.mark.timeout(240)
def test_only_shards_in_the_manifest_are_kept(prepared, corpus, tmp_path):
    """The tokenizer actors write the shards; a shard no finished task reported (left by a
    retried one) must not reach train/ or be counted."""
    d = job(tmp_path, corpus=str(corpus), tokenizer=str(prepared.tokenizer_dir)).data
    out = layout(tmp_path / "out3")
    stray = staging_dir(out) / "train" / "stray.parquet"
    stray.parent.mkdir(parents=True)
    shutil.copy(next(prepared.train_dir.glob("*.parquet")), stray)
    ds = build_chunks([(resolve_corpus(str(corpus)), None)], prepared.tokenizer_dir, d, write_dir=staging_dir(out))
    rows, _ = write_splits(ds, out)
    assert not stray.exists() and not (out.train_dir / "stray.parquet").exists()
    assert rows == {"train": prepared.stats["chunks_train"], "valid": prepared.stats["chunks_valid"]}
    assert read_chunks(out.train_dir) == read_chunks(prepared.train_dir)


@pytest.mark.timeout(240)
def test_pack_mode_with_a_parquet_valid_corpus(prepared, small_corpus, tmp_path):
    valid_files = stdlib_files(50)[40:50]
    pq_file = write_codeparrot_parquet(tmp_path / "valid" / "v.parquet", valid_files)
    out = prepare_data(job(tmp_path / "out", corpus=str(small_corpus), valid_corpus=str(pq_file), chunking="pack",
                           tokenizer=str(prepared.tokenizer_dir), tokenizer_actors=1))
    tok = load_tokenizer(out.tokenizer_dir)
    train = expected_chunks(good_files(small_corpus), tok, 0.0, mode="pack")["train"]
    valid = expected_chunks({f.name: f.read_text(encoding="utf-8") for f in valid_files}, tok, 0.0, mode="pack")["train"]
    # One actor sees the whole stream in order per split, so only the final remainder is dropped.
    assert read_chunks(out.train_dir) == train and read_chunks(out.valid_dir) == valid
    assert out.stats["files_valid"] == 10 and out.stats["chunk_yield"] > 0.99


@pytest.mark.timeout(240)
def test_each_filter_drops_and_counts_its_files(tmp_path):
    base = [f.read_text(encoding="utf-8") for f in stdlib_files(8)]
    src = tmp_path / "src"
    src.mkdir()
    files = {
        "keep_pandas.py": "import pandas as pd\n" + base[0],
        "copy_1.py": "import pandas as pd\n" + base[0],
        "copy_ws.py": "import  pandas  as  pd\r\n" + base[0].replace("    ", "\t"),  # whitespace-only change
        "keep_sklearn.py": "from sklearn import svm\n" + base[1],
        "generated.py": "# This file was automatically generated.\nimport pandas\n" + base[2],
        "wide.py": "import seaborn\nX = '" + "w" * 1_500 + "'\n" + base[3],
        "symbols.py": "import matplotlib\n" + ("# " + "=-+* " * 15 + "\n") * 60,
        "no_keyword.py": base[4],
    }
    for name, text in files.items():
        (src / name).write_text(text, encoding="utf-8")
    out = prepare_data(job(tmp_path / "out", corpus=str(src), valid_fraction=0.0, dedup=True, quality_filter=True,
                           keywords=["pandas", "sklearn", "matplotlib", "seaborn"]))
    assert out.stats["files_skipped"] == {"duplicate": 2, "keywords": 1, "quality_alnum_fraction": 1,
                                          "quality_autogenerated": 1, "quality_max_line_length": 1}
    assert out.stats["files_kept"] == out.stats["files_train"] == 2
    tok = load_tokenizer(out.tokenizer_dir)
    kept = {k: files[k] for k in ("keep_pandas.py", "keep_sklearn.py")}
    assert read_chunks(out.train_dir) == expected_chunks(kept, tok, 0.0)["train"]


@pytest.mark.timeout(240)
def test_clean_recipe_and_licences_on_a_codeparrot_parquet_corpus(tmp_path, capsys):
    """--clean codeparrot and --licenses in the real Ray stages: every drop, by rule, as the
    pure functions predict with the run's own tokenizer; the kept rows' chunks exactly."""
    rng = random.Random(0)  # CJK characters (alphanumeric to str.isalnum) a 500-token BPE splits into bytes
    cjk = "".join(f"S{i} = '" + "".join(chr(0x4E00 + rng.randrange(20_000)) for _ in range(40)) + "'\n" for i in range(20))
    planted = {"gen.py": "# This file is auto-generated. Do not edit.\n" + "def f(x):\n    return x\n" * 30,
               "cjk.py": "def f():\n    return 1\n" + cjk,
               "tiny.py": "def describe(value):\n    return value == other\n"}
    prose = textwrap.fill("This module reads the settings of the service and returns them as a mapping. Each value "
                          "is checked against its type, and a missing value falls back to the default one. " * 3, 70)
    planted.update({f"plain{i}.py": f'"""Module {i}.\n\n{prose}\n"""\n\nA = 1\nB = 2\nC = 3\nD = 4\nE = 5\n'
                    for i in range(10)})  # no def/class/for/while: about 70% dropped
    folder = tmp_path / "planted"
    folder.mkdir()
    for name, text in planted.items():
        (folder / name).write_text(text, encoding="utf-8")
    files = stdlib_files(16) + [folder / n for n in planted]
    licenses = ["mit", "apache-2.0", "gpl-3.0", None] * 4 + ["mit"] * len(planted)
    pq_file = write_codeparrot_parquet(tmp_path / "cp" / "train.parquet", files, licenses=licenses)
    out = prepare_data(job(tmp_path / "out", corpus=str(pq_file), valid_fraction=0.0, clean="codeparrot",
                           clean_seed=1, licenses=["MIT", "apache-2.0"]))
    tok = load_tokenizer(out.tokenizer_dir)
    reasons, kept = Counter(), {}
    for i, (f, lic) in enumerate(zip(files, licenses)):
        text = f.read_text(encoding="utf-8")
        why = license_problem(lic, normalize_licenses(["mit", "apache-2.0"])) \
            or clean_problem(text, "codeparrot", 1, len(tok(text)["input_ids"]))
        if why:
            reasons[why] += 1
        else:
            kept[f"org/repo{i % 3}/src/{f.name}"] = text
    assert out.stats["files_skipped"] == dict(reasons)
    assert {"license_not_allowed", "license_missing", "quality_autogenerated", "quality_char_token_ratio",
            "quality_few_assignments", "quality_no_keywords"} <= set(reasons)
    assert out.stats["filters"]["clean"] == "codeparrot" and out.stats["files_train"] == len(kept)
    assert read_chunks(out.train_dir) == expected_chunks(kept, tok, 0.0)["train"]
    # Scoring a folder (no licence column) with this run's data config, as the evaluation does:
    # read without the licence filter, said in one line; the recipe still applies.
    for f in files[:3]:
        shutil.copy(f, folder / f.name)
    capsys.readouterr()
    scored = chunk_dataset(str(folder), out.tokenizer_dir, job(tmp_path, clean="codeparrot", clean_seed=1,
                                                                licenses=["mit"]).data)
    texts = [f.read_text(encoding="utf-8") for f in sorted(folder.glob("*.py"))]
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    assert scored.count() == sum(n // CTX for t, n in zip(texts, lengths) if not clean_problem(t, "codeparrot", 1, n)) > 0
    assert "has no licence column; reading it without data.licenses" in capsys.readouterr().out


@pytest.mark.timeout(240)
def test_chunk_dataset_streams_the_same_chunks_for_evaluation(prepared, corpus):
    cfg = job(prepared.root, corpus=str(corpus)).data
    ds = chunk_dataset(str(corpus), prepared.tokenizer_dir, cfg, split="valid").materialize()  # one execution
    assert ds.columns() == ["input_ids", "labels"]
    assert ds.count() == prepared.stats["chunks_valid"]
    batch = next(iter(ds.iter_torch_batches(batch_size=4)))
    assert tuple(batch["input_ids"].shape) == (4, CTX)
    with pytest.raises(ConfigError, match="split='test'"):
        chunk_dataset(str(corpus), prepared.tokenizer_dir, cfg, split="test")


@pytest.mark.timeout(240)
def test_hub_loader_on_a_local_parquet_copy(prepared, tmp_path):
    files = stdlib_files(12)
    for i in range(2):  # two shards, read by two tasks; the second has rows of another licence
        write_codeparrot_parquet(tmp_path / "codeparrot-ds-train" / "data" / f"train-0000{i}-of-00002.parquet",
                                 files[i::2], licenses=["mit", "gpl-3.0"] * 3 if i else None)
    cfg = DataConfig(batch_rows=4, valid_fraction=0.0, licenses=["mit"])
    hub = chunk_dataset("hf:" + str(tmp_path / "codeparrot-ds-train"), prepared.tokenizer_dir, cfg)
    tok = load_tokenizer(prepared.tokenizer_dir)
    mit = files[0::2] + files[1::2][0::2]
    expected = sum(len(tok(f.read_text(encoding="utf-8"))["input_ids"]) // CTX for f in mit)
    assert hub.count() == expected > 0


def test_corpus_without_a_full_chunk_fails_naming_the_length(tmp_path):
    src = tmp_path / "tiny"
    src.mkdir()
    for i in range(3):
        (src / f"m{i}.py").write_text(f"x{i} = {i}\nprint(x{i})\n" * 3)
    with pytest.raises(ConfigError, match="no full 128-token chunk"):
        prepare_data(job(tmp_path / "out", corpus=str(src), vocab_size=300, valid_fraction=0.0))


def test_fim_with_a_tokenizer_without_the_sentinels_fails_naming_them(corpus, tmp_path):
    from training.data.tokenizer import save_tokenizer, train_tokenizer

    old = save_tokenizer(train_tokenizer([p.read_text() for p in stdlib_files(5)], vocab_size=300, fim_tokens=False),
                         tmp_path / "old_tok")
    with pytest.raises(ConfigError, match=r"data.tokenizer=.*<fim_prefix>.*data.fim_rate=0.5"):
        prepare_data(job(tmp_path / "out", corpus=str(corpus), tokenizer=str(old), fim_rate=0.5))
    assert not (tmp_path / "out" / "data" / "train").exists()  # nothing written
