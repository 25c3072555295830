"""The train/validation split: a pure, stable function of the file's key."""

from __future__ import annotations

from training.data.split import TRAIN, VALID, key_fraction, split_of


def test_split_is_a_stable_function_of_the_key():
    # Pinned values: a change of hash would silently move files between splits.
    assert round(key_fraction("asyncio/base_events.py"), 6) == 0.255226
    assert round(key_fraction("repo/x.py"), 6) == 0.615199
    assert key_fraction("a.py") == key_fraction("a.py") != key_fraction("b.py")
    assert [split_of(f"repo/file_{i}.py", 0.3) for i in range(50)] == [split_of(f"repo/file_{i}.py", 0.3) for i in range(50)]


def test_split_fraction_is_close_to_the_config():
    keys = [f"owner/repo/pkg/module_{i}.py" for i in range(20_000)]
    valid = sum(split_of(k, 0.1) == VALID for k in keys)
    assert 1_800 < valid < 2_200


def test_zero_fraction_sends_everything_to_train():
    assert {split_of(f"f{i}.py", 0.0) for i in range(1000)} == {TRAIN}
