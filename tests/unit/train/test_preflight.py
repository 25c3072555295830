"""The workers' own view before training: their GPU, the prepared data, the checkpoint storage."""

from __future__ import annotations

import pytest

from training.config import ConfigError
from training.train.preflight import check_probes, gpu_probe


def probe(**kw):
    return {"node": "abcdef0123", "cuda": False, "bf16_native": False, "gpu_name": None, "missing": [],
            "storage_ok": True, **kw}


def test_a_worker_that_cannot_see_the_data_or_the_storage_fails_naming_the_flag():
    check_probes([probe(), probe()], "/shared/ckpt", "/shared/run")
    with pytest.raises(ConfigError, match=r"output='runs/x': a training worker .* cannot see /x/data/train; .*same path"):
        check_probes([probe(), probe(missing=["/x/data/train"])], "/x/ray_results", "runs/x")
    with pytest.raises(ConfigError, match=r"train.storage_path='/local/ckpt': .* s3://"):
        check_probes([probe(storage_ok=False)], "/local/ckpt", "runs/x")


def test_bf16_only_when_every_worker_has_it_natively():
    a10g = probe(cuda=True, bf16_native=True, gpu_name="NVIDIA A10G")
    t4 = probe(cuda=True, bf16_native=False, gpu_name="Tesla T4")
    assert gpu_probe([a10g, a10g])["bf16_native"] is True
    assert gpu_probe([a10g, t4]) == {"cuda": True, "bf16_native": False, "gpus": ["NVIDIA A10G", "Tesla T4"],
                                     "cpu_bf16_native": False, "cpus": []}
    assert gpu_probe([])["cuda"] is False


def test_cpu_bf16_only_when_every_workers_cpu_has_it_natively():
    zen4 = probe(cpu_model="AMD EPYC 9R14", cpu_bf16_native=True)
    zen3 = probe(cpu_model="AMD EPYC 7R13", cpu_bf16_native=False)
    assert gpu_probe([zen4, zen4])["cpu_bf16_native"] is True
    assert gpu_probe([zen4, zen3])["cpu_bf16_native"] is False  # one slow worker would hold back every step
    assert gpu_probe([zen4, zen3])["cpus"] == ["AMD EPYC 7R13", "AMD EPYC 9R14"]
    assert gpu_probe([probe()])["cpu_bf16_native"] is False  # a probe without the key: never guess bf16
