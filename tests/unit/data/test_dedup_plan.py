"""The pure parts of dedup: MinHash agrees with datasketch, the bucket resolution keeps the
same file whatever the order, pass 2 drops exactly the planned identities, batch keys and
chunk digests do not depend on how rows were grouped."""

from __future__ import annotations

import random
import re

import numpy as np
import pyarrow as pa
import pytest
from datasketch import MinHash, MinHashLSH

from tests.support.corpus import stdlib_files
from training.data import dedup, minhash
from training.data.chunking import add_digests, chunk_digest, chunks_to_table
from training.data.filters import content_hash
from training.data.stats import batch_key

CODEPARROT_NON_ALPHA = re.compile("[^A-Za-z_0-9]")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [f.read_text(encoding="utf-8") for f in stdlib_files(12)]


def test_tokens_are_codeparrots_get_tokens_in_utf8(texts):
    # The same pieces as CodeParrot's regex, non-ASCII letters and lone surrogates being
    # separators in both.
    for t in texts + ["", "a", "  x=1\n\ty_2 = x+1 # é ü\n", "__init__(self)", "naïve_név = ünï + 1",
                      "a\ud800b c", "日本語 x"]:
        assert minhash.tokens(t) == {w.encode("utf-8") for w in CODEPARROT_NON_ALPHA.split(t) if len(w.strip()) > 0}


def test_signatures_are_datasketchs_minhash_bit_for_bit(texts):
    sets = [minhash.tokens(t) for t in texts] + [{f"tok{i}".encode() for i in range(40_000)}, {b"only"}]
    sigs = minhash.signatures(sets)  # the 40k-token set spans several numpy steps
    # In a batch next to each other, small files share steps and the big one spans several.
    reordered = minhash.signatures(sets[-2:] + sets[:-2])
    assert np.array_equal(reordered, np.concatenate([sigs[-2:], sigs[:-2]]))
    for s, sig in zip(sets, sigs):
        m = MinHash(num_perm=256)
        m.update_batch(list(s))
        assert np.array_equal(m.hashvalues, sig)
    a, b = MinHash(num_perm=256), MinHash(num_perm=256)
    a.update_batch(list(sets[0]))
    b.update_batch(list(sets[1]))
    assert minhash.jaccard(sigs[0], sigs[1]) == a.jaccard(b)


def test_band_layout_is_datasketchs_lsh_and_equal_bands_share_keys():
    lsh = MinHashLSH(threshold=0.85, num_perm=256)
    assert minhash.lsh_bands(0.85) == (lsh.b, lsh.r) == (13, 19)
    sig = minhash.signatures([{f"t{i}".encode() for i in range(50)}])[0]
    other = sig.copy()
    other[0] ^= 1  # only band 0 differs
    ka, kb = minhash.band_keys(sig, 13, 19), minhash.band_keys(other, 13, 19)
    assert ka[0] != kb[0] and ka[1:] == kb[1:] and len(set(ka)) == 13


def _plan_rows(files: dict[str, str], split: str = "train") -> pa.Table:
    batch = pa.table({"path": list(files), "content": list(files.values()), "split": [split] * len(files),
                      "content_hash": [content_hash(t) for t in files.values()]})
    return dedup.plan_rows(batch, near=True)


def _resolve(plan: pa.Table, shuffle_seed: int) -> list[tuple]:
    keyed = dedup.keyed_rows(plan, buckets=1, bands=13, rows=19)
    idx = list(range(keyed.num_rows))
    random.Random(shuffle_seed).shuffle(idx)
    out = dedup.resolve_bucket(keyed.take(pa.array(idx)))
    return sorted(zip(*(out.column(c).to_pylist() for c in dedup.RESOLVED.names)))


def test_bucket_resolution_keeps_the_smallest_path_whatever_the_order(texts):
    base, other = texts[0], texts[1]
    files = {"z/copy.py": base, "a/orig.py": base, "m/ws.py": base.replace("    ", "\t") + "\n\n",
             "b/near.py": base + "\n# one added comment line\n", "c/other.py": other}
    plan = _plan_rows(files)
    runs = {_resolve(plan, seed).__repr__() for seed in range(5)}
    assert len(runs) == 1  # the row order inside a bucket changes nothing
    rows = _resolve(plan, 0)
    exact = {(r[5], r[2]) for r in rows if r[0] == "exact"}
    assert exact == {("m/ws.py", "a/orig.py"), ("z/copy.py", "a/orig.py")}
    pairs = {(r[3], r[6]) for r in rows if r[0] == "pair"}
    assert pairs == {(content_hash(base), content_hash(files["b/near.py"]))}


def test_short_files_get_no_signature_and_no_band_rows():
    plan = _plan_rows({"short.py": "a = b + c\n", "long.py": " ".join(f"w{i}" for i in range(20))})
    assert plan.column("sig").to_pylist()[0] is None and len(plan.column("sig").to_pylist()[1]) == 1024
    keyed = dedup.keyed_rows(plan, buckets=3, bands=13, rows=19)
    assert keyed.column("path").to_pylist().count("short.py") == 1  # its exact row only
    assert set(keyed.column("bucket").to_pylist()) <= {0, 1, 2}


def test_large_band_buckets_stay_connected_at_linear_cost():
    small = dedup.candidate_pairs(list(range(5)))
    assert len(small) == 10
    big = dedup.candidate_pairs(list(range(100)))
    assert len(big) == 99 + 98
    parent = {i: i for i in range(100)}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x
    for a, b in big:
        parent[find(a)] = find(b)
    assert len({find(i) for i in range(100)}) == 1


def test_drop_reasons_match_identities_and_hashes():
    h1, h2, h3 = (content_hash(t) for t in ("a = 1", "b = 2", "c = 3"))
    drops = dedup.Drops(exact=np.array(sorted([dedup.identity_key("train", "x.py", h1)]), dtype=np.int64),
                        near=np.array(sorted([dedup.hash_key(h2)]), dtype=np.int64))
    reasons = dedup.drop_reasons(["train", "valid", "train", "train"], ["x.py", "x.py", "y.py", "z.py"],
                                 [h1, h1, h2, h3], drops)
    assert reasons == ["duplicate", None, "near_duplicate", None]
    assert dedup.drop_reasons([], [], [], dedup.Drops()) == []


def test_batch_key_is_the_rows_not_the_object():
    t = pa.table({"path": ["a.py", "b.py"], "content": ["x", "yy"]})
    again = pa.table({"path": ["a.py", "b.py"], "content": ["x", "yy"]})
    assert batch_key("read", t) == batch_key("read", again)
    assert batch_key("read", t) != batch_key("tokenize", t)
    assert batch_key("read", t) != batch_key("read", t.slice(0, 1))
    pathless = pa.table({"path": [None, None], "content": ["x", "y"]})
    assert batch_key("t", pathless) != batch_key("t", pa.table({"path": [None, None], "content": ["x", "z"]}))


def test_chunk_digest_is_additive_and_order_free():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 500, size=(9, 16), dtype=np.int32)
    whole = chunk_digest(chunks_to_table(a, "train").drop_columns(["split"]))
    parts = [chunk_digest(chunks_to_table(a[i:j], "train").drop_columns(["split"])) for i, j in ((0, 4), (4, 9))]
    assert add_digests(parts) == whole
    assert chunk_digest(chunks_to_table(a[::-1].copy(), "train")) == whole
    labels = np.where(a > 100, a, -100).astype(np.int32)
    assert chunk_digest(chunks_to_table(a, "train", labels)) != whole
    b = a.copy()
    b[3, 5] += 1
    assert chunk_digest(chunks_to_table(b, "train")) != whole


def test_a_lost_actor_anywhere_in_the_cause_chain_ends_the_stage_with_one_line():
    import ray.exceptions as rex

    from training.data.pipeline import LostWorkerError, lost_worker_guard

    with pytest.raises(LostWorkerError) as err:
        with lost_worker_guard():
            try:
                raise rex.ActorDiedError()
            except rex.ActorDiedError as inner:
                raise RuntimeError("a Ray Data task failed") from inner
    assert str(err.value).startswith("data: the stage lost a Ray worker (ActorDiedError")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError):  # anything else passes through unchanged
        with lost_worker_guard():
            raise ValueError("bad input")


@pytest.mark.parametrize("value,dedup,why", [(0.0, True, "must be in"), (1.0, True, "must be in"),
                                             (1.5, True, "must be in"), (0.85, False, "needs data.dedup")])
def test_near_dedup_is_checked_before_any_cluster_work(value, dedup, why):
    from training.config import ConfigError, DataConfig

    with pytest.raises(ConfigError, match=rf"data.near_dedup={value!r}: {why}"):
        DataConfig(dedup=dedup, near_dedup=value).validate()
    DataConfig(dedup=True, near_dedup=0.85).validate()
