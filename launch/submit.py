"""Submit a training job to a running Ray cluster through the Ray Jobs API.

    python -m launch.submit [--no-follow] [--python PY] [hydra overrides] cluster.address=http://127.0.0.1:8265

Prints the job id, then follows the job's logs until it ends (exit 0 if it succeeded,
1 otherwise) unless --no-follow. Exit 2: bad configuration or no cluster at the address.
"""
from __future__ import annotations

import argparse
import json
import sys

from orchestrator import jobs
from orchestrator.storage import RunPlaces


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="launch.submit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-follow", action="store_true", help="print the job id and return")
    ap.add_argument("--python", default=None, help="interpreter on the cluster (default: this one for a local cluster)")
    args, overrides = ap.parse_known_args(argv)
    address = next((o.split("=", 1)[1] for o in overrides if o.startswith("cluster.address=")), None)

    def body() -> int:
        sub = jobs.submit(address or jobs.default_address(), overrides, python=args.python)
        print(f"submitted job {sub.job_id}\nrun directory: {sub.run_dir}", flush=True)
        if args.no_follow:
            return 0
        c = jobs.client(address or jobs.default_address())
        status = jobs.follow_logs(c, sub.job_id)
        metrics = RunPlaces.of(sub.run_dir).metrics_file
        if metrics.exists() and metrics.stat().st_size:
            first = json.loads(metrics.read_text().splitlines()[0])
            print(f"time from submit to first step: {first['time'] - sub.submitted_at:.1f} s")
        print(f"job {sub.job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1

    sys.exit(jobs.run_command(body))


if __name__ == "__main__":
    main()
