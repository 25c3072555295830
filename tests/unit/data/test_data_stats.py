"""Stats arithmetic, the fingerprint that decides reuse, and the atomic stats file."""

from __future__ import annotations

from training.data.stats import fingerprint, one_line, read_stats, summarize, write_stats


def test_summary_fields_from_ledger_counts():
    counts = {"files_read": 10, "skipped:binary": 1, "skipped:empty": 2, "files:train": 6, "files:valid": 1,
              "tokens:train": 1000, "tokens:valid": 200, "chunks:train": 7, "chunks:valid": 1}
    s = summarize(counts, context_length=128, chunking="truncate")
    assert s["files_skipped"] == {"binary": 1, "empty": 2} and s["files_kept"] == 7
    assert (s["chunks_train"], s["chunks_valid"]) == (7, 1)
    assert (s["tokens_train"], s["tokens_valid"]) == (7 * 128, 128)
    assert s["chunk_yield"] == round(8 * 128 / 1200, 6) and s["tokens_dropped"] == 1200 - 8 * 128
    assert "7 train / 1 valid chunks" in one_line(s)


def test_fingerprint_is_order_independent_and_value_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_stats_file_round_trip_and_unreadable_is_none(tmp_path):
    path = tmp_path / "data" / "stats.json"
    write_stats(path, {"chunks_train": 3})
    assert read_stats(path) == {"chunks_train": 3}
    assert not list(path.parent.glob("*.tmp"))
    path.write_text("{half")
    assert read_stats(path) is None
    assert read_stats(tmp_path / "missing.json") is None
