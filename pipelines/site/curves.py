"""The training curves, TRAIT's Figure 4 for this run: ``site/training_curves.png``, a panel per training stage
drawn from its metrics.jsonl, pretraining's stages end to end with the boundary between them marked, so that
learning (held-out domain loss) and forgetting (held-out general loss) read across the switch of data."""

from __future__ import annotations

import json
import math
from typing import Optional

from ..report import _png, _pyplot
from .run import SITE_DIR, Run, Unreadable

TRAINING_STAGES = ("softprompt", "pretrain", "finetune", "preference")


def metrics(run: Run, *parts: str) -> list[dict]:
    text = run.read_text(*parts)
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise Unreadable(f"{'/'.join(parts)}: line {number} is not valid JSON") from None
    return out


def _series(history: list[dict], key: str, offset: float = 0.0) -> list[tuple[float, float]]:
    return [(offset + h["step"], h[key]) for h in history
            if isinstance(h.get(key), (int, float)) and isinstance(h.get("step"), (int, float))
            and math.isfinite(h[key])]


def pretrain_curves(run: Run) -> tuple[dict, list[tuple[float, str]], list[str]]:
    """Training loss and held-out losses over pretraining's stages end to end, and the boundaries between them."""
    try:
        steps = run.read_json("pretrain", "report.json").get("steps") or {}
    except Unreadable:
        steps = {}
    names = list(steps) or [n for n in run.listing("pretrain") if run.is_file("pretrain", n, "metrics.jsonl")]
    series = {"training loss": [], "held-out domain loss": [], "held-out general loss": []}
    bounds, offset, notes = [], 0.0, []
    for i, name in enumerate(names):
        try:
            history = metrics(run, "pretrain", name, "metrics.jsonl")
        except Unreadable as e:
            notes.append(f"not readable: {e}")
            history = []
        if i:
            bounds.append((offset, f"{names[i - 1]} → {name}"))
        series["training loss"] += _series(history, "loss", offset)
        series["held-out domain loss"] += _series(history, "eval_domain_loss", offset)
        series["held-out general loss"] += _series(history, "eval_general_loss", offset)
        last = max([h["step"] for h in history if isinstance(h.get("step"), (int, float))], default=0)
        offset += steps.get(name) or last
    return series, bounds, notes


def training_curves(run: Run, present: list[str]) -> tuple[Optional[str], list[str]]:
    """``site/training_curves.png``: a panel per training stage (pretrain across its stages, the boundary marked:
    TRAIT's Figure 4), from each stage's metrics.jsonl. Returns its path in the site (None: nothing to draw) and
    notes on logs that could not be read."""
    panels, notes = [], []
    for name in TRAINING_STAGES:
        if name not in present:
            continue
        if name == "pretrain":
            series, bounds, more = pretrain_curves(run)
            notes += [f"pretrain: {n}" for n in more]
        else:
            try:
                history = metrics(run, name, "metrics.jsonl")
            except Unreadable as e:
                notes.append(f"{name}: not readable: {e}")
                continue
            series = {"training loss": _series(history, "loss"),
                      "validation loss": _series(history, "eval_validation_loss")}
            bounds = []
        if any(series.values()):
            panels.append((name, series, bounds))
    if not panels:
        return None, notes
    # pretrain (TRAIT's stages end to end) gets the top row to itself; the other stages share the rows below it.
    wide = [p for p in panels if p[0] == "pretrain"]
    others = [p for p in panels if p[0] != "pretrain"]
    cols = max(1, min(3, len(others)))
    rows = len(wide) + math.ceil(len(others) / cols)
    plt = _pyplot()
    fig = plt.figure(figsize=(11.0 if len(panels) > 1 else 7.5, 3.5 * rows), dpi=110)
    grid = fig.add_gridspec(rows, cols)
    places = [grid[0, :]] * len(wide) + [grid[len(wide) + i // cols, i % cols] for i in range(len(others))]
    styles = {"training loss": dict(color="#1f77b4", linewidth=1.4),
              "held-out domain loss": dict(color="#d62728", marker="o", markersize=4, linewidth=1.2),
              "held-out general loss": dict(color="#7f7f7f", marker="s", markersize=3, linewidth=1.0,
                                            linestyle="--"),
              "validation loss": dict(color="#d62728", marker="o", markersize=4, linewidth=1.2)}
    for (name, series, bounds), place in zip(wide + others, places):
        ax = fig.add_subplot(place)
        for label, points in series.items():
            if points:
                style = dict(styles[label])
                if len(points) < 40 and "marker" not in style:
                    style.update(marker="o", markersize=2.5)
                ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
        end = max(p[0] for points in series.values() for p in points)
        for i, (x, label) in enumerate(bounds):
            ax.axvline(x, color="#444444", linestyle="--", linewidth=1.0)
            nxt = bounds[i + 1][0] if i + 1 < len(bounds) else end
            ax.axvspan(x, nxt, color="#1a9850", alpha=0.07, linewidth=0)
            ax.annotate(label, (x, 1), xycoords=("data", "axes fraction"), xytext=(4, -12),
                        textcoords="offset points", fontsize=8, color="#333333")
        ax.set_title(name + (" (stages end to end)" if name == "pretrain" and bounds else ""), fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, loc="best")
    run.write(f"{SITE_DIR}/training_curves.png", _png(fig))
    return f"{SITE_DIR}/training_curves.png", notes
