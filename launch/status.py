"""Show the project's jobs on a Ray cluster: state, step, loss, tokens/s, ETA, restarts.

    python -m launch.status [JOB_ID] [--address http://127.0.0.1:8265] [--watch SECONDS]
"""
from __future__ import annotations

import argparse
import sys
import time

from orchestrator import jobs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="launch.status", description=__doc__.split("\n\n")[0])
    ap.add_argument("job_id", nargs="?")
    ap.add_argument("--address", default=None)
    ap.add_argument("--watch", type=float, default=0.0, help="refresh every SECONDS until every job has ended")

    def body() -> int:
        args = ap.parse_args(argv)
        if not args.watch >= 0 or args.watch == float("inf"):  # also NaN
            ap.error(f"--watch: must be a number of seconds >= 0 (0: print once), got {args.watch}")
        c = jobs.client(args.address or jobs.default_address())
        while True:
            rows = jobs.status_rows(c, args.job_id)
            if args.watch:
                print("\033[2J\033[H", end="")  # clear the terminal: a live table
            print(jobs.format_table(rows), flush=True)
            if not args.watch or all(r["ray"] in jobs.TERMINAL for r in rows):
                return 0
            time.sleep(args.watch)

    sys.exit(jobs.run_command(body))


if __name__ == "__main__":
    main()
