"""Jobs on a running Ray cluster through the Ray Jobs API: submit, status, logs, stop.

The project's code travels with each job as its runtime environment (``working_dir``);
nothing is installed by hand on the cluster. A submitted job is ``python -m
launch.train`` with the user's overrides, running as the Ray job's driver, whose
controller connects to that cluster. Its run directory is made absolute at submission
and recorded in the job's metadata, so `launch.status` can read the controller's
``status.json`` (step, loss, tokens/s, ETA, restarts) next to Ray's own job state.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import CONF_DIR
from orchestrator.errors import STOP_GRACE_S, ConfigError
from orchestrator.storage import RunPlaces

ROOT = CONF_DIR.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# What never travels with a job: environments, run outputs, caches.
EXCLUDES = [".venv", ".git", "runs", "outputs", "multirun", "wandb", "**/__pycache__", ".pytest_cache", "*.egg-info"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobsError(RuntimeError):
    """A cluster that cannot be reached, or a job that does not exist: a message for the user."""


def default_address() -> str:
    import os

    return os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


def run_command(body) -> int:
    """Runs a launch command's body, turning the user's mistakes into one line and exit code 2."""
    try:
        return body() or 0
    except (ConfigError, JobsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def check_address(address: str, timeout_s: float = 5.0) -> str:
    """The Jobs API address (the cluster's dashboard, http://host:port), checked to answer
    within seconds. Raises ConfigError for a malformed address, JobsError for a silent one."""
    parsed = urllib.parse.urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or not parsed.port:
        raise ConfigError("cluster.address", f"{address!r} is not a Jobs API address; "
                          f"expected http://HOST:PORT of the cluster's dashboard, e.g. {DEFAULT_ADDRESS}")
    try:
        request = urllib.request.Request(f"{address}/api/version", headers=auth_headers())
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            json.loads(resp.read())
    except urllib.error.HTTPError:
        pass  # something answered (a 401 without a token, say): the Jobs client reports what
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise JobsError(f"no Ray cluster answers at {address} ({reason}); is it running (`ray start --head`)?") from None
    return address


def auth_headers() -> dict[str, str]:
    """A bearer token header when a Ray token is at hand, found where Ray's token
    authentication looks: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    import os

    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(check_address(address), headers=auth_headers())


@dataclass(frozen=True)
class Submitted:
    job_id: str
    run_dir: str
    submitted_at: float


def submit(address: str, overrides: list[str], python: str | None = None) -> Submitted:
    """Validates the job here (bad input fails before anything reaches the cluster), then
    submits it. ``python`` is the interpreter the cluster runs it with: this one for a
    cluster on this machine, ``python`` on the cluster's PATH otherwise."""
    from orchestrator.config import compose

    overrides = [o for o in overrides if not o.startswith("cluster.address=")]
    job = compose(overrides)
    run_dir = str(Path(job.run.dir).expanduser().resolve())
    host = urllib.parse.urlparse(address).hostname
    python = python or (sys.executable if host in ("127.0.0.1", "localhost") else "python")
    entrypoint = shlex.join([python, "-m", "launch.train", *overrides, f"run.dir={run_dir}",
                             "cluster.address=auto"])
    c = client(address)
    started = time.time()
    job_id = c.submit_job(
        entrypoint=entrypoint,
        # launch.stop sends SIGTERM; the driver then tears the job down and writes summary.json
        # ("stopped"). Ray's supervisor waits 3 s by default before it sends SIGKILL: not enough.
        runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES,
                     "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S)}},
        metadata={"forgeline": "1", "name": job.run.name, "run_dir": run_dir},
        submission_id=f"{job.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{int(started * 1000) % 1000:03d}",
    )
    return Submitted(job_id, run_dir, started)


def job_info(c, job_id: str):
    try:
        return c.get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise JobsError(f"no job with id {job_id!r} on this cluster; `python -m launch.status` lists them") from None
        raise


def read_status(run_dir: str | None) -> dict:
    """The controller's status.json, or {} where it is not (yet) readable from here."""
    try:
        return json.loads(RunPlaces.of(run_dir).status_file.read_text()) if run_dir else {}
    except (OSError, ValueError):
        return {}


def status_rows(c, job_id: str | None = None) -> list[dict]:
    infos = [job_info(c, job_id)] if job_id else sorted(c.list_jobs(), key=lambda i: i.start_time or 0)
    rows = []
    for info in infos:
        meta = info.metadata or {}
        if not job_id and "forgeline" not in meta:
            continue  # another tool's job
        st = read_status(meta.get("run_dir"))
        rows.append({
            "id": info.submission_id or info.job_id, "name": meta.get("name", "-"),
            "ray": info.status.value if hasattr(info.status, "value") else str(info.status),
            "state": st.get("state", "-"), "step": f"{st.get('step', 0)}/{st.get('max_steps', '?')}" if st else "-",
            "loss": st.get("loss"), "tokens_per_s": st.get("tokens_per_s"), "eta_s": st.get("eta_s"),
            "restarts": st.get("restarts", "-") if st else "-",
        })
    return rows


def format_table(rows: list[dict]) -> str:
    def fmt(v, spec=""):
        return "-" if v is None else format(v, spec)

    header = ("job id", "name", "ray", "state", "step", "loss", "tokens/s", "ETA", "restarts")
    lines = [header] + [
        (r["id"], r["name"], r["ray"], r["state"], r["step"], fmt(r["loss"], ".4f"), fmt(r["tokens_per_s"], ",.0f"),
         "-" if r["eta_s"] is None else f"{r['eta_s']:.0f}s", str(r["restarts"]))
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def follow_logs(c, job_id: str, out=sys.stdout) -> str:
    """Streams the job's logs until it ends; returns its final Ray status."""
    import asyncio

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return str(job_info(c, job_id).status.value)


def wait(c, job_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = job_info(c, job_id).status.value
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
    raise JobsError(f"job {job_id} did not finish within {timeout_s:.0f}s")


def stop(c, job_id: str) -> bool:
    job_info(c, job_id)  # a clear error for an unknown id
    return c.stop_job(job_id)
