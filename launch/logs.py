"""Print a job's logs: python -m launch.logs JOB_ID [--follow] [--address ADDRESS]"""
from __future__ import annotations

import argparse
import sys

from orchestrator import jobs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="launch.logs", description=__doc__)
    ap.add_argument("job_id")
    ap.add_argument("--follow", action="store_true", help="stream until the job ends")
    ap.add_argument("--address", default=None)

    def body() -> int:
        args = ap.parse_args(argv)
        c = jobs.client(args.address or jobs.default_address())
        jobs.job_info(c, args.job_id)
        if args.follow:
            jobs.follow_logs(c, args.job_id)
        else:
            print(c.get_job_logs(args.job_id), end="")
        return 0

    sys.exit(jobs.run_command(body))


if __name__ == "__main__":
    main()
