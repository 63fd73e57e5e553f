"""Real Ray clusters started with `ray start` on 127.0.0.1: a head and a second node with a
custom resource. Jobs go through the Ray Jobs API (launch.submit/status/logs/stop), and a
2-rank job spread over both nodes trains to the same losses as one packed on one node."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator import jobs
from tests.conftest import ROOT

RAY = str(Path(sys.executable).parent / "ray")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")


def start_node(args: list[str], log: Path) -> tuple[subprocess.Popen, dict[str, int]]:
    """`ray start --block`: the node lives as long as this process; SIGTERM stops all of it.
    Every port is chosen free, so these nodes never collide with the test session's cluster."""
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1",
                             *(f"{k}={v}" for k, v in ports.items()), *args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, ports


def stop_node(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (2 CPUs) and a second node (1 CPU, custom resource "node2"), both on 127.0.0.1,
    with Ray's token authentication on: a fresh token, given to the nodes and to every
    client this module starts through the environment (no token file is written)."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    try:
        yield from _cluster(tmp_path_factory)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-nodes")
    gcs, dash, client = free_ports(3)
    head, head_ports = start_node(["--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}"],
                      logs / "head.log")
    address = f"http://127.0.0.1:{dash}"
    nodes = [head]
    node2_tmp = None
    try:
        deadline = time.time() + 120
        while True:
            try:
                jobs.check_address(address, timeout_s=2)
                break
            except jobs.JobsError:
                if time.time() > deadline or head.poll() is not None:
                    raise RuntimeError(f"head did not start:\n{(logs / 'head.log').read_text()[-3000:]}")
                time.sleep(1)
        # Its own temp dir: two nodes on one machine must not share the directory where each
        # node's runtime-env agent unpacks jobs' working directories.
        node2_tmp = tempfile.mkdtemp(prefix="rn2-", dir="/tmp")  # short: Unix socket paths live here
        nodes.append(start_node([f"--address=127.0.0.1:{gcs}", "--num-cpus=1", '--resources={"node2": 1}',
                                 f"--temp-dir={node2_tmp}"], logs / "node2.log")[0])
        wait_for_nodes(address, 2)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}",
               "metrics": f"http://127.0.0.1:{head_ports['--metrics-export-port']}/metrics"}
    finally:
        for proc in reversed(nodes):
            stop_node(proc)
        if node2_tmp:
            shutil.rmtree(node2_tmp, ignore_errors=True)


def wait_for_nodes(address: str, n: int, timeout_s: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        request = urllib.request.Request(f"{address}/nodes?view=summary", headers=jobs.auth_headers())
        with urllib.request.urlopen(request, timeout=5) as resp:
            summary = json.loads(resp.read())["data"]["summary"]
        if sum(1 for node in summary if node["raylet"]["state"] == "ALIVE") >= n:
            return
        time.sleep(1)
    raise RuntimeError(f"fewer than {n} nodes joined")


def launch(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"launch.{module}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def job_overrides(run_dir: Path, data_cache: Path, *extra: str) -> list[str]:
    return ["model=tiny", "strategy=ddp", "cluster.num_workers=2", "cluster.cpus_per_worker=1",
            "trainer.max_steps=6", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
            "trainer.sample_tokens=0", "precision=fp32", "logging.wandb.mode=disabled", "logging.progress=false",
            f"data.cache_dir={data_cache}", f"run.dir={run_dir}", *extra]


def test_submit_status_logs_and_two_node_placement(cluster, tmp_path, data_cache):
    spread = launch("submit", "--no-follow", f"cluster.address={cluster['address']}",
                    *job_overrides(tmp_path / "spread", data_cache, "cluster.placement_strategy=STRICT_SPREAD"))
    assert spread.returncode == 0, spread.stdout + spread.stderr
    job_id = spread.stdout.split("submitted job ", 1)[1].split()[0]

    # Following a job: logs stream until it ends, and the command reports how it ended.
    packed = launch("submit", f"cluster.address={cluster['address']}",
                    *job_overrides(tmp_path / "packed", data_cache, "cluster.placement_strategy=STRICT_PACK"))
    assert packed.returncode == 0, packed.stdout + packed.stderr
    assert "SUCCEEDED" in packed.stdout and "time from submit to first step" in packed.stdout

    c = jobs.client(cluster["address"])
    assert jobs.wait(c, job_id, timeout_s=300) == "SUCCEEDED", c.get_job_logs(job_id)[-3000:]
    status = launch("status", job_id, f"--address={cluster['address']}")
    assert status.returncode == 0, status.stderr
    assert job_id in status.stdout and "SUCCEEDED" in status.stdout and "succeeded" in status.stdout
    assert "6/6" in status.stdout
    listing = launch("status", f"--address={cluster['address']}")
    assert job_id in listing.stdout and "restarts" in listing.stdout
    logs = launch("logs", job_id, f"--address={cluster['address']}")
    assert logs.returncode == 0 and "first -> final loss" in logs.stdout

    s_spread = json.loads((tmp_path / "spread" / "summary.json").read_text())
    s_packed = json.loads((tmp_path / "packed" / "summary.json").read_text())
    assert len(set(s_spread["node_per_rank"])) == 2, s_spread["node_per_rank"]  # one rank on each node
    assert len(set(s_packed["node_per_rank"])) == 1
    for a, b in zip(s_spread["losses"], s_packed["losses"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(b), (s_spread["losses"], s_packed["losses"])

    # launch.train with cluster.address runs its controller against that cluster (no embedded one).
    direct = subprocess.run([sys.executable, "-m", "launch.train", f"cluster.address={cluster['gcs']}",
                             *job_overrides(tmp_path / "direct", data_cache)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stdout[-2000:] + direct.stderr[-3000:]
    assert "Started a local Ray instance" not in direct.stdout + direct.stderr
    s_direct = json.loads((tmp_path / "direct" / "summary.json").read_text())
    assert set(s_direct["node_per_rank"]) <= set(s_spread["node_per_rank"])


def test_stop_ends_a_running_job(cluster, tmp_path, data_cache):
    run_dir = tmp_path / "long"
    sub = jobs.submit(cluster["address"], job_overrides(run_dir, data_cache, "trainer.max_steps=100000"))
    deadline = time.time() + 180
    while jobs.read_status(str(run_dir)).get("step", 0) < 1:
        assert time.time() < deadline, "the job never reached its first step"
        time.sleep(1)
    # Ray's metrics agent on the head (where the job's driver runs) exports our gauges.
    import urllib.request

    deadline = time.time() + 90
    while True:
        with urllib.request.urlopen(cluster["metrics"], timeout=10) as resp:
            scrape = resp.read().decode()
        if "forgeline_tokens_per_s" in scrape:
            break
        assert time.time() < deadline, "forgeline metrics never appeared in the Prometheus scrape"
        time.sleep(3)
    assert "forgeline_loss" in scrape and 'job="' in scrape
    stop = launch("stop", sub.job_id, f"--address={cluster['address']}")
    assert stop.returncode == 0 and "stop requested" in stop.stdout
    c = jobs.client(cluster["address"])
    assert jobs.wait(c, sub.job_id, timeout_s=60) == "STOPPED"


def test_bad_address_and_unknown_job_fail_within_seconds(cluster, tmp_path):
    (closed,) = free_ports(1)
    for args in (["status", f"--address=http://127.0.0.1:{closed}"], ["logs", "no-such-job", f"--address={cluster['address']}"],
                 ["stop", "no-such-job", f"--address={cluster['address']}"],
                 ["submit", "cluster.address=127.0.0.1", "model=tiny", f"run.dir={tmp_path}"]):
        start = time.time()
        proc = launch(*args, timeout=60)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert time.time() - start < 30
        assert any(w in proc.stderr for w in ("no Ray cluster answers", "no job with id", "cluster.address")), proc.stderr


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_embedded_observers_run_at_idle_priority_and_nothing_else_does(tmp_path):
    """Ray's observer processes (found among this process's children by their script) go to
    SCHED_IDLE, every thread of them; a process that only names such a script further down its
    command line, as the raylet names the dashboard agent, keeps its policy."""
    from orchestrator.cluster import idle_observers

    script = tmp_path / "ray" / "_private" / "log_monitor.py"
    script.parent.mkdir(parents=True)
    script.write_text("import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\ntime.sleep(60)\n")
    observer = subprocess.Popen([sys.executable, "-u", str(script)])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                  f"--agent_command={tmp_path}/ray/dashboard/agent.py"])
    try:
        time.sleep(1.0)  # both threads of the observer started
        moved = idle_observers()
        assert observer.pid in moved and bystander.pid not in moved
        threads = os.listdir(f"/proc/{observer.pid}/task")
        assert len(threads) == 2
        assert all(os.sched_getscheduler(int(t)) == os.SCHED_IDLE for t in threads)
        assert os.sched_getscheduler(bystander.pid) == os.SCHED_OTHER
    finally:
        for p in (observer, bystander):
            p.kill()
            p.wait()
