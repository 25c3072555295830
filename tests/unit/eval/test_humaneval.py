"""HumanEval end to end: problems from the wheel, stop sequences, sandboxed scoring, and
sampling from a real checkpoint (Ray actors) and from the project's real HTTP app."""

from __future__ import annotations


import pytest

from training.eval.generation import EndpointError, SamplingParams, generate_with_endpoint, prompts_of
from training.eval.humaneval import STOP_SEQUENCES, load_problems, program, score, truncate_completion
from training.eval.sandbox import Limits

LIMITS = Limits(timeout_s=3.0, memory_mb=512)


def test_the_wheel_carries_164_problems():
    problems = load_problems()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"
    assert {"prompt", "canonical_solution", "test", "entry_point"} <= set(problems[0])
    assert [p["task_id"] for p in load_problems(task_ids=["HumanEval/7", "HumanEval/3"])] == \
        ["HumanEval/7", "HumanEval/3"]
    with pytest.raises(ValueError, match="unknown"):
        load_problems(task_ids=["HumanEval/999"])


@pytest.mark.parametrize("raw,cut", [
    ("    return x\n\ndef other():\n    pass\n", "    return x\n"),
    ("    return x\n# trailing comment\n", "    return x"),
    ("    return x\nif __name__ == '__main__':\n    main()\n", "    return x"),
    ("    return x\nprint(f(1))\n", "    return x"),
    ("    return x\nclass A: pass\n", "    return x"),
    ("    if x:\n        return 1\n    # inner comment\n    return 2\n",
     "    if x:\n        return 1\n    # inner comment\n    return 2\n"),  # indented: kept
])
def test_completions_are_cut_at_the_end_of_the_function(raw, cut):
    assert truncate_completion(raw) == cut
    assert STOP_SEQUENCES == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@pytest.mark.timeout(120)
def test_canonical_solutions_score_pass_at_1_of_one():
    problems = load_problems(limit=10)
    # Stop sequences after the body, as a model would produce them: they must be cut off.
    completions = {p["task_id"]: [p["canonical_solution"] + "\n\ndef unrelated():\n    raise SystemExit(1)\n"]
                   for p in problems}
    r = score(problems, completions, LIMITS, workers=2)
    assert r.pass_at_k == {"pass@1": 1.0}
    assert r.status_counts == {"passed": 10}


@pytest.mark.timeout(120)
def test_bad_samples_fail_without_stopping_the_run():
    problems = load_problems(limit=3)
    bad = ["    while True:\n        pass\n",                     # hangs
           "    import os\n    os._exit(0)\n",                     # exits 0 before the tests run
           "    return None\n",                                    # wrong
           "    open('/etc/evaluation-was-here', 'w')\n"]           # writes outside
    completions = {p["task_id"]: [p["canonical_solution"]] + bad for p in problems}
    r = score(problems, completions, LIMITS, workers=2)
    assert r.per_problem == {p["task_id"]: (5, 1) for p in problems}  # only the canonical passes
    assert r.n == 5
    assert r.status_counts == {"passed": 3, "timeout": 3, "failed": 6, "blocked": 3}
    assert r.pass_at_k["pass@1"] == pytest.approx(0.2)


def test_program_puts_the_tests_after_the_completion():
    p = load_problems(limit=1)[0]
    src = program(p, "    pass\n")
    assert src.startswith(p["prompt"] + "    pass\n")
    assert src.rstrip().endswith(f"check({p['entry_point']})")


# ---- generation --------------------------------------------------------------------------


# Sampling from a checkpoint on Ray actors is exercised end to end by
# tests/e2e/test_evaluate_run.py::test_full_run_writes_results_report_and_loss_curve (one Ray start
# for the CLI instead of one more here: the suite runs on 2 cores).


# ---- the HTTP client against the project's real app ---------------------------------------


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    """The project's FastAPI app (app.api) with the real Engine, under uvicorn on 127.0.0.1."""
    from app.api import build_app
    from serving.engine.engine import Engine
    from serving.local import LocalBackend
    from tests.support.servers import uvicorn_server

    with uvicorn_server(build_app(LocalBackend(Engine(tiny_checkpoint)), api_key="k3y")) as url:
        yield url


@pytest.mark.timeout(900)  # includes building tiny_checkpoint when first
def test_endpoint_client_gets_n_samples_per_problem(served):
    problems = load_problems(limit=2)
    params = SamplingParams(temperature=0.8, max_new_tokens=16, seed=3)
    completions = generate_with_endpoint(served + "/v1/completions", prompts_of(problems), params, n=3,
                                         api_key="k3y", n_per_request=2)  # 2 + 1 per problem
    assert [len(completions[p["task_id"]]) for p in problems] == [3, 3]
    assert all(isinstance(c, str) for v in completions.values() for c in v)
    r = score(problems, completions, LIMITS, workers=2)
    assert r.n == 3


@pytest.mark.timeout(900)
def test_endpoint_errors_are_reported_not_scored(served):
    problems = load_problems(limit=1)
    with pytest.raises(EndpointError, match="401"):
        generate_with_endpoint(served, prompts_of(problems), SamplingParams(max_new_tokens=4), api_key="wrong")
    with pytest.raises(EndpointError, match="404"):
        generate_with_endpoint(served, prompts_of(problems), SamplingParams(max_new_tokens=4),
                               model="no-such-model", api_key="k3y")


@pytest.mark.timeout(900)  # includes building tiny_checkpoint when first
def test_cli_targets_a_running_endpoint_without_starting_ray(served, tmp_path, capsys):
    import json

    import ray

    from training.eval.evaluate import main

    out = tmp_path / "eval.json"
    rc = main(["--endpoint", served, "--api-key", "k3y", "--humaneval", "--task-ids", "HumanEval/2,HumanEval/4",
               "--n", "2", "--max-new-tokens", "8", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    he = json.loads(out.read_text())["humaneval"]
    assert list(he["per_problem"]) == ["HumanEval/2", "HumanEval/4"]
    assert he["samples_per_problem"] == 2 and "pass@1" in he["pass_at_k"]
    assert not ray.is_initialized()  # the server generates; nothing here needs a cluster
    assert main(["--endpoint", served, "--api-key", "wrong", "--humaneval", "--problems", "1",
                 "--json", str(out)]) == 1
    assert "401" in capsys.readouterr().err


@pytest.mark.timeout(900)
def test_cli_refuses_to_run_code_without_its_jail_unless_told_to(served, tmp_path, capsys, monkeypatch):
    import json

    from training.eval import sandbox
    from training.eval.evaluate import main

    out = tmp_path / "eval.json"
    args = ["--endpoint", served, "--api-key", "k3y", "--humaneval", "--problems", "1", "--n", "1",
            "--max-new-tokens", "8", "--json", str(out)]
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without bubblewrap (or unshare)
    for probe in (sandbox.bubblewrap_problem, sandbox.network_namespace_available):
        probe.cache_clear()
    try:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "bubblewrap is not installed" in err and "--unsafe-sandbox" in err and len(err.splitlines()) == 1
        assert not out.exists()  # refused before generating anything
        assert main([*args, "--unsafe-sandbox"]) == 0, capsys.readouterr().err
        assert json.loads(out.read_text())["humaneval"]["sandbox"]["isolation"] == "guard"
    finally:
        for probe in (sandbox.bubblewrap_problem, sandbox.network_namespace_available):
            probe.cache_clear()
