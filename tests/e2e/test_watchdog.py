"""No stage hangs silently: a stall becomes one error line naming the pending demand and the flag."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.support.ray_cluster import LocalRayHead
from training.train.watchdog import StallError, describe, watched


def test_a_stage_without_progress_fails_naming_the_demand_and_the_flag(capsys):
    def stuck():
        time.sleep(30)

    t0 = time.monotonic()
    with pytest.raises(StallError, match=r"training stage made no progress for 1s \(--stall-timeout\): "
                                         r"pending resource demand 2 x \{'CPU': 1\}.*--cpus-per-worker"):
        watched("training", 1.0, stuck, progress=lambda: 0,  # a heartbeat that never moves
                demand=lambda: [{"CPU": 1.0}, {"CPU": 1.0}])
    assert time.monotonic() - t0 < 20
    assert capsys.readouterr().out.count("[job] error:") == 1


def test_progress_keeps_a_slow_stage_alive():
    beats = iter(range(1000))

    def slow():
        time.sleep(3)
        return "done"

    assert watched("training", 1.0, slow, progress=lambda: next(beats), demand=lambda: [{"CPU": 1.0}]) == "done"


def test_demand_is_described_by_shape():
    assert describe([]) == "no pending resource demand"
    assert describe([{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 0.5, "GPU": 1.0}]) == \
        "pending resource demand 2 x {'CPU': 1}, 1 x {'CPU': 0.5, 'GPU': 1}"


HOLD = """
import ray, sys, time
from ray.util.placement_group import placement_group
ray.init()
pg = placement_group([{"CPU": %d}])
ray.get(pg.ready())
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_cluster_that_cannot_run_the_job_fails_it_with_one_line(small_corpus, tmp_path):
    """A plain 2-CPU head whose CPUs a placement group of this test holds: the data stage can
    never place a task. The job must end with the stall line, not wait."""
    with LocalRayHead(num_cpus=2) as head:
        env = {**head.env, "RAY_ADDRESS": head.address}
        holder = subprocess.Popen([sys.executable, "-c", HOLD % 2], env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            out = tmp_path / "run"
            r = head.submit("python", "training/run.py", "--preset", "tiny", "--corpus", str(small_corpus),
                            "--output", str(out), "--vocab-size", "1000", "--tokenizer-train-files", "40",
                            "--max-steps", "2", "--stall-timeout", "20", timeout=400)
        finally:
            holder.kill()
            holder.wait()
    log = r.stdout + r.stderr
    assert r.returncode != 0
    lines = sorted({x for x in log.splitlines() if x.startswith("error: ")})  # `ray job submit` echoes the log
    assert len(lines) == 1, log[-3000:]
    assert "data stage made no progress for 20s (--stall-timeout): pending resource demand" in lines[0]
    assert "'CPU'" in lines[0] and "--cpus-per-worker" in lines[0]
    assert "Traceback" not in log
    assert not (out / "run.json").exists()
