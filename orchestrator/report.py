"""The end-of-job summary table on the console."""
from __future__ import annotations


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def print_summary(summary: dict, run_dir: str) -> None:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [
        ("status", summary["status"]),
        ("strategy", f"{summary['strategy']} x {summary['world_size']} workers"),
        ("model", f"{summary['model']} ({num(summary.get('n_params'), ',')} parameters)"),
        ("steps", f"{summary['steps']} / {summary['max_steps']}"),
        ("first -> final loss", f"{num(summary['losses'][0] if summary['losses'] else None, '.4f')} -> "
                                f"{num(summary['final_loss'], '.4f')}"),
        ("tokens/s (median)", num(summary["tokens_per_s"], ",.0f")),
        ("time to first step", f"{num(summary['time_to_first_step_s'], '.1f')} s"),
        ("wall time", f"{summary['wall_s']:.1f} s"),
        ("peak RSS per rank", ", ".join(_fmt_bytes(b) for b in summary["peak_rss_bytes_per_rank"]) or "-"),
        ("restarts", str(summary["restarts"])),
        ("run directory", run_dir),
    ]
    if summary.get("error"):
        rows.append(("error", summary["error"]))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    print(line)
    for k, v in rows:
        print(f"{k:<{width}} | {v}")
    print(line)
    if summary.get("sample"):
        print("Sample from the trained model:\n")
        print(summary["sample"])
        print(line)
