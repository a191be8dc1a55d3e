"""Stage reports for people: ``report.json`` (the contract) rendered as ``report.md`` with plots."""

from __future__ import annotations

import io

import numpy as np

from .rundir import StageDir


def check_accounting(report: dict) -> None:
    """rows_in = rows_out + sum(rows_filtered) + rows_quarantined, or the stage lost or invented rows."""
    total = report["rows_out"] + sum(report["rows_filtered"].values()) + report["rows_quarantined"]
    if total != report["rows_in"]:
        raise RuntimeError(f"row accounting broken: rows_in={report['rows_in']} but out+filtered+quarantined={total}")


def score_histogram_png(scores: np.ndarray, kept: np.ndarray, threshold: float | None, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    bins = np.linspace(0.0, 1.0, 41)
    ax.hist([scores[~kept], scores[kept]], bins=bins, stacked=True, color=["#9aa5b1", "#1f77b4"],
            label=[f"not kept ({int((~kept).sum()):,})", f"kept ({int(kept.sum()):,})"])
    if threshold is not None:
        ax.axvline(threshold, color="#d62728", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("domain_score = P(in-domain)")
    ax.set_ylabel("documents (log)")
    ax.set_title(title)
    ax.legend(loc="upper center", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def markdown_table(rows: list[tuple[str, object]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" if isinstance(v, int) else f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def write_report(stage: StageDir, report: dict, markdown: str) -> None:
    check_accounting(report)
    stage.write_json("report.json", report)
    stage.write_text("report.md", markdown)
