"""ServeConfig (serving/serve_config.py) is the one source of the service's defaults: the
launcher's flags, the deployment's options and serving/config.yaml all say the same."""

from __future__ import annotations

import inspect

import pytest
import yaml

from serving.serve_config import DEFAULTS, ServeConfig, rows_in_flight, serve_queue_limits
from tests.support import REPO_ROOT


def test_config_yaml_agrees_with_the_defaults():
    cfg = yaml.safe_load((REPO_ROOT / "serving" / "config.yaml").read_text())
    assert cfg["http_options"] == {"host": DEFAULTS.host, "port": DEFAULTS.port}
    app = cfg["applications"][0]
    assert app["args"]["max_batch_size"] == DEFAULTS.max_batch_size
    assert app["args"]["batch_wait_timeout_s"] == DEFAULTS.batch_wait_s
    assert app["args"]["stream_interval_s"] == DEFAULTS.stream_interval_s
    assert app["args"]["max_queued"] == DEFAULTS.max_queued
    assert app["args"]["retry_after_s"] == DEFAULTS.retry_after_s
    assert (app["args"]["engine"], app["args"]["dtype"]) == (DEFAULTS.engine, DEFAULTS.dtype)
    deployment = app["deployments"][0]
    assert deployment["ray_actor_options"]["num_cpus"] == DEFAULTS.num_cpus
    # Serve's limits around the replica's gate, as serve_queue_limits derives them
    assert {k: deployment[k] for k in ("max_ongoing_requests", "max_queued_requests")} == \
        serve_queue_limits(DEFAULTS.max_batch_size, DEFAULTS.max_queued)


def test_the_cluster_config_bounds_its_queues_around_its_gate():
    cfg = yaml.safe_load((REPO_ROOT / "deploy" / "serve" / "cluster.yaml").read_text())
    app = cfg["applications"][0]
    deployment = app["deployments"][0]
    assert {k: deployment[k] for k in ("max_ongoing_requests", "max_queued_requests")} == \
        serve_queue_limits(app["args"]["max_batch_size"], app["args"]["max_queued"])


def test_serve_limits_sit_above_the_gate_and_unbounded_means_serves_defaults():
    assert rows_in_flight(64, 64) == 128 and rows_in_flight(64, 0) == 64 and rows_in_flight(64, -1) is None
    limits = serve_queue_limits(64, 64)
    assert limits["max_ongoing_requests"] > rows_in_flight(64, 64)  # past the gate: the replica's own 503
    assert limits["max_queued_requests"] >= 1
    assert serve_queue_limits(8, -1) == {"max_ongoing_requests": 8, "max_queued_requests": -1}


def test_the_deployment_takes_its_defaults_from_the_config():
    from serving.deployment.replica import Completer, deploy_options

    user_class = Completer.func_or_class.__mro__[1]  # @serve.ingress wraps the class in a subclass
    init = inspect.signature(user_class.__init__).parameters
    assert init["max_batch_size"].default == DEFAULTS.max_batch_size
    assert init["batch_wait_timeout_s"].default == DEFAULTS.batch_wait_s
    assert init["stream_interval_s"].default == DEFAULTS.stream_interval_s
    assert init["max_queued"].default == DEFAULTS.max_queued
    assert init["retry_after_s"].default == DEFAULTS.retry_after_s
    limits = serve_queue_limits(DEFAULTS.max_batch_size, DEFAULTS.max_queued)
    assert Completer.max_ongoing_requests == limits["max_ongoing_requests"]
    assert Completer.max_queued_requests == limits["max_queued_requests"]
    assert Completer.ray_actor_options["num_cpus"] == DEFAULTS.num_cpus
    assert init["dtype"].default == DEFAULTS.dtype
    assert deploy_options() == {"ray_actor_options": {"num_cpus": DEFAULTS.num_cpus},
                                "num_replicas": DEFAULTS.num_replicas, **limits}
    assert deploy_options(num_gpus=1)["ray_actor_options"] == {"num_cpus": DEFAULTS.num_cpus, "num_gpus": 1}


def test_the_launchers_flags_are_the_fields_with_their_defaults():
    from serving.run import parse

    cfg = parse(["--checkpoint", "ckpt"])
    assert cfg == ServeConfig(checkpoint="ckpt")
    assert (cfg.host, cfg.port, cfg.num_replicas, cfg.num_cpus, cfg.max_batch_size, cfg.batch_wait_ms,
            cfg.stream_interval_ms, cfg.ingress, cfg.model_name) == \
        ("127.0.0.1", 8000, 1, 1.0, 64, 0.0, 20.0, "proxy", None)
    cfg = parse(["--checkpoint", "c", "--host", "0.0.0.0", "--port", "9000", "--num-replicas", "2", "--num-cpus",
                 "2.5", "--max-batch-size", "8", "--batch-wait-ms", "5", "--stream-interval-ms", "0",
                 "--ingress", "direct", "--model-name", "m"])
    assert (cfg.host, cfg.port, cfg.num_replicas, cfg.num_cpus, cfg.max_batch_size, cfg.batch_wait_s,
            cfg.stream_interval_s, cfg.ingress, cfg.model_name, cfg.torch_threads) == \
        ("0.0.0.0", 9000, 2, 2.5, 8, 0.005, 0.0, "direct", "m", 2)


@pytest.mark.parametrize("argv,flag", [
    ([], "--checkpoint"), (["--port", "0"], "--port"), (["--port", "x"], "--port"),
    (["--num-replicas", "0"], "--num-replicas"), (["--max-batch-size", "0"], "--max-batch-size"),
    (["--num-cpus", "0"], "--num-cpus"), (["--batch-wait-ms", "-1"], "--batch-wait-ms"),
    (["--stream-interval-ms", "-1"], "--stream-interval-ms"), (["--ingress", "both"], "--ingress"),
    (["--max-queued", "-2"], "--max-queued"), (["--retry-after-s", "0"], "--retry-after-s"),
    (["--engine", "tgi"], "--engine"), (["--dtype", "fp8"], "--dtype"), (["--num-gpus", "-1"], "--num-gpus"),
    (["--engine", "native", "--num-gpus", "1"], "--num-gpus"),
])
def test_a_bad_value_exits_2_naming_its_flag(argv, flag, capsys):
    from serving.run import parse

    with pytest.raises(SystemExit) as e:
        parse((["--checkpoint", "c"] if flag != "--checkpoint" else []) + argv)
    assert e.value.code == 2 and f"error: {flag}" in capsys.readouterr().err


def test_the_ingress_modes_are_the_launchers():
    from typing import get_args

    from serving.deployment.ingress import INGRESS_MODES
    from serving.serve_config import Ingress

    assert get_args(Ingress) == INGRESS_MODES


def test_the_engine_flags():
    from serving.run import parse

    cfg = parse(["--checkpoint", "c"])
    assert (cfg.engine, cfg.dtype, cfg.num_gpus) == ("auto", "auto", None)
    cfg = parse(["--checkpoint", "c", "--engine", "vllm", "--dtype", "bfloat16", "--num-gpus", "1"])
    assert (cfg.engine, cfg.dtype, cfg.num_gpus) == ("vllm", "bfloat16", 1.0)
