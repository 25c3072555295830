"""The engine choice, the GPU a replica asks for, and the dtype: pure functions of what the
cluster and the hardware say (no GPU here, so they are tested as functions)."""

from __future__ import annotations

import pytest

from serving.deployment.engine_choice import choose_engine, model_params, replica_gpus
from serving.engine.dtypes import cpu_flags, resolve_dtype, vllm_cpu_problem
from serving.engine.vllm_engine import cpu_environment, finish_reason


@pytest.mark.parametrize("device,capability,flags,want", [
    ("cuda", (9, 0), (), "bfloat16"),      # H100
    ("cuda", (8, 6), (), "bfloat16"),      # A10G
    ("cuda", (8, 0), (), "bfloat16"),      # A100
    ("cuda", (7, 5), (), "float16"),       # T4
    ("cuda", (7, 0), (), "float16"),       # V100
    ("cpu", None, ("avx2", "avx512f", "avx512_bf16"), "bfloat16"),  # Xeon Cooper Lake+ / EPYC Zen 4
    ("cpu", None, ("avx2", "amx_bf16", "amx_tile"), "bfloat16"),     # Xeon Sapphire Rapids
    ("cpu", None, ("avx2", "avx512f"), "float32"),                   # Skylake: bf16 only emulated
    ("cpu", None, ("avx2",), "float32"),                             # EPYC Zen 2/3
])
def test_auto_dtype_is_bf16_where_the_hardware_has_it(device, capability, flags, want):
    assert resolve_dtype("auto", device, compute_capability=capability, cpu_flags=flags) == want


def test_an_explicit_dtype_is_kept_and_a_bad_one_named():
    assert resolve_dtype("float32", "cuda", compute_capability=(9, 0)) == "float32"
    with pytest.raises(ValueError, match="'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()
    assert "fpu" in cpu_flags() or cpu_flags() == set()  # this machine's, where it has /proc/cpuinfo


def test_a_cpu_vllm_cannot_use_fails_with_one_line():
    assert vllm_cpu_problem({"avx2", "avx512f"}) is None
    assert vllm_cpu_problem({"avx2"}) is None  # vLLM: "avx2, limited features", runs
    line = vllm_cpu_problem({"sse4_2"})
    assert line and "\n" not in line and "--engine native" in line


GPT2_SMALL_SHAPE = 12 * 12 * 768 ** 2 + (4096 + 1024) * 768  # issue 20's: vLLM faster on a bf16 CPU
TINY_SHAPE = 12 * 2 * 128 ** 2 + (8000 + 128) * 128          # the tiny preset: native faster


@pytest.mark.parametrize("requested,gpus,has_vllm,params,cpu_bf16,want", [
    ("auto", 4, True, TINY_SHAPE, False, "vllm"),             # GPUs: the native engine has no GPU path
    ("auto", 0, True, TINY_SHAPE, True, "native"),
    ("auto", 0, True, GPT2_SMALL_SHAPE, True, "vllm"),        # bf16 CPU: vLLM computes in bf16
    ("auto", 0, True, GPT2_SMALL_SHAPE, False, "native"),     # fp32 CPU: level speed, vLLM starts slower
    ("auto", 4, False, GPT2_SMALL_SHAPE, True, "native"),     # not installed
    ("native", 4, True, GPT2_SMALL_SHAPE, True, "native"), ("vllm", 0, True, TINY_SHAPE, False, "vllm"),
])
def test_engine_choice(requested, gpus, has_vllm, params, cpu_bf16, want):
    assert choose_engine(requested, gpus, has_vllm, params, cpu_bf16) == want


def test_the_model_size_is_read_from_the_checkpoint(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"n_embd": 768, "n_layer": 12, "vocab_size": 4096,
                                                      "n_positions": 1024}))
    assert model_params(tmp_path) == GPT2_SMALL_SHAPE
    assert model_params(tmp_path / "missing") == 0


def test_asking_for_vllm_where_it_is_not_installed_says_how_to_install_it():
    with pytest.raises(ValueError, match="setup.sh installs"):
        choose_engine("vllm", 0, False)


def test_a_replica_asks_for_a_gpu_only_for_the_vllm_engine_on_a_gpu_cluster():
    assert replica_gpus("vllm", None, 8) == 1.0
    assert replica_gpus("vllm", None, 0) == 0.0
    assert replica_gpus("native", None, 8) == 0.0
    assert replica_gpus("vllm", 0.5, 8) == 0.5  # as asked


def test_vllm_finish_reasons_become_the_projects():
    sentinel = 7
    assert finish_reason(None, None, ()) is None
    assert finish_reason("length", None, ()) == "length"
    assert finish_reason("stop", None, ()) == "eos"              # end-of-text
    assert finish_reason("stop", sentinel, ()) == "eos"          # a FIM sentinel ends a middle
    assert finish_reason("stop", sentinel, (sentinel,)) == "stop"  # a stop token the user asked for
    assert finish_reason("stop", "\n\n", ()) == "stop"           # a stop string
    assert finish_reason("abort", None, ()) == "cancelled"


def test_the_cpu_environment_preloads_intel_openmp_and_leaves_what_the_user_set():
    env = cpu_environment(2, env={})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and env["OMP_NUM_THREADS"] == "2"
    assert env["VLLM_CPU_KVCACHE_SPACE"]
    mine = cpu_environment(2, env={"VLLM_CPU_OMP_THREADS_BIND": "0-1", "OMP_NUM_THREADS": "1",
                                    "VLLM_CPU_KVCACHE_SPACE": "8", "LD_PRELOAD": "/x/libiomp5.so"})
    assert mine == {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "8"}
