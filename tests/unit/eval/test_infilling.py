"""HumanEval-infilling: the shipped data, scoring in the sandbox, and the CLI through the
service's engine on a tiny FIM-trained checkpoint (a handful of problems)."""

from __future__ import annotations

import json

import pytest

from training.eval.humaneval import score
from training.eval.infilling import BENCHMARKS, DATA, cut_for, exact_match, load_problems, stops_for
from training.eval.evaluate import main


def test_the_four_benchmarks_ship_with_their_licence():
    sizes = {name: len(load_problems(name)) for name in BENCHMARKS}
    assert sizes == {"single-line": 1033, "multi-line": 5815, "random-span": 1640, "random-span-light": 164}
    assert "MIT License" in (DATA / "LICENSE").read_text()
    p = load_problems("single-line", limit=1)[0]
    assert set(p) >= {"task_id", "prompt", "suffix", "canonical_solution", "test", "entry_point"}
    with pytest.raises(ValueError, match="must be one of"):
        load_problems("two-line")


def test_canonical_middles_pass_and_match_exactly_and_wrong_ones_do_not():
    problems = load_problems("single-line", limit=3)
    right = {p["task_id"]: [p["canonical_solution"].rstrip("\n") + "\nrest of a run-on generation"]
             for p in problems}  # the single-line cut keeps the first line only
    wrong = {p["task_id"]: ["    return None\n"] for p in problems}
    assert score(problems, right, cut=cut_for("single-line")).pass_at_k["pass@1"] == 1.0
    assert exact_match(problems, right) == 1.0
    assert score(problems, wrong, cut=cut_for("single-line")).pass_at_k["pass@1"] == 0.0
    assert exact_match(problems, wrong) == 0.0
    span = load_problems("random-span-light", limit=2)
    ok = {p["task_id"]: [p["canonical_solution"]] for p in span}
    assert score(span, ok, cut=cut_for("random-span-light")).pass_at_k["pass@1"] == 1.0
    assert stops_for("single-line") == ("\n",) and stops_for("multi-line") == ()


def test_cli_scores_single_line_through_the_engine(tiny_fim_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["--checkpoint", str(tiny_fim_checkpoint), "--no-perplexity", "--infilling", "single-line",
               "--limit", "3", "--n", "2", "--temperature", "0.8", "--max-new-tokens", "16", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(out.read_text())["infilling"]
    assert r["benchmark"] == "single-line" and r["problems"] == 3 and r["samples_per_problem"] == 2
    assert 0.0 <= r["exact_match"] <= 1.0 and "pass@1" in r["pass_at_k"]
    assert sum(r["status_counts"].values()) == 6  # every sample ran in the sandbox
    assert r["sampling"]["stop"] == ["\n"]


def test_cli_refuses_infilling_on_a_left_to_right_checkpoint_before_any_work(tiny_checkpoint, capsys):
    import ray

    assert main(["--checkpoint", str(tiny_checkpoint), "--infilling", "single-line", "--limit", "1"]) == 2
    assert "without fill-in-the-middle" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_endpoint_with_suffix_gives_what_the_engine_gives(tiny_fim_checkpoint, tmp_path, capsys):
    """The same greedy middles through the service over real HTTP as through the engine."""
    import ray

    from app.api import build_app
    from tests.support.servers import uvicorn_server
    from serving.engine.engine import Engine
    from serving.local import LocalBackend

    args = ["--infilling", "random-span-light", "--limit", "3", "--temperature", "0", "--max-new-tokens", "12",
            "--save-samples"]
    local = tmp_path / "local.json"
    assert main(["--checkpoint", str(tiny_fim_checkpoint), "--no-perplexity", *args, "--json", str(local)]) == 0
    with uvicorn_server(build_app(LocalBackend(Engine(tiny_fim_checkpoint)))) as url:
        remote = tmp_path / "remote.json"
        rc = main(["--endpoint", url, *args, "--json", str(remote)])
    assert rc == 0, capsys.readouterr().err
    a, b = (json.loads(f.read_text())["infilling"] for f in (local, remote))
    assert [s["completion"] for s in a["samples"]] == [s["completion"] for s in b["samples"]]
    assert a["per_problem"] == b["per_problem"] and len(a["per_problem"]) == 3
    assert not ray.is_initialized()
