"""Native bf16 on a CPU, decided from /proc/cpuinfo's flags alone (any machine can run these)."""

from __future__ import annotations

import pytest

from training.train.cpu_features import bf16_native, parse_cpuinfo, read_cpuinfo, speed_flags

ZEN4 = "fpu sse2 avx2 avx512f avx512dq avx512_bf16 avx512_vnni avx512vl"
SAPPHIRE_RAPIDS = "avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8"
ZEN3 = "fpu sse2 avx avx2 fma"
ICE_LAKE = "avx2 avx512f avx512dq avx512_vnni avx512vl"
AMX_ONLY = "avx2 avx512f amx_tile amx_bf16"  # a kernel that hides avx512_bf16 but shows AMX


@pytest.mark.parametrize("flags, native", [
    (ZEN4, True), (SAPPHIRE_RAPIDS, True), (AMX_ONLY, True),
    (ZEN3, False), (ICE_LAKE, False), ("", False),
    ("avx512_bf16_extra amx_bf16x", False),  # whole flags only, never substrings
])
def test_bf16_is_native_only_with_avx512_bf16_or_amx(flags, native):
    assert bf16_native(flags.split()) is native


def test_the_first_processors_model_and_flags_are_read():
    text = (f"processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: {ZEN4}\n\n"
            f"processor\t: 1\nmodel name\t: other\nflags\t\t: {ZEN3}\n")
    cpu = parse_cpuinfo(text)
    assert cpu["model"] == "AMD EPYC 9R14" and bf16_native(cpu["flags"])
    assert speed_flags(cpu["flags"]) == ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]
    arm = parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert arm["flags"] == ["fp", "asimd", "bf16"] and not bf16_native(arm["flags"])  # torch's ARM bf16 is not tuned here


def test_a_machine_without_proc_cpuinfo_assumes_no_native_bf16(tmp_path):
    assert read_cpuinfo(str(tmp_path / "missing")) == {"model": "", "flags": []}


def test_each_cpu_worker_gets_a_core_of_its_own_or_none():
    from training.train.cpu_features import core_for

    assert [core_for(r, 2, {0, 1}) for r in range(2)] == [0, 1]
    assert [core_for(r, 2, range(8)) for r in range(2)] == [0, 4]  # spread over the allowed cores
    assert [core_for(r, 2, {3, 5}) for r in range(2)] == [3, 5]  # only cores the process may use
    assert core_for(0, 3, {0, 1}) is None  # more workers than cores: the OS places them
    assert core_for(2, 2, {0, 1}) is None
