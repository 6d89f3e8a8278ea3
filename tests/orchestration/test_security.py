"""What kdray exposes: the local Ray it starts listens on 127.0.0.1 only; the cluster file keeps
MLflow on the head's loopback address and installs uv from PyPI at a pinned version."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from kdray.orchestration.ray_train import LEAN_LOCAL_RAY

from .conftest import REPO, kill_ray_under

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _address(hex_addr: str) -> str:
    """/proc/net/tcp{,6} local address ("0100007F:1F90") -> its IP ("127.0.0.1")."""
    raw = bytes.fromhex(hex_addr.split(":")[0])
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # host-order 32-bit words
    return socket.inet_ntop(socket.AF_INET6, words)


def _listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, IP) of every listening TCP socket that these processes hold."""
    owner = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    owner[int(link[8:-1])] = pid
        except OSError:   # the process ended meanwhile
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and int(cols[9]) in owner:     # 0A = LISTEN
                found.append((owner[int(cols[9])], _address(cols[1])))
    return found


def _pids_under(text: str) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


@contextmanager
def _kdray_local_ray(**env_extra):
    """``ensure_ray()`` in a child process with its own Ray temp dir; yields (child, temp dir)
    once Ray is up. The child prints the LEAN_LOCAL_RAY variables left in its environment."""
    ray_tmp = tempfile.mkdtemp(prefix="kb-")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, **env_extra}
    env.pop("RAY_ADDRESS", None)
    code = ("import os, time; from kdray.orchestration.ray_train import LEAN_LOCAL_RAY, "
            "ensure_ray; ensure_ray(); "
            "print('up', sorted(k for k in LEAN_LOCAL_RAY if k in os.environ), flush=True); "
            "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("up"), proc.stderr.read()[-2000:]
        proc.first_line = line
        proc.preset = sorted(k for k in LEAN_LOCAL_RAY if k in env)   # the user's own, kept
        time.sleep(3)   # the dashboard agent and the runtime-env agent open theirs a bit later
        yield proc, ray_tmp
    finally:
        proc.kill()
        proc.wait()
        kill_ray_under(ray_tmp)


def _cmdlines(pids: set[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return out


def test_local_ray_started_by_kdray_listens_on_loopback_only():
    with _kdray_local_ray(KDRAY_RAY_DASHBOARD="1") as (proc, ray_tmp):  # every port there is
        sockets = _listening(_pids_under(ray_tmp) | {proc.pid})
        assert len(sockets) >= 5, sockets          # GCS, raylet, object manager, agents, ...
        exposed = [(pid, ip) for pid, ip in sockets if ip not in LOOPBACK]
        assert not exposed, exposed


def test_local_ray_started_by_kdray_runs_lean():
    """No dashboard web UI or modules (unless KDRAY_RAY_DASHBOARD=1; Ray keeps a frontend-less
    head process either way), and the raylet got the lean settings; the driver's own environment
    is left as it was."""
    def dashboards(ray_tmp):
        return [c for c in _cmdlines(_pids_under(ray_tmp)) if "dashboard/dashboard.py" in c]

    with _kdray_local_ray() as (proc, ray_tmp):
        pids = _pids_under(ray_tmp)
        assert all("--disable-frontend" in c for c in dashboards(ray_tmp))
        assert not [c for c in _cmdlines(pids) if c.startswith("ray-dashboard-")]
        raylet = [p for p in pids if "raylet/raylet" in " ".join(_cmdlines({p}))]
        assert len(raylet) == 1
        environ = Path(f"/proc/{raylet[0]}/environ").read_bytes().split(b"\0")
        assert b"RAY_prestart_worker_first_driver=0" in environ
        assert b"RAY_enable_metrics_collection=0" in environ
        assert proc.first_line == f"up {proc.preset}"     # the driver's environment as it was
    with _kdray_local_ray(KDRAY_RAY_DASHBOARD="1") as (proc, ray_tmp):
        assert [c for c in dashboards(ray_tmp) if "--disable-frontend" not in c]


def test_cluster_file_keeps_mlflow_on_loopback_and_pins_uv():
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    head = " ".join(cluster["head_start_ray_commands"])
    assert "mlflow server --host 127.0.0.1" in head
    assert "--dashboard-host=127.0.0.1" in head
    setup = " ".join(cluster["setup_commands"])
    assert "curl" not in setup and "| sh" not in setup
    assert "'uv==" in setup
    ports = [p for rule in cluster["provider"]["security_group"]["IpPermissions"]
             for p in (rule["FromPort"], rule["ToPort"])]
    assert set(ports) == {22}                      # SSH only; everything else port-forwarded
