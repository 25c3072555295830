"""Checkpoints on s3:// through pyarrow's filesystems, against a real S3-compatible server.

The test starts moto in server mode (a real HTTP S3 API on a free port; not a mock of the
client), creates a bucket, and runs a short training job with `--storage-path s3://...`.
The job, its Ray Train workers and the export reach the server as any S3 client would:
the endpoint comes from AWS_ENDPOINT_URL (pyarrow and boto read it), the keys from the usual
variables. The checkpoint is then read back from the server, and its weights must be the
exported model's.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_job import run_cli, tiny_args
from tests.support.servers import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        yield env
    finally:
        server.stop()


def s3_filesystem(env: dict):
    from pyarrow.fs import S3FileSystem

    return S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key=env["AWS_ACCESS_KEY_ID"],
                        secret_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_DEFAULT_REGION"])


@pytest.mark.timeout(600)
def test_checkpoints_written_to_s3_are_read_back_from_the_server(s3_server, small_corpus, tmp_path):
    import boto3
    import ray.train
    import torch
    from pyarrow.fs import FileSelector, FileType
    from safetensors.torch import load_file

    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name=s3_server["AWS_DEFAULT_REGION"],
                 aws_access_key_id=s3_server["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=s3_server["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="ckpts")
    out = tmp_path / "run"
    r = run_cli([*tiny_args(small_corpus, out, max_steps=2, every=2), "--num-workers", "1",
                 "--storage-path", "s3://ckpts/runs", "--report-to", "none"], env=s3_server, timeout=500)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    run = json.loads((out / "run.json").read_text())
    assert run["storage_path"] == "s3://ckpts/runs" and run["steps"] == 2
    assert not (out / "ray_results").exists()  # nothing went to the local default

    # On the server: the checkpoint Ray Train registered, with the ZeRO-2 shard and HF's files.
    fs = s3_filesystem(s3_server)
    files = {i.path for i in fs.get_file_info(FileSelector(f"ckpts/runs/{run['run_name']}", recursive=True))
             if i.type == FileType.File}
    ckpt = sorted({p.split("/checkpoint/")[0] for p in files if "/checkpoint/" in p})
    assert len(ckpt) == 1, sorted(files)
    names = {p.rsplit("/", 1)[1] for p in files if p.startswith(ckpt[0])}
    assert {"model.safetensors", "trainer_state.json", "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= names, names
    assert any(p.endswith("checkpoint_manager_snapshot.json") for p in files)

    # Read back through Ray Train's own Checkpoint on that filesystem: the weights are the export's.
    back = ray.train.Checkpoint(path=ckpt[0], filesystem=fs)
    with back.as_directory() as d:
        saved = load_file(f"{d}/checkpoint/model.safetensors")
        state = json.loads(open(f"{d}/checkpoint/trainer_state.json").read())
    exported = load_file(str(out / "model" / "model.safetensors"))
    assert state["global_step"] == 2
    key = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(saved[key], exported[key])  # fp32 training: module weights = fp32 master weights
