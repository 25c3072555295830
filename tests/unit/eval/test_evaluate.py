"""The evaluation CLI: fails fast on bad input, and a real run writes results and a report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO_ROOT  # noqa: E402

REPO = REPO_ROOT


def _cli(*args: str, timeout: float = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, str(REPO / "training" / "eval" / "evaluate.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv,msg", [
    (["--checkpoint", "no/such/dir"], "no such folder"),
    (["--checkpoint", "tests"], "not a model folder"),
    ([], "give --checkpoint DIR or --endpoint URL"),
    (["--endpoint", "http://127.0.0.1:9/v1/completions"], "add --humaneval"),
    (["--endpoint", "ftp://x", "--humaneval"], "http(s) URL"),
    (["--checkpoint", "x", "--n", "0"], "--n must be >= 1"),
    (["--checkpoint", "x", "--temperature", "-1"], "--temperature"),
])
def test_bad_arguments_fail_fast_without_ray(argv, msg, capsys):
    import ray

    from training.eval.evaluate import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    assert msg in capsys.readouterr().err
    assert not ray.is_initialized()


def test_a_folder_without_weights_is_not_a_model(tiny_checkpoint, tmp_path, capsys):
    from training.eval.evaluate import main

    broken = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").unlink()
    assert main(["--checkpoint", str(broken)]) == 2
    # The serving engine's own check (serving/engine/engine.py), the one that loads it later.
    assert "missing model.safetensors" in capsys.readouterr().err
    (broken / "config.json").write_text("{not json")
    shutil.copy(tiny_checkpoint / "model.safetensors", broken)
    assert main(["--checkpoint", str(broken)]) == 2
    assert "config.json is unreadable" in capsys.readouterr().err


def test_a_pickled_checkpoint_is_refused_like_the_engine_refuses_it(tiny_checkpoint, tmp_path, capsys):
    from training.eval.evaluate import main

    pickled = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    assert main(["--checkpoint", str(pickled)]) == 2
    assert "is not a model folder: missing model.safetensors" in capsys.readouterr().err


def test_a_missing_corpus_fails_before_ray(tiny_checkpoint, tmp_path, capsys):
    import ray

    from training.eval.evaluate import main

    assert main(["--checkpoint", str(tiny_checkpoint), "--corpus", str(tmp_path / "nope")]) == 2
    assert "--corpus=" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_script_entry_point_fails_in_seconds():
    t0 = time.monotonic()
    r = _cli("--checkpoint", "no/such/dir")
    assert r.returncode == 2 and "error: --checkpoint no/such/dir: no such folder" in r.stderr
    assert time.monotonic() - t0 < 60  # imports only; no Ray, no model
