"""The preparation report as a picture: documents and bytes after each stage, the time each took,
and the document-length histograms before and after."""
from __future__ import annotations

import io

import numpy as np


def picture(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = report["stages"]
    names = [s["stage"] for s in stages]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.bar(names, [s["docs_out"] for s in stages], color="#4c72b0")
    ax.set_title("documents after each stage")
    ax2 = ax.twinx()
    ax2.plot(names, [s["bytes_out"] / 1e6 for s in stages], color="#dd8452", marker="o")
    ax2.set_ylabel("MB")
    ax.tick_params(axis="x", rotation=45)
    ax = axes[1]
    times = [s["cpu_s"] for s in stages] + [report.get("tokenize", {}).get("seconds", 0)]
    ax.bar(names + ["tokenize"], times, color="#55a868")
    ax.set_title("seconds per stage (workers' CPU; tokenize: wall)")
    ax.tick_params(axis="x", rotation=45)
    ax = axes[2]
    hist = report.get("histogram", {})
    edges = np.logspace(0, 6, 21)
    for key, color in (("words_in", "#c44e52"), ("words_out", "#4c72b0")):
        if key in hist:
            ax.stairs(hist[key], edges, label=key.replace("_", " "), color=color)
    ax.set_xscale("log")
    ax.set_xlabel("words per document")
    ax.set_title("document lengths")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
