"""The licence filter (`data.licenses`): keep only rows whose `license` column is allowed.

CodeParrot's tables (and The Stack's) carry a `license` per row (`mit`, `apache-2.0`,
`bsd-3-clause`, `gpl-3.0`, ...). The check runs where the source reader checks each row
(`sources.rows_from_table`), before the text is decoded, so an excluded row costs nothing
downstream. A row without a licence is dropped, never assumed allowed. A corpus that
cannot have the column (a folder of .py files, a table whose files lack it) is refused on
the driver before Ray starts; where the columns are only known from the rows (a hub set
without declared features), a run in which no row had a licence fails in one line.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from training.config.fields import ConfigError


def normalize_licenses(names: Iterable[str]) -> frozenset[str]:
    """Licence names compared case-insensitively (CodeParrot's are lower case)."""
    return frozenset(n.strip().lower() for n in names if n and n.strip())


def license_problem(license: Optional[str], allowed: frozenset[str]) -> Optional[str]:
    """The reason a row's licence keeps it out (`license_missing`, `license_not_allowed`), or None."""
    if license is None or not str(license).strip():
        return "license_missing"
    return None if str(license).strip().lower() in allowed else "license_not_allowed"


def _named(licenses: Iterable[str]) -> str:
    return ",".join(sorted(normalize_licenses(licenses)))


def may_have_licenses(corpus: Any) -> bool:
    """False for a corpus (sources.Corpus) known to have no `license` column; `columns`
    None (not known before reading) may have one: the rows decide."""
    return corpus.columns is None or "license" in corpus.columns


def check_licenses(licenses: Iterable[str], *corpora: Any, field_name: str = "data.licenses") -> None:
    """Refuse a licence filter on a corpus known to have no `license` column."""
    if not normalize_licenses(licenses):
        return
    for c in corpora:
        if c is None or may_have_licenses(c):
            continue
        what = ("is a folder of .py files, which has no licence column" if c.kind == "folder" else
                "has no 'license' column" + (" in every file" if len(c.files) > 1 else "")
                + f" (columns{' common to all' if len(c.files) > 1 else ''}: {', '.join(sorted(c.columns))})")
        raise ConfigError(f"{field_name}={_named(licenses)!r}: {c.field}={c.location!r} {what}; the licence "
                          f"filter needs a Parquet/JSONL/hub corpus with a 'license' column (CodeParrot's "
                          f"schema), or leave {field_name} empty")


def check_license_counts(licenses: Iterable[str], stats: dict, field_name: str = "data.licenses") -> None:
    """After the stream (stats: the summarized counts): if every row read lacked a licence,
    the corpus has no licence column after all; say so in one line rather than as an empty
    training split. If only some did, add a warning to stats."""
    if not normalize_licenses(licenses):
        return
    missing, read = stats.get("files_skipped", {}).get("license_missing", 0), stats.get("files_read", 0)
    if missing and missing == read:
        raise ConfigError(f"{field_name}={_named(licenses)!r}: none of the {read} rows read has a 'license' "
                          f"value; the licence filter needs a corpus with a 'license' column (CodeParrot's "
                          f"schema), or leave {field_name} empty")
    if missing:
        stats.setdefault("warnings", []).append(f"{missing} of {read} rows had no 'license' value and were dropped")
        print(f"data: warning: {stats['warnings'][-1]}", flush=True)
