"""metrics.jsonl, the progress line with its ETA, and loss.png (no cluster needed)."""

from __future__ import annotations

import json

from training.train.metrics import (MetricsLog, Throughput, format_duration, loss_curves, plot_loss, progress_line,
                              read_metrics)


def test_metrics_log_appends_one_json_line_per_event(tmp_path):
    log = MetricsLog(tmp_path / "sub" / "metrics.jsonl")
    log.write({"event": "log", "step": 1, "loss": 5.0})
    log.write({"event": "log", "step": 2, "eval_loss": 4.5})
    lines = (tmp_path / "sub" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert all("time" in json.loads(x) for x in lines)
    assert read_metrics(tmp_path / "sub" / "metrics.jsonl")[1]["eval_loss"] == 4.5
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_throughput_and_eta_follow_the_clock():
    now = [100.0]
    meter = Throughput(start_step=10, max_steps=110, tokens_per_step=1000, clock=lambda: now[0])
    assert meter.eta_s(10) is None  # nothing done yet: no guess
    now[0] = 120.0  # 20 s for 20 steps
    assert meter.tokens_per_s(30) == 1000.0
    assert meter.eta_s(30) == 80.0  # 80 steps left at 1 step/s


def test_format_duration():
    assert format_duration(None) == "?"
    assert format_duration(float("inf")) == "?"
    assert format_duration(42) == "42s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3 * 3600 + 60) == "3h01m"


def test_progress_line_names_step_loss_speed_and_eta():
    line = progress_line(120, 500, {"loss": 4.1234, "learning_rate": 1e-3}, 10_200.4, 75)
    assert "step 120/500" in line and "loss 4.1234" in line and "lr 1.00e-03" in line
    assert "10,200 tok/s" in line and "ETA 1m15s" in line
    eval_line = progress_line(200, 500, {"eval_loss": 3.0, "eval_perplexity": 20.09}, 1.0, None)
    assert "eval_loss 3.0000 ppl 20.1" in eval_line and "ETA ?" in eval_line


def test_loss_curves_keep_the_last_value_of_a_repeated_step():
    events = [
        {"event": "log", "step": 2, "loss": 5.0},
        {"event": "log", "step": 4, "loss": 4.0},
        {"event": "log", "step": 4, "eval_loss": 4.2},
        {"event": "attempt_start", "start_step": 2},
        {"event": "log", "step": 4, "loss": 3.9},  # re-run after a restart from step 2
        {"event": "param_digest", "step": 4, "digest": "x"},
    ]
    train, valid = loss_curves(events)
    assert train == [(2, 5.0), (4, 3.9)]
    assert valid == [(4, 4.2)]


def test_plot_loss_writes_a_png(tmp_path):
    events = [{"event": "log", "step": s, "loss": 6 - s / 10} for s in range(1, 20)]
    events += [{"event": "log", "step": s, "eval_loss": 6.1 - s / 10} for s in (5, 10, 15)]
    png = plot_loss(events, tmp_path / "loss.png", title="t")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_steady_throughput_leaves_out_the_first_step():
    now = [0.0]
    meter = Throughput(start_step=0, max_steps=10, tokens_per_step=100, clock=lambda: now[0])
    assert meter.steady_tokens_per_s() is None
    now[0] = 30.0  # a slow first step (start-up)
    meter.step_done(1)
    assert meter.steady_tokens_per_s() is None
    for step in range(2, 11):
        now[0] += 1.0
        meter.step_done(step)
    assert meter.steady_tokens_per_s() == 100.0
