"""Where the text comes from: a folder of .py files, Parquet/JSONL files, or a hub data set.

Everything is resolved and checked on the driver *before* Ray starts (`resolve_corpus`):
a missing path, a folder without sources, an empty file or a table without a `content`
column fails in a second with a ConfigError that names the field. Only file names and
row-group numbers are listed up front; the text itself is read inside the Ray stream, so
memory stays bounded by the pipeline, not by the corpus.

Every source becomes rows of (`path`, `content`). `path` is the file's path relative to
the corpus folder, or `repo_name/path` for CodeParrot rows; it is the split key. A table's
`license` column is read with the rows and checked against `data.licenses` where the rows
are checked (`rows_from_table`), so an excluded row is never decoded or tokenized.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import pyarrow as pa

from training.config import ConfigError
from training.data.filters import content_hash, decode_source, text_problem
from training.data.licenses import license_problem, normalize_licenses

TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")
STDLIB_EXCLUDE = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
HUB_PREFIX = "hf:"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ROWS = pa.schema([("path", pa.string()), ("content", pa.string())])


@dataclass(frozen=True)
class Corpus:
    kind: str  # "folder" (.py files), "table" (Parquet/JSONL), "hub"
    location: str  # folder/file path, or hub name
    field: str  # the config field it came from, for messages
    files: tuple[str, ...] = ()  # folder: .py files; table: data files
    root: str = ""  # folder the relative paths are taken from
    units: tuple[tuple[str, int], ...] = field(default=(), repr=False)  # (file, row group)
    shards: int = 0  # hub: the data set's shards (files), read in parallel
    # Columns every data file has (table: all files' schemas, a JSONL file's first row; hub:
    # the data set's features); None: not known before reading (a hub set without features).
    columns: Optional[frozenset[str]] = None

    def describe(self) -> str:
        return f"{self.kind}:{self.location}"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_table_file(path: str | Path) -> bool:
    return str(path).lower().endswith(TABLE_SUFFIXES)


# ---- resolving (driver, before Ray) ---------------------------------------------------


def resolve_corpus(spec: Optional[str], field_name: str = "data.corpus",
                   max_files: Optional[int] = None) -> Corpus:
    """Turn a corpus spec into a checked Corpus, or raise ConfigError naming the field."""
    if spec is None:
        root = stdlib_root()
        files = list_py_files(root, STDLIB_EXCLUDE)
        return _folder(root, files, field_name, spec, max_files)
    if spec.startswith(HUB_PREFIX):
        return _hub(spec[len(HUB_PREFIX):], field_name)
    path = Path(spec).expanduser()
    if path.is_dir():
        py = list_py_files(path, {"__pycache__"})
        if py:
            return _folder(path, py, field_name, spec, max_files)
        tables = sorted(str(p) for p in path.rglob("*") if p.is_file() and is_table_file(p))
        if tables:
            return _table(spec, tables, field_name, max_files)
        raise ConfigError(f"{field_name}={spec!r}: folder holds no .py, .parquet or .jsonl files")
    if path.is_file():
        if is_table_file(path):
            return _table(spec, [str(path)], field_name, max_files)
        if path.suffix == ".py":
            return _folder(path.parent, [path], field_name, spec, max_files)
        raise ConfigError(f"{field_name}={spec!r}: expected a folder, a .py, .parquet or .jsonl file")
    if _HUB_NAME.match(spec):
        return _hub(spec, field_name)
    raise ConfigError(f"{field_name}={spec!r}: not found (expected a folder of .py files, a "
                      f".parquet/.jsonl file or folder of them, or a hub name like owner/name)")


def _hub(name: str, field_name: str) -> Corpus:
    """Resolve the hub data set now (metadata only), so a wrong name fails before Ray."""
    ds = load_hub(Corpus("hub", name, field_name))
    columns = None if ds.column_names is None else frozenset(ds.column_names)
    return Corpus("hub", name, field_name, shards=ds.num_shards, columns=columns)


def list_py_files(root: Path, exclude: set[str]) -> list[Path]:
    """Sorted .py files under root, skipping excluded and hidden folders (no symlinks)."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude and not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return out


def _folder(root: Path, files: list[Path], field_name: str, spec: Optional[str],
            max_files: Optional[int]) -> Corpus:
    if not files:
        raise ConfigError(f"{field_name}={spec!r}: no .py files found")
    files = files[:max_files] if max_files else files
    if not any(os.path.getsize(f) for f in files):
        raise ConfigError(f"{field_name}={spec!r}: all {len(files)} .py files are empty")
    return Corpus("folder", str(root), field_name, tuple(str(f) for f in files), str(root), columns=frozenset())


def _table(spec: str, files: list[str], field_name: str, max_files: Optional[int]) -> Corpus:
    """Check every data file's schema and size now; list Parquet row groups as read units."""
    units: list[tuple[str, int]] = []
    total_rows = 0
    columns: Optional[frozenset[str]] = None
    for f in files:
        if os.path.getsize(f) == 0:
            raise ConfigError(f"{field_name}={spec!r}: {f} is empty")
        if f.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                meta = pq.ParquetFile(f).metadata
            except Exception as e:  # not Parquet at all
                raise ConfigError(f"{field_name}={spec!r}: {f} is not a readable Parquet file ({e})") from None
            names = meta.schema.names
            if "content" not in names:
                raise ConfigError(f"{field_name}={spec!r}: {f} has no 'content' column (columns: {', '.join(names)})")
            total_rows += meta.num_rows
            units.extend((f, rg) for rg in range(meta.num_row_groups))
        else:
            first = _first_json_row(f)
            if first is None or "content" not in first:
                raise ConfigError(f"{field_name}={spec!r}: {f}: first row is not a JSON object with a 'content' field")
            total_rows += 1
            units.append((f, -1))
            names = list(first)
        columns = frozenset(names) if columns is None else columns & frozenset(names)
    if total_rows == 0:
        raise ConfigError(f"{field_name}={spec!r}: no rows")
    return Corpus("table", spec, field_name, tuple(files), "", tuple(units), columns=columns)


def _open_text(path: str) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # type: ignore[return-value]


def _first_json_row(path: str) -> Optional[dict]:
    with _open_text(path) as fh:
        for line in fh:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    return None
                return row if isinstance(row, dict) else None
    return None


def corpus_identity(corpus: Corpus) -> dict[str, Any]:
    """What the data fingerprint sees of the corpus: names, sizes and mtimes (cheap)."""
    from training.data.stats import fingerprint, file_fingerprint

    if corpus.kind == "hub":
        return {"kind": "hub", "name": corpus.location}
    return {"kind": corpus.kind, "location": os.path.abspath(corpus.location),
            "files": fingerprint({f: file_fingerprint(f) for f in corpus.files})}


# ---- reading, one batch at a time (inside Ray) ----------------------------------------


def row_key(repo: Optional[str], path: Optional[str], content: str) -> str:
    if repo and path:
        return f"{repo}/{path}"
    return path or repo or content_hash(content)


def read_py_batch(batch: pa.Table, max_bytes: int, ledger: Any = None) -> pa.Table:
    """Ray stage: (file, path) rows -> (path, content) rows; unusable files counted."""
    from training.data.stats import report

    counts: Counter = Counter()
    out = read_py_files(batch.column("file").to_pylist(), batch.column("path").to_pylist(), max_bytes, counts)
    report(ledger, counts)
    return out


def read_py_files(files: list[str], keys: list[str], max_bytes: int, counts: Counter) -> pa.Table:
    """Read and check .py files; never raises on a bad or vanished file."""
    out_keys, texts = [], []
    for file, key in zip(files, keys):
        counts["files_read"] += 1
        try:
            if os.path.getsize(file) > max_bytes:  # never read a huge file into memory
                counts["skipped:too_large"] += 1
                continue
            with open(file, "rb") as fh:
                raw = fh.read()
        except OSError:
            counts["skipped:unreadable"] += 1
            continue
        text, reason = decode_source(raw, max_bytes)
        if reason:
            counts[f"skipped:{reason}"] += 1
            continue
        out_keys.append(key)
        texts.append(text)
    return pa.table([pa.array(out_keys, pa.string()), pa.array(texts, pa.string())], schema=ROWS)


def rows_from_table(table: pa.Table, max_bytes: int, counts: Counter,
                    licenses: Iterable[str] = ()) -> pa.Table:
    """Rows with a `content` column (CodeParrot schema) -> checked (path, content) rows.
    licenses: keep only rows whose `license` is one of them (checked before the text)."""
    cols = table.column_names
    contents = table.column("content").to_pylist()
    none = [None] * len(contents)
    repos = table.column("repo_name").to_pylist() if "repo_name" in cols else none
    paths = table.column("path").to_pylist() if "path" in cols else none
    errors = table.column("error").to_pylist() if "error" in cols else none
    allowed = normalize_licenses(licenses)
    lics = table.column("license").to_pylist() if allowed and "license" in cols else none
    keys, texts = [], []
    for repo, path, text, error, lic in zip(repos, paths, contents, errors, lics):
        counts["files_read"] += 1
        reason = error or (license_problem(lic, allowed) if allowed else None)
        if reason is None and isinstance(text, bytes):
            text, reason = decode_source(text, max_bytes)
        elif reason is None:
            reason = text_problem(text, max_bytes)
        if reason:
            counts[f"skipped:{reason}"] += 1
            continue
        keys.append(row_key(repo, path, text))
        texts.append(text)
    return pa.table([pa.array(keys, pa.string()), pa.array(texts, pa.string())], schema=ROWS)


def table_stage(batch: pa.Table, max_bytes: int, ledger: Any = None, licenses: Iterable[str] = ()) -> pa.Table:
    """Ray stage: raw rows (Parquet, JSONL, hub) -> checked (path, content) rows."""
    from training.data.stats import report

    counts: Counter = Counter()
    out = rows_from_table(batch, max_bytes, counts, licenses)
    report(ledger, counts)
    return out


RAW = pa.schema([("repo_name", pa.string()), ("path", pa.string()), ("content", pa.string()),
                 ("error", pa.string()), ("license", pa.string())])
_PASSED = ("repo_name", "path", "content", "license")  # the source's columns a raw row keeps


def read_table_units(batch: pa.Table, batch_rows: int) -> Iterator[pa.Table]:
    """(file, row_group) units -> raw rows, streamed in tables of <= batch_rows rows.
    Not checked here: `table_stage` checks and counts, after any `max_files` limit."""
    for file, rg in zip(batch.column("file").to_pylist(), batch.column("row_group").to_pylist()):
        yield from iter_raw(file, rg, batch_rows)


def iter_raw(file: str, rg: int, batch_rows: int) -> Iterator[pa.Table]:
    if file.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(file)
        cols = [c for c in _PASSED if c in pf.schema_arrow.names]
        for rb in pf.iter_batches(batch_size=batch_rows, row_groups=[rg], columns=cols):
            t = pa.Table.from_batches([rb])
            data = {k: (t.column(k).to_pylist() if k in cols else [None] * t.num_rows) for k in _PASSED}
            yield _raw_table([dict(zip(data, vals)) for vals in zip(*data.values())])
        return
    with _open_text(file) as fh:
        yield from _batched_tables((_json_row(line) for line in fh if line.strip()), batch_rows)


def _json_row(line: str) -> dict:
    try:
        row = json.loads(line)
        if not isinstance(row, dict):
            raise ValueError
        return row
    except ValueError:  # also UnicodeDecodeError: one bad line, not a dead job
        return {"error": "bad_json"}


def _batched_tables(rows: Iterable[dict], batch_rows: int) -> Iterator[pa.Table]:
    """Raw rows -> tables of at most batch_rows, so no task holds more than a batch."""
    batch: list[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= batch_rows:
            yield _raw_table(batch)
            batch = []
    if batch:
        yield _raw_table(batch)


def _raw_table(rows: list[dict]) -> pa.Table:
    """Rows as plain strings; bytes content is decoded here (or marked with an error)."""
    cols: dict[str, list] = {"repo_name": [], "path": [], "content": [], "error": [], "license": []}
    for r in rows:
        content, error = r.get("content"), r.get("error")
        if isinstance(content, bytes):
            content, error = decode_source(content, len(content) + 1)
        elif content is not None and not isinstance(content, str):
            content, error = None, "bad_content"
        cols["content"].append(content)
        cols["error"].append(error)
        for k in ("repo_name", "path", "license"):
            v = r.get(k)
            cols[k].append(None if v is None else str(v))
    return pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()}, schema=RAW)


# ---- tokenizer sample (driver, no Ray) ------------------------------------------------


def iter_texts(corpus: Corpus, max_bytes: int, batch_rows: int = 256,
               licenses: Iterable[str] = ()) -> Iterator[tuple[str, str]]:
    """(path, content) of usable files in corpus order (tables: of an allowed licence): the
    tokenizer's training sample is drawn from the front of this stream."""
    if corpus.kind == "folder":
        root = Path(corpus.root)
        for f in corpus.files:
            try:
                if os.path.getsize(f) > max_bytes:
                    continue
                text, _ = decode_source(Path(f).read_bytes(), max_bytes)
            except OSError:
                continue
            if text is not None:
                yield Path(f).relative_to(root).as_posix(), text
    elif corpus.kind == "table":
        for file, rg in corpus.units:
            for raw in iter_raw(file, rg, batch_rows):
                table = rows_from_table(raw, max_bytes, Counter(), licenses)
                yield from zip(table.column("path").to_pylist(), table.column("content").to_pylist())
    else:
        for row in load_hub(corpus):
            table = rows_from_table(_raw_table([row]), max_bytes, Counter(), licenses)
            yield from zip(table.column("path").to_pylist(), table.column("content").to_pylist())


def load_hub(corpus: Corpus, max_files: Optional[int] = None) -> Any:
    """The hub data set as a streaming `datasets.IterableDataset` (reads shards as they are
    iterated; needs a network for a hub name, works offline for a local folder of Parquet
    or JSONL files). Picks the `train` split, or the only split there is."""
    import datasets

    try:
        splits = datasets.load_dataset(corpus.location, streaming=True)
    except Exception as e:
        raise ConfigError(f"{corpus.field}={corpus.location!r}: could not load the data set: {e}") from None
    names = list(splits.keys())
    name = "train" if "train" in names else (names[0] if len(names) == 1 else None)
    if name is None:
        raise ConfigError(f"{corpus.field}={corpus.location!r}: has splits {names}; expected 'train' or one split")
    ds = splits[name]
    if ds.column_names is not None and "content" not in ds.column_names:
        raise ConfigError(f"{corpus.field}={corpus.location!r}: no 'content' column (columns: {ds.column_names})")
    return ds.take(max_files) if max_files else ds


def read_hub_shards(batch: pa.Table, location: str, field_name: str, batch_rows: int) -> Iterator[pa.Table]:
    """Ray stage: hub shard numbers -> raw rows. Each task streams its own shards of the
    data set (`IterableDataset.shard`), so shards download and tokenize in parallel and
    no task holds more than a batch. (`ray.data.from_huggingface` would do one streaming
    read task, and it queries the hub API even for a local folder.)"""
    corpus = Corpus("hub", location, field_name)
    ds = load_hub(corpus)
    for index in batch.column("shard").to_pylist():
        yield from _batched_tables(ds.shard(num_shards=ds.num_shards, index=index), batch_rows)
