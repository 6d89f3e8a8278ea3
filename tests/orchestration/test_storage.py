"""Ray Train storage in an S3 bucket (moto's S3 server on 127.0.0.1): a stage's checkpoints go
to the bucket and a worker killed mid-stage resumes from the one there."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

import pytest
import torch

from kdray.config import load_config, with_overrides
from kdray.orchestration import ray_train
from kdray.stages import TEACHER

from .conftest import FAST, SMOKE, fault_env, local_ray

BUCKET = "kdray-runs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """``python -m moto.server`` on a free port of 127.0.0.1 with one empty bucket; yields the
    AWS_* environment that points boto3 and pyarrow's S3 filesystem at it."""
    pytest.importorskip("moto.server", reason="pip install -c constraints.txt -e .[test]")
    import boto3
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.time() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert proc.poll() is None and time.time() < deadline, "moto.server did not start"
            time.sleep(0.2)
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        yield env, s3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_worker_killed_resumes_from_the_checkpoint_in_the_bucket(s3_server, smoke_data,
                                                                 tmp_path, monkeypatch):
    env, s3 = s3_server
    for k, v in env.items():
        monkeypatch.setenv(k, v)       # the driver reads the final checkpoint from the bucket
    cfg = load_config(SMOKE, [*FAST, f"data.root={smoke_data}",
                              "teacher.model.backbone=mobilenetv3_small_100",
                              "teacher.train.epochs=2", "ray.num_workers=1",
                              "ray.max_failures=1", f"ray.storage_path=s3://{BUCKET}/runs"])
    # The uninterrupted reference: the plain loop here, at the worker's thread count (1), so
    # that the losses compare bit for bit (as in test_ray_train).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = ray_train.train_stage(TEACHER, with_overrides(cfg, {"ray.num_workers": 0}),
                                      tmp_path / "plain", {}, "plain", tmp_path / "unused")
    finally:
        torch.set_num_threads(threads)
    marker = tmp_path / "fault.marker"
    # The worker exits hard at epoch 2's report, after epoch 1's checkpoint went to the bucket.
    with local_ray({**env, **fault_env(epoch=2, marker=marker)}):
        result = ray_train.train_stage(TEACHER, cfg, tmp_path / "stage", {}, "teacher-s3",
                                       cfg.ray.storage_path)
    assert marker.exists(), "the fault was not injected"
    starts = [a["start_epoch"] for a in ray_train.read_attempts(tmp_path / "stage")]
    assert starts == [1, 2], f"expected a second worker group resuming at epoch 2: {starts}"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/teacher-s3/")
            .get("Contents", [])]
    checkpoints = sorted(k.split("/")[2] for k in keys if k.endswith("/last.pt"))
    assert len(checkpoints) == 2 and all(c.startswith("checkpoint_") for c in checkpoints), keys
    assert [h["epoch"] for h in result.history] == [1, 2]
    for ours, ref in zip(result.history, plain.history):
        losses = {k: v for k, v in ref.items() if k.startswith("loss")}
        assert {k: ours[k] for k in losses} == losses, (ours["epoch"], ours, ref)
    assert (tmp_path / "stage" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "unused").exists()   # nothing went to a local Ray storage folder
