"""k8s/rayjob.yaml: a KubeRay RayJob that runs the two-stage pipeline on GPU workers with shared
storage, token auth on and the dashboard reachable only inside the cluster (port-forward)."""
from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _docs() -> dict:
    docs = list(yaml.safe_load_all((REPO / "k8s" / "rayjob.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def test_rayjob_runs_the_pipeline_on_gpu_workers_with_shared_storage():
    docs = _docs()
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    argv = spec["entrypoint"].split()
    assert argv[:2] == ["python", "/home/ray/kdray/pipelines/two_stage.py"]
    storage = argv[argv.index("--storage") + 1]
    assert "ray.use_gpu=yes" in argv and "ray.num_workers=2" in argv
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    workers = cluster["workerGroupSpecs"][0]
    worker = workers["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert workers["replicas"] == 2                    # one Ray Train worker per GPU pod
    # every pod mounts the same ReadWriteMany claim at --storage
    claim = docs["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pods = [cluster["headGroupSpec"]["template"]["spec"], workers["template"]["spec"]]
    for pod in pods:
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes[mounts[storage]] == claim["metadata"]["name"]


def test_rayjob_has_token_auth_and_no_exposed_dashboard():
    docs = _docs()
    cluster = docs["RayJob"]["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["num-cpus"] == "0"   # the head only drives
    assert set(docs) == {"RayJob", "PersistentVolumeClaim", "NetworkPolicy"}  # no Service/Ingress
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    sources = policy["ingress"][0]["from"]
    assert {"namespaceSelector", "podSelector"} == {k for s in sources for k in s}
    assert all("ipBlock" not in s for s in sources)     # nothing from outside the cluster
