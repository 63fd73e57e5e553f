"""Stop a job: python -m launch.stop JOB_ID [--address ADDRESS]

The job's driver gets the signal; its controller tears down the worker group."""
from __future__ import annotations

import argparse
import sys

from orchestrator import jobs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="launch.stop", description=__doc__.split("\n\n")[0])
    ap.add_argument("job_id")
    ap.add_argument("--address", default=None)

    def body() -> int:
        args = ap.parse_args(argv)
        stopped = jobs.stop(jobs.client(args.address or jobs.default_address()), args.job_id)
        print(f"job {args.job_id}: {'stop requested' if stopped else 'already ended'}")
        return 0

    sys.exit(jobs.run_command(body))


if __name__ == "__main__":
    main()
