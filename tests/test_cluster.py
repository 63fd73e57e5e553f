"""Real Ray clusters started with `ray start` on 127.0.0.1: a head, and a second node started in a
mount namespace of its own, where tmpfs hides the driver's data cache and run directories (the
whole pytest temp root): it shares no disk with the driver, like a second machine. Jobs keep
their checkpoints and prepared data on a real S3 server. Jobs go through the Ray Jobs API
(launch.submit/status/logs/stop); a 2-rank job spread over both nodes trains to the same losses
as one packed on one node, restarts by itself from the object store when its rank on the second
node is SIGKILLed, and is exported from there; without storage both nodes reach, the second
node's rank is refused with one clear error."""
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
from tests.conftest import ROOT, environment

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


def start_node(args: list[str], log: Path, prefix: tuple[str, ...] = (),
               env: dict | None = None) -> tuple[subprocess.Popen, dict[str, int]]:
    """`ray start --block`: the node lives as long as this process; SIGTERM stops all of it.
    Every port is chosen free, so these nodes never collide with the test session's cluster."""
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    env = {**(os.environ if env is None else env), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([*prefix, RAY, "start", "--block", "--node-ip-address=127.0.0.1",
                             *(f"{k}={v}" for k, v in ports.items()), *args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, ports


def unshared(hidden: list[Path]) -> tuple[str, ...]:
    """A command prefix: a mount namespace of its own in which each of ``hidden`` is an empty tmpfs."""
    mounts = " && ".join(f'mount -t tmpfs node2 "${i + 1}"' for i in range(len(hidden)))
    return ("unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && shift {len(hidden)} && exec "$@"',
            "sh", *map(str, hidden))


def can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def stop_node(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    """A head (2 CPUs) and a second node (1 CPU, custom resource "node2"), both on 127.0.0.1,
    with Ray's token authentication on: a fresh token, given to the nodes and to every
    client this module starts through the environment (no token file is written). The second
    node runs without the driver's disk (see ``unshared``) and without the object store's
    credentials: its ranks get them from the driver."""
    if not can_unshare():
        pytest.skip("unshare -m is not permitted here: no node without the driver's disk can be made")
    with environment({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}):
        yield from _cluster(tmp_path_factory)


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
        default_cache = Path.home() / ".cache" / "forgeline"
        default_cache.mkdir(parents=True, exist_ok=True)
        hidden = [tmp_path_factory.getbasetemp(), default_cache]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        nodes.append(start_node([f"--address=127.0.0.1:{gcs}", "--num-cpus=1", '--resources={"node2": 1}',
                                 f"--temp-dir={node2_tmp}"], logs / "node2.log", unshared(hidden), env)[0])
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


# model=small steps take about a second here: slow enough to kill a rank halfway through.
SMALL = ("model=small", "trainer.max_steps=6", "trainer.global_batch_size=16", "trainer.micro_batch_size=8",
         "trainer.checkpoint_every=2")
_spread: dict = {}


def test_submit_status_logs_and_two_node_placement(cluster, tmp_path, data_cache, s3_url):
    spread = launch("submit", "--no-follow", f"cluster.address={cluster['address']}",
                    *job_overrides(tmp_path / "spread", data_cache, *SMALL, f"run.storage={s3_url}/spread",
                                   "cluster.placement_strategy=STRICT_SPREAD"))
    assert spread.returncode == 0, spread.stdout + spread.stderr
    job_id = spread.stdout.split("submitted job ", 1)[1].split()[0]

    # Following a job: logs stream until it ends, and the command reports how it ended.
    packed = launch("submit", f"cluster.address={cluster['address']}",
                    *job_overrides(tmp_path / "packed", data_cache, *SMALL, f"run.storage={s3_url}/packed",
                                   "cluster.placement_strategy=STRICT_PACK"))
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
    # The object store holds the checkpoints; the driver's run directory none.
    assert s_spread["storage"] == f"{s3_url}/spread" and not (tmp_path / "spread" / "checkpoints").exists()
    for a, b in zip(s_spread["losses"], s_packed["losses"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(b), (s_spread["losses"], s_packed["losses"])
    _spread.update(s_spread)

    # launch.train with cluster.address runs its controller against that cluster (no embedded one).
    direct = subprocess.run([sys.executable, "-m", "launch.train", f"cluster.address={cluster['gcs']}",
                             *job_overrides(tmp_path / "direct", data_cache, f"run.storage={s3_url}/direct")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stdout[-2000:] + direct.stderr[-3000:]
    assert "Started a local Ray instance" not in direct.stdout + direct.stderr
    s_direct = json.loads((tmp_path / "direct" / "summary.json").read_text())
    assert set(s_direct["node_per_rank"]) <= set(s_spread["node_per_rank"])


def mount_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def test_a_rank_on_the_second_node_killed_restarts_from_the_object_store(cluster, tmp_path, data_cache, s3_url):
    """SIGKILL the rank on the node without the driver's disk after a checkpoint: the job restarts
    by itself from the checkpoint on the object store and ends with the uninterrupted run's losses.
    Then its model is exported from the object store."""
    import psutil

    if not _spread:
        pytest.skip("needs the uninterrupted run of test_submit_status_logs_and_two_node_placement")
    run_dir, storage = tmp_path / "killed", f"{s3_url}/killed"
    # Saves finish before the next step here (trainer.checkpoint_async=false): a rank killed after
    # step 3 leaves the published checkpoint of step 2 behind, whatever the timing.
    proc = subprocess.Popen([sys.executable, "-m", "launch.train", f"cluster.address={cluster['gcs']}",
                             *job_overrides(run_dir, data_cache, *SMALL, f"run.storage={storage}",
                                            "cluster.placement_strategy=STRICT_SPREAD", "trainer.max_restarts=1",
                                            "trainer.checkpoint_async=false")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        steps = []
        while not steps or steps[-1] < 3:  # step 2's checkpoint is being written or is published
            assert proc.poll() is None and time.time() < deadline, (proc.stdout.read() if proc.poll() is not None
                                                                    else "no step 3 in time")
            metrics = run_dir / "metrics.jsonl"
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
            time.sleep(0.2)
        ours = mount_namespace(os.getpid())
        victims = [p for p in psutil.process_iter(["cmdline"])
                   if " ".join(p.info["cmdline"] or []).startswith("ray::TrainWorker") and mount_namespace(p.pid) != ours]
        assert len(victims) == 1, victims  # the one rank on the second node
        victims[0].kill()
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["steps"] == 6, summary["error"]
    first, second = summary["start_step_per_attempt"]
    assert first == 0 and second >= 2, summary["start_step_per_attempt"]  # from the object store's checkpoint
    for a, b in zip(summary["losses"], _spread["losses"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(b), (summary["losses"], _spread["losses"])

    exported = launch("export", storage, str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(weights)


def test_a_node_without_the_drivers_disk_is_refused_with_one_error(cluster, tmp_path, data_cache):
    """Without run.storage the ranks would read the driver's own files: the rank on the second node
    cannot, and the job stops before training with one error naming the key, the node and the path."""
    proc = subprocess.run([sys.executable, "-m", "launch.train", f"cluster.address={cluster['gcs']}",
                           *job_overrides(tmp_path / "nostore", data_cache, "cluster.placement_strategy=STRICT_SPREAD")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    err = proc.stderr
    assert err.count("Error in configuration: run.storage:") == 1 and " on node " in err and "(Ray node " in err, err[-3000:]
    assert "cannot read the prepared data" in err and str(data_cache) in err
    assert "Traceback" not in err, err[-3000:]


def test_prepare_runs_on_both_nodes_and_trains_like_the_local_run(cluster, tmp_path, data_cache, s3_url):
    """launch.prepare on the two-node cluster, its inputs and output on the object store (the second
    node has neither the driver's disk nor the store's credentials), gives the same shards and the
    same removals as an embedded run on local files; a job on the cluster trains from the stored
    output to the same losses as a local job from the local output."""
    from orchestrator.prepare.corpus import FILES, make_corpus
    from orchestrator.storage import Storage

    corpus = make_corpus(tmp_path / "corpus", 300, seed=1)
    store = Storage.at(f"{s3_url}/in")
    for name in (*FILES, "blocklist.txt"):
        store.upload(tmp_path / "corpus" / name, name)
    common = ["prepare.tokenize.shard_tokens=20000", "prepare.progress=false", "prepare.batch_size=32"]
    spread = launch("prepare", f"cluster.address={cluster['gcs']}", f"prepare.inputs=[{store.url(FILES[0])},{store.url(FILES[1])}]",
                    f"prepare.output={s3_url}/out", f"prepare.blocklist.path={store.url('blocklist.txt')}", *common)
    assert spread.returncode == 0, spread.stdout[-2000:] + spread.stderr[-3000:]
    local = launch("prepare", f"prepare.inputs=[{corpus['files'][0]},{corpus['files'][1]}]",
                   f"prepare.output={tmp_path / 'out'}", f"prepare.blocklist.path={corpus['blocklist']}", *common)
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-3000:]
    out = Storage.at(f"{s3_url}/out")
    report = json.loads(out.read_text("prepare_report.json"))
    assert len(report["worker_nodes"]) == 2, report["worker_nodes"]  # documents were cleaned on both nodes
    mine = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert [(s["stage"], s["docs_out"], s["removed"]) for s in report["stages"]] == \
        [(s["stage"], s["docs_out"], s["removed"]) for s in mine["stages"]]
    shards = json.loads(out.read_text("shards", "manifest.json"))["shards"]
    assert [s["sha256"] for s in shards] == \
        [s["sha256"] for s in json.loads((tmp_path / "out" / "shards" / "manifest.json").read_text())["shards"]]

    train = ["data=prepared", "model.vocab_size=2048", "trainer.max_steps=4"]
    on_cluster = subprocess.run([sys.executable, "-m", "launch.train", f"cluster.address={cluster['gcs']}",
                                 *job_overrides(tmp_path / "run-s3", data_cache, *train, f"data.path={s3_url}/out",
                                                f"run.storage={s3_url}/run")],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert on_cluster.returncode == 0, on_cluster.stdout[-2000:] + on_cluster.stderr[-3000:]
    at_home = subprocess.run([sys.executable, "-m", "launch.train",
                              *job_overrides(tmp_path / "run-local", tmp_path / "cache", *train,
                                             f"data.path={tmp_path / 'out'}")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert at_home.returncode == 0, at_home.stdout[-2000:] + at_home.stderr[-3000:]
    remote_losses = json.loads((tmp_path / "run-s3" / "summary.json").read_text())["losses"]
    local_losses = json.loads((tmp_path / "run-local" / "summary.json").read_text())["losses"]
    assert len(remote_losses) == 4
    for a, b in zip(remote_losses, local_losses, strict=True):
        assert abs(a - b) <= 1e-6 * abs(b), (remote_losses, local_losses)


def test_stop_ends_a_running_job(cluster, tmp_path, data_cache, s3_url):
    run_dir = tmp_path / "long"
    sub = jobs.submit(cluster["address"], job_overrides(run_dir, data_cache, "trainer.max_steps=100000",
                                                         f"run.storage={s3_url}"))
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
    assert jobs.wait(c, sub.job_id, timeout_s=90) == "STOPPED"
    # SIGTERM is handled like Ctrl-C: teardown, then both files say so.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["error"] == "stopped by SIGTERM", summary
    assert jobs.read_status(str(run_dir))["state"] == "stopped"


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
