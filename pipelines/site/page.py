"""The HTML the site is made of: the page skeleton and its style, figures, notes and sections, and the tables of
the index page (the stages that ran, the evaluation results) and its data-map section. Plain strings, every value
escaped, links relative, so that the files open from disk or wherever the run directory is served."""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Optional

from .run import SITE_DIR, Run, Unreadable

if TYPE_CHECKING:
    from .sections import StageView


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x) -> str:
    if isinstance(x, bool) or x is None:
        return _esc(x if x is not None else "")
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.4g}"
    return _esc(x)


CSS = """
body{font:14px/1.5 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d2329;margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:20px 28px 60px;background:#fff;min-height:100vh}
h1{font-size:24px;margin:8px 0 4px}
h2{font-size:19px;margin:34px 0 10px;padding-bottom:4px;border-bottom:1px solid #e1e4e8}
h3{font-size:16px;margin:22px 0 8px}
.meta{color:#5a6470;margin:0 0 14px}
nav.toc{display:flex;flex-wrap:wrap;gap:6px;margin:10px 0 4px}
nav.toc a{padding:2px 9px;border:1px solid #d0d7de;border-radius:12px;text-decoration:none;color:#24292f;font-size:13px}
nav.toc a:hover{background:#eef3f8}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px;display:block;max-width:100%;overflow-x:auto}
th,td{border:1px solid #d8dee4;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f3f5f7}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.unreadable td{background:#fff4f2}
.better{color:#1a7f37}.worse{color:#cf222e}
figure{margin:0;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #e1e4e8;display:block}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(500px,1fr));gap:14px 18px;margin:10px 0 12px}
figure.wide{margin:10px 0 14px}
figcaption{font-size:12px;color:#5a6470}
span.note{display:inline-block}
.note{background:#fff4f2;border-left:4px solid #cf222e;padding:6px 10px;margin:8px 0;font-size:13px}
.summary{background:#f3f8ff;border-left:4px solid #0969da;padding:6px 10px;margin:8px 0;font-size:13px}
.links a{margin-right:14px}
details{margin:8px 0}summary{cursor:pointer;color:#0969da}
.caption{font-size:13px;color:#3d4650;max-width:900px}
.crumbs{font-size:13px}
article.md img{max-width:100%}
code{background:#f3f5f7;padding:1px 4px;border-radius:3px;font-size:12px}
"""


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{_esc(title)}</title>\n'
            f'<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n')


def _figure(src: str, caption: str, alt: str = "", wide: bool = False) -> str:
    return (f'<figure{" class=wide" if wide else ""}><img src="{_esc(src)}" alt="{_esc(alt or caption)}">'
            f'<figcaption>{_esc(caption)}</figcaption></figure>')


def _figures(figures: list[tuple[str, str]]) -> str:
    return f'<div class="figs">{"".join(_figure(src, caption) for src, caption in figures)}</div>' if figures else ""


def _notes(notes: list[str]) -> str:
    return "".join(f'<div class="note">{_esc(n)}</div>' for n in notes)


def _section(title: str, anchor: str, inner: str) -> str:
    return f'<section id="{anchor}">\n<h2>{title}</h2>\n{inner}\n</section>'


def summary_table(views: list[StageView]) -> str:
    head = ("<tr><th>stage</th><th>rows in</th><th>rows out</th><th>filtered</th><th>quarantined</th>"
            "<th>seconds</th><th>summary</th></tr>")
    rows = []
    for v in views:
        r = v.report
        link = f'<a href="#stage-{v.name}">{v.name}</a>'
        if r is None:
            rows.append(f'<tr class="unreadable"><td>{link}</td><td colspan="6">'
                        f'{_esc(v.notes[0] if v.notes else "not readable")}</td></tr>')
            continue
        filtered = r.get("rows_filtered") if isinstance(r.get("rows_filtered"), dict) else {}
        total = sum(x for x in filtered.values() if isinstance(x, (int, float)))
        reasons = ", ".join(f"{k}: {_num(x)}" for k, x in filtered.items() if x)
        rows.append(f"<tr><td>{link}</td><td class=n>{_num(r.get('rows_in'))}</td>"
                    f"<td class=n>{_num(r.get('rows_out'))}</td>"
                    f"<td class=n title=\"{_esc(reasons)}\">{_num(total)}</td>"
                    f"<td class=n>{_num(r.get('rows_quarantined', 0))}</td><td class=n>{_num(r.get('seconds'))}</td>"
                    f"<td>{_esc(v.summary)}</td></tr>")
    seconds = sum(v.report.get("seconds") or 0 for v in views if v.report and
                  isinstance(v.report.get("seconds"), (int, float)))
    rows.append(f'<tr><th colspan="5">all stages</th><td class=n><b>{_num(float(seconds))}</b></td><td></td></tr>')
    return f"<table>{head}{''.join(rows)}</table>"


def evaluation_table(run: Run) -> str:
    """results.json as a table: a row per task and metric, a column per model (value ± standard error, the change
    from the first model, green where it is better)."""
    results = run.read_json("evaluate", "results.json")
    if not isinstance(results, dict):
        raise Unreadable(f"evaluate/results.json: expected an object, got {type(results).__name__}")
    try:
        labels = [m["name"] for m in results["models"]]
        rows, tasks = results["rows"], results["tasks"]
        chance = results.get("chance_accuracy") or {}
    except KeyError as e:
        raise Unreadable(f"evaluate/results.json: no {e} field") from None
    except TypeError as e:
        raise Unreadable(f"evaluate/results.json: not as the evaluate stage writes it ({e})") from None
    by_key = {(r.get("task"), r.get("metric"), r.get("model")): r for r in rows}
    head = "<tr><th>task</th><th>metric</th>" + "".join(f"<th>{_esc(x)}</th>" for x in labels) + \
        "<th>chance</th><th>items</th></tr>"
    body = []
    for task in tasks:
        for metric in dict.fromkeys(r.get("metric") for r in rows if r.get("task") == task):
            cells = []
            base = by_key.get((task, metric, labels[0])) or {}
            better_up = base.get("higher_is_better")
            for label in labels:
                r = by_key.get((task, metric, label)) or {}
                value, stderr, delta = r.get("value"), r.get("stderr"), r.get("delta")
                text = f"{value:.4f}" if _finite(value) else "n/a"
                if _finite(stderr):
                    text += f" ± {stderr:.4f}"
                if _finite(delta):
                    kind = "" if delta == 0 or better_up is None else (
                        "better" if (delta > 0) == bool(better_up) else "worse")
                    text += f' <span class="{kind}">({delta:+.4f})</span>'
                cells.append(f"<td class=n>{text}</td>")
            arrow = {True: " ↑", False: " ↓"}.get(better_up, "")
            guess = chance.get(task)
            guess = f"{guess:.4f}" if _finite(guess) and str(metric).startswith("acc") else ""
            body.append(f"<tr><td>{_esc(task)}</td><td>{_esc(metric)}{arrow}</td>{''.join(cells)}"
                        f"<td class=n>{guess}</td><td class=n>{_num(base.get('items'))}</td></tr>")
    models = "".join(f"<li><b>{_esc(m.get('name'))}</b>: {_esc(m.get('model'))}"
                     + (f" + adapter {_esc(m['adapter'])}" if m.get("adapter") else "") + "</li>"
                     for m in results["models"] if isinstance(m, dict))
    return (f"<table>{head}{''.join(body)}</table><p class=caption>Value ± standard error; in brackets the change "
            f"from {_esc(labels[0])} (green: better, red: worse). ↑ higher is better, ↓ lower is better. chance: "
            f"the accuracy of guessing.</p><ul class=caption>{models}</ul>")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _map_section(info: Optional[dict], error: Optional[str], points: int) -> str:
    if error:
        return _notes([f"not readable: the data map could not be drawn: {error}"])
    if info is None or not info.get("groups"):
        missing = (info or {}).get("missing") or {}
        return "<p class=caption>No data to draw: the run has none of the groups.</p>" + _notes(
            [f"{k}: {v}" for k, v in missing.items()])
    items = "".join(f"<li><b>{_esc(label)}</b> ({g['points']:,} points): {_esc(g['source'])}</li>"
                    for label, g in info["groups"].items())
    return (_figure(f"{SITE_DIR}/embedding_map.png", "TRAIT's Figure 3 for this run — site/embedding_map.png",
                    "data map", wide=True)
            + f"<p class=caption>Each point is a text embedded with {_esc(info['model'])} and placed by "
              f"{_esc(info['method'])} (fixed seed); at most {points} of each group, drawn at random. Where "
              f"synthetic samples reach the downstream tasks that the in-domain examples leave uncovered, the "
              f"method fills the gap TRAIT's Figure 3 shows.</p><ul class=caption>{items}</ul>"
            + _notes([f"{k}: {v}" for k, v in (info.get("missing") or {}).items()]))
