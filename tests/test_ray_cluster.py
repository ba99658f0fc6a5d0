"""Ray listens on loopback only, and the job runs under ``ray job submit`` on a token-auth head."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

import manifests
from manifests.validate import validate

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # gRPC reports "::ffff:127.0.0.1"
    return (mapped or addr).is_loopback


def listening_addresses(pids: set[int]) -> list[tuple[str, int, str]]:
    """(ip, port, process name) of every listening TCP socket owned by ``pids``."""
    found = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            found.append((conn.laddr.ip, conn.laddr.port, psutil.Process(conn.pid).name()))
    return found


def test_local_ray_listens_on_loopback_only(local_ray):
    ray_pids = {p.pid for p in psutil.Process().children(recursive=True)}
    sockets = listening_addresses(ray_pids)
    assert len(sockets) >= 3, f"expected Ray's GCS, raylet and workers to listen; saw {sockets}"
    exposed = [s for s in sockets if not is_loopback(s[0])]
    assert not exposed, f"Ray processes listen beyond loopback: {exposed}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_processes(temp_dir: str, started: set[int]) -> list[psutil.Process]:
    """This head's processes: those started by ``ray start``, those naming its temp dir, and
    their children (``ray stop`` would also stop the tests' local Ray)."""
    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.info["pid"] in started or any(temp_dir in a for a in proc.info["cmdline"] or []):
            roots.append(proc)
    found = {p.pid: p for p in roots}
    for proc in roots:
        try:
            found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def stop_head(temp_dir: str, started: set[int]) -> None:
    victims = head_processes(temp_dir, started)
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)


@pytest.fixture
def token_head():
    """A Ray head on 127.0.0.1 with token authentication; yields (dashboard URL, env with token)."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths are capped
    env = {
        # not the tests' PYTHONPATH (local Ray adds the project to it): workers get code by shipping
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    dashboard = free_port()
    # Every port of its own: the tests' local Ray already holds Ray's default agent ports.
    ports = {flag: str(free_port()) for flag in (
        "--port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port", "--metrics-export-port", "--ray-client-server-port")}
    before = set(psutil.pids())
    subprocess.run(
        [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", *[x for kv in ports.items() for x in kv],
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
         "--num-cpus", "2", "--temp-dir", temp_dir],
        env=env, check=True, capture_output=True, timeout=180,
    )
    started = set(psutil.pids()) - before
    try:
        yield f"http://127.0.0.1:{dashboard}", env, (temp_dir, started, f"127.0.0.1:{ports['--port']}")
    finally:
        stop_head(temp_dir, started)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)  # Ray's logs and sockets of this head


@pytest.mark.cluster
def test_ray_job_submit_runs_the_script_on_a_token_auth_head(token_head, demo_collection, tmp_path):
    address, env, (temp_dir, started, _) = token_head
    head_pids = {p.pid for p in head_processes(temp_dir, started)}
    exposed = [s for s in listening_addresses(head_pids) if not is_loopback(s[0])]
    assert not exposed, f"the head listens beyond loopback: {exposed}"

    out = tmp_path / "manifest"
    done = submit_job(address, env, demo_collection, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "manifest: " in done.stdout and "18 ok" in done.stdout
    assert validate(str(out), progress=False) == []
    summary = manifests.read_manifest_json(str(out))
    assert summary["run"]["ray"]["mode"] == "cluster"
    assert summary["counts"]["rows"] == 20

    refused_out = tmp_path / "refused"
    refused = submit_job(address, {**env, "RAY_AUTH_TOKEN": "not-the-token"}, demo_collection, refused_out)
    assert refused.returncode != 0 and not refused_out.exists()
    assert "401" in refused.stderr or "auth" in refused.stderr.lower(), refused.stderr[-2000:]


def submit_job(address: str, env: dict, collection: Path, out: Path) -> subprocess.CompletedProcess:
    """``ray job submit`` of the annotation script; retried while the head's job agent starts."""
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           sys.executable, "pipeline/annotate.py", "--input", str(collection), "--output", str(out),
           "--shard-size", "8"]
    deadline = time.monotonic() + 120
    while True:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(2)


PROBE = """
import numpy as np
from annotators.base import Annotator


class ShippedProbe(Annotator):
    \"\"\"Exists only in the driver's copy of the project: workers can import it only if shipped.\"\"\"

    name = "probe"

    def annotate(self, images, ids):
        return [np.ascontiguousarray(img[:, :, 0]) for img in images]
"""


@pytest.mark.cluster
def test_address_joins_a_running_cluster_and_ships_the_project(token_head, demo_collection, tmp_path):
    """``--address`` joins a head started apart; the driver's own copy of the packages reaches
    the workers (an annotator that exists only in that copy runs there)."""
    import shutil

    _, env, (_, _, gcs_address) = token_head
    project = tmp_path / "project"
    for package in ("annotators", "manifests", "pipeline"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    (project / "annotators" / "shipped_probe.py").write_text(PROBE)
    out = tmp_path / "manifest"
    env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    done = subprocess.run(
        [sys.executable, str(project / "pipeline" / "annotate.py"), "--address", gcs_address,
         "--input", str(demo_collection / "scenes"), "--output", str(out), "--shard-size", "2",
         "--annotators", "canny,annotators.shipped_probe:ShippedProbe", "--image-format", "png"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = manifests.read_manifest_json(str(out))
    assert summary["run"]["ray"] == {"mode": "cluster", "address": gcs_address, "num_cpus": 2}
    frame = manifests.read(str(out))
    assert len(frame) == summary["counts"]["ok"] >= 4
    import io

    import numpy as np
    from PIL import Image

    for _, row in frame.iterrows():
        image = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))
        probe = np.asarray(Image.open(io.BytesIO(row["cond_probe"]["bytes"])))
        assert np.array_equal(probe, image[:, :, 0])
