"""The preflight probes as real Ray tasks."""

from __future__ import annotations

import pytest

from training.train.preflight import probe_workers


@pytest.mark.timeout(300)
def test_real_probe_tasks_report_what_they_see(tmp_path):
    import ray

    from training.ray_utils import init_ray

    init_ray(num_cpus=2)
    try:
        (tmp_path / "train").mkdir()
        got = probe_workers(2, False, 0.25, [str(tmp_path / "train"), str(tmp_path / "gone")], str(tmp_path / "ck"))
    finally:
        ray.shutdown()
    assert len(got) == 2
    assert all(r["missing"] == [str(tmp_path / "gone")] and r["storage_ok"] and not r["cuda"] for r in got)
    assert not (tmp_path / "ck" / ".storage_probe").exists()  # the token is removed afterwards
