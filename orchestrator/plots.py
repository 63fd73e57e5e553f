"""Pictures at the end of a job (report.png) and of a sweep (comparison.png), with matplotlib."""
from __future__ import annotations

from pathlib import Path


def _figure(ncols: int, width: float = 5.0):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 3.8))
    return plt, fig, axes


def job_report(history: list[dict], summary: dict, path: str | Path) -> None:
    """Loss (and validation loss) and tokens/s over steps, and memory per rank."""
    plt, fig, (loss_ax, speed_ax, mem_ax) = _figure(3)
    steps = [m["step"] for m in history]
    loss_ax.plot(steps, [m["loss"] for m in history], label="train")
    val = [(m["step"], m["val_loss"]) for m in history if "val_loss" in m]
    if val:
        loss_ax.plot(*zip(*val), "o-", label="validation")
    loss_ax.set(title="loss", xlabel="step")
    loss_ax.legend()
    speed_ax.plot(steps, [m["tokens_per_s"] for m in history])
    speed_ax.set(title="tokens/s", xlabel="step")
    states = summary["memory"].get("model_states_bytes_per_rank") or []
    rss = summary.get("peak_rss_bytes_per_rank") or []
    ranks = range(max(len(states), len(rss)))
    mib = 2.0**20
    mem_ax.bar([r - 0.2 for r in ranks][: len(states)], [(b or 0) / mib for b in states], width=0.4,
               label="model states")
    mem_ax.bar([r + 0.2 for r in ranks][: len(rss)], [b / mib for b in rss], width=0.4, label="peak RSS")
    mem_ax.set(title="memory per rank (MiB)", xlabel="rank", xticks=list(ranks))
    mem_ax.legend()
    fig.suptitle(f"{summary['strategy']} x {summary['world_size']}, {summary['model']}: {summary['status']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def sweep_chart(rows: list[dict], path: str | Path) -> None:
    """One bar per job of a sweep: final loss, tokens/s, peak model-state memory per rank."""
    plt, fig, axes = _figure(3, width=4.5)
    labels = [r["label"] for r in rows]
    for ax, key, title in zip(axes, ("final_loss", "tokens_per_s", "model_states_mib"),
                              ("final loss", "tokens/s", "model states per rank (MiB)")):
        ax.bar(range(len(rows)), [r[key] or 0 for r in rows])
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
