"""Connecting to Ray: an embedded local cluster by default, or cluster.address."""
from __future__ import annotations

import contextlib
import os

from orchestrator.config import ClusterConfig
from orchestrator.errors import ConfigError

# Modules the embedded cluster's worker processes import as soon as Ray starts
# them, while the driver is still connecting: torch alone takes seconds, and
# DistributedDataParallel and torch's optimizers pull in torch._dynamo.
WORKER_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "orchestrator.trainer"]

# The embedded cluster's raylet starts its idle worker processes (one per logical CPU) as soon as
# it is up, instead of when the driver registers: about a second earlier, and those workers spend
# the wait importing WORKER_PRELOAD. Our actors then take them over.
# The raylet connects to its own object store and, while the store is not yet listening, retries
# after raylet_client_connect_timeout_milliseconds (1 s by default): in 5 of 8 starts on the 2-core
# machine ray.init took 3.0 s instead of 2.0 s for it. Retrying every 20 ms (the same 10 s budget
# in all) removed the second in 8 of 8.
# An embedded cluster has no dashboard to read Ray's own metrics or task events, so nothing records
# or ships them: on the 2-core machine the dashboard agent then took 0.2% of a core instead of 0.6%
# during training, and every such interruption of one rank stalls both at the next collective.
# Ray starts its worker processes at nice 15 (worker_niceness), below everything else on the node:
# ranks then yielded to the driver, Ray's daemons and wandb, which run at 0, as torchrun's and the
# deepspeed launcher's ranks do not. An embedded cluster's ranks run at 0 like theirs.
EMBEDDED_SYSTEM_CONFIG = {
    "preload_python_modules": WORKER_PRELOAD,
    "enable_worker_prestart": True,
    "enable_metrics_collection": False,
    "task_events_report_interval_ms": 0,
    "raylet_client_connect_timeout_milliseconds": 20,
    "raylet_client_num_connect_attempts": 500,
    "worker_niceness": 0,
}


def init_loopback(**kwargs) -> None:
    """``ray.init`` of an embedded cluster that listens on 127.0.0.1 only.

    Ray turns a node address of 127.0.0.1 into the machine's reachable one (its
    resolve_ip_for_localhost), and then its agents listen on that address and its gRPC servers
    (GCS, raylet, workers) on every interface: ``_node_ip_address="127.0.0.1"`` alone left ports
    open on 0.0.0.0, :: and the host's address. While the cluster starts, Ray's single-machine mode
    (the switch it uses on macOS and Windows, ray_constants.ENABLE_RAY_CLUSTER) is on, so the node
    address stays 127.0.0.1 and every listener binds to it (tests/test_serve_api.py checks every
    listening port of the process tree). A cluster started so still accepts nodes that run on
    this machine."""
    import ray
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def connect(cfg: ClusterConfig, extra_cpus: int = 0):
    """Yields with Ray initialized; shuts down only a cluster this call started.

    An already-initialized Ray (a test session's shared cluster, a Ray job) is reused. An embedded
    cluster advertises ``extra_cpus`` besides the ranks' (a GRPO job's rollout replicas).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    with kept_sigterm_handler():
        _init(cfg, extra_cpus)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def kept_sigterm_handler():
    """Ray's core worker installs a C handler for SIGTERM that aborts the process (exit -6, no
    teardown, no summary); the caller's Python handler (launch.train's: stop like Ctrl-C) is put
    back after it."""
    import signal
    import threading

    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(before) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, before)


def _init(cfg: ClusterConfig, extra_cpus: int) -> None:
    import ray

    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=True)
    else:
        num_cpus = cfg.num_cpus or max(os.cpu_count() or 1, cfg.num_workers * cfg.cpus_per_worker + extra_cpus)
        init_loopback(  # always a new cluster, even where `ray start` left one on this machine
            num_cpus=num_cpus,
            include_dashboard=cfg.include_dashboard,
            dashboard_host="127.0.0.1",
            _system_config=EMBEDDED_SYSTEM_CONFIG,
            log_to_driver=True,
        )
        idle_observers()


# Ray's observer processes, by script or by the title the agents give themselves: they log,
# report and watch for autoscaling, and once the cluster is up nothing in a job waits on them.
# In an embedded cluster they run at SCHED_IDLE: on a machine whose cores the ranks fill, they
# took about 2% of a core in training (log monitor 1.0%, dashboard agent 0.6%, dashboard 0.3%,
# autoscaler monitor 0.2% on the 2-core machine), and each time one of them pre-empts a rank, every
# rank waits for it at the next collective. At SCHED_IDLE they do not pre-empt; they run while the
# ranks wait for communication. The raylet and the GCS keep their priority.
OBSERVER_SCRIPTS = ("ray/_private/log_monitor.py", "ray/dashboard/dashboard.py", "ray/dashboard/agent.py",
                    "ray/autoscaler/_private/monitor.py", "ray/_private/runtime_env/agent/main.py")
OBSERVER_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _is_observer(argv: list[str]) -> bool:
    """By the interpreter's first arguments only: the raylet's own command line names agent.py."""
    head = [a.strip().replace(os.sep, "/") for a in argv[:3]]
    return bool(head) and (head[0] in OBSERVER_TITLES or any(a.endswith(OBSERVER_SCRIPTS) for a in head))


def idle_observers() -> list[int]:
    """Moves the embedded cluster's observer processes (every thread of each) to SCHED_IDLE."""
    if not hasattr(os, "SCHED_IDLE"):
        return []
    import psutil

    moved = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if not _is_observer(proc.cmdline()):
                continue
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
            moved.append(proc.pid)
        except (psutil.Error, OSError):
            pass
    return moved


def device_type(cfg: ClusterConfig) -> str:
    """cuda when asked for, or (auto) when the cluster has a GPU for every worker; else cpu."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.device == "cuda":
        if gpus < cfg.num_workers:
            raise ConfigError("cluster.device", f"cuda needs {cfg.num_workers} GPUs, the cluster has {gpus:g}")
        return "cuda"
    if cfg.device == "auto" and gpus >= cfg.num_workers:
        return "cuda"
    return "cpu"
