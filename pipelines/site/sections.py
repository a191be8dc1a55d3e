"""A section per stage that ran: its summary line, its figures (the PNGs it wrote, checked to be images a browser
shows, or drawn here from its data), report.json at a glance, and its report.md rendered into
``site/reports/<stage>.html`` with links made relative to there. A file of the stage that cannot be read becomes a
note in the section; the other sections are written all the same."""

from __future__ import annotations

import html
import posixpath
import re
from dataclasses import dataclass, field
from typing import Optional

from .figures import FALLBACK_FIGURES, STAGE_FIGURES, caption_of
from .page import _esc, _figures, _notes, _num, _page, _section
from .run import INDEX, SITE_DIR, Run, Unreadable, _short, check_png


@dataclass
class StageView:
    name: str
    report: Optional[dict] = None
    summary: str = ""
    figures: list[tuple[str, str]] = field(default_factory=list)  # (src relative to index.html, caption)
    notes: list[str] = field(default_factory=list)
    has_md: bool = False
    has_json: bool = False
    rendered: Optional[str] = None  # site/reports/<stage>.html, report.md rendered
    drawn: dict[str, str] = field(default_factory=dict)  # figure the stage did not write -> drawn here (site path)
    broken: list[str] = field(default_factory=list)  # figures of the stage that are not images a browser shows


def render_markdown(text: str) -> str:
    """Markdown as HTML, raw HTML in it shown as text (a report may quote what a model or a user wrote)."""
    import markdown

    md = markdown.Markdown(extensions=["tables", "fenced_code", "sane_lists"], output_format="html")
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    return md.convert(text)


_HREF = re.compile(r'href="([^"]*)"')
_IMG = re.compile(r'<img ([^>]*?)src="([^"]*)"([^>]*)>')


def _relative(url: str) -> bool:
    return bool(url) and not url.startswith(("#", "/", "data:")) and not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url)


def rebase_links(fragment: str, run: Run, view: "StageView") -> str:
    """The relative links and images of a stage's rendered report.md (relative to its stage folder) made relative
    to ``site/reports/``; an image the stage did not write is the one drawn here in its place, or a note."""
    prefix = f"../../{view.name}/"

    def image(m: re.Match) -> str:
        url = html.unescape(m.group(2))
        if not _relative(url):
            return m.group(0)
        if run.is_file(view.name, url) and all(src != f"{view.name}/{url}" for src in view.broken):
            return f'<img {m.group(1)}src="{_esc(prefix + url)}"{m.group(3)}>'
        if url in view.drawn:
            return f'<img {m.group(1)}src="../{_esc(posixpath.basename(view.drawn[url]))}"{m.group(3)}>'
        return f'<span class="note">figure not readable: {_esc(url)}</span>'

    def link(m: re.Match) -> str:
        url = html.unescape(m.group(1))
        return f'href="{_esc(prefix + url)}"' if _relative(url) else m.group(0)

    return _HREF.sub(link, _IMG.sub(image, fragment))


def read_stage(run: Run, name: str) -> StageView:
    view = StageView(name)
    try:
        report = run.read_json(name, "report.json")
        if not isinstance(report, dict):
            raise Unreadable(f"{name}/report.json: expected an object, got {type(report).__name__}")
        view.report, view.has_json = report, True
    except Unreadable as e:
        view.has_json = run.is_file(name, "report.json")
        view.notes.append(f"not readable: {e}")
    if view.report is not None:
        try:
            from ..stages import STAGES

            stage = next(s for s in STAGES if s.name == name)
            view.summary = stage.summary(stage.report.model_validate(view.report))
        except Exception as e:  # noqa: BLE001 - a report its stage's summary cannot take is noted, not fatal
            view.notes.append(f"not readable: {name}/report.json does not hold the stage's report ({_short(e)})")
    view.has_md = run.is_file(name, "report.md")
    entries = run.listing(name)
    pngs = [f for f in STAGE_FIGURES.get(name, []) if f in entries]
    pngs += [f for f in entries if f.endswith(".png") and f not in pngs]
    for png in pngs:
        try:
            check_png(run.read_bytes(name, png), f"{name}/{png}")
            view.figures.append((f"{name}/{png}", caption_of(name, png)))
        except Unreadable as e:
            view.notes.append(f"not readable: {e}")
            view.broken.append(f"{name}/{png}")
    for png in STAGE_FIGURES.get(name, []):
        draw = FALLBACK_FIGURES.get((name, png))
        if (png in entries and f"{name}/{png}" not in view.broken) or draw is None:
            continue
        try:
            site_name = f"{SITE_DIR}/{name}_{png}"
            run.write(site_name, draw(run))
            view.figures.append((site_name, caption_of(name, png) + " (drawn here from the stage's data)"))
            view.drawn[png] = site_name
        except Exception as e:  # noqa: BLE001 - a figure that cannot be drawn is noted
            view.notes.append(f"not readable: {png} could not be drawn: {_short(e)}")
    return view


def write_stage_report(run: Run, view: StageView) -> Optional[str]:
    """report.md rendered as ``site/reports/<stage>.html`` (its figures still read from the stage's folder)."""
    if not view.has_md:
        return None
    try:
        body = rebase_links(render_markdown(run.read_text(view.name, "report.md")), run, view)
    except Exception as e:  # noqa: BLE001
        view.notes.append(f"not readable: {_short(e)}")
        return None
    page = _page(f"{view.name} — report", f'<p class="crumbs"><a href="../../{INDEX}#stage-{view.name}">← the '
                 f'run\'s report</a> · <a href="../../{view.name}/report.md">report.md</a></p>\n'
                 f'<article class="md">{body}</article>')
    target = f"{SITE_DIR}/reports/{view.name}.html"
    run.write(target, page.encode("utf-8"))
    return target


_SKIP_FIELDS = {"stage", "rows_in", "rows_out", "rows_filtered", "rows_quarantined", "seconds", "phases", "outputs",
                "skipped_files"}


def facts_table(report: dict) -> str:
    """The report's other fields at a glance: scalars, and small mappings of scalars."""
    rows = []
    for key, value in report.items():
        if key in _SKIP_FIELDS:
            continue
        if isinstance(value, (str, int, float, bool)) and value is not None:
            text = _num(value) if not isinstance(value, str) else _esc(value if len(value) <= 160 else
                                                                       value[:160] + " ...")
        elif (isinstance(value, dict) and value and len(value) <= 8
              and all(isinstance(x, (str, int, float, bool)) or x is None for x in value.values())):
            text = ", ".join(f"{_esc(k)}: {_num(x)}" for k, x in value.items())
        elif isinstance(value, list) and value and len(value) <= 8 and all(isinstance(x, str) for x in value):
            text = _esc(", ".join(value))
        else:
            continue
        rows.append(f"<tr><th>{_esc(key)}</th><td>{text}</td></tr>")
    filtered = report.get("rows_filtered")
    if isinstance(filtered, dict) and filtered:
        rows.insert(0, "<tr><th>filtered</th><td>" + ", ".join(f"{_esc(k)}: {_num(x)}" for k, x in filtered.items())
                    + "</td></tr>")
    phases = report.get("phases")
    if isinstance(phases, dict) and phases:
        rows.append("<tr><th>phases (s)</th><td>" + ", ".join(f"{_esc(k)}: {_num(x)}" for k, x in phases.items())
                    + "</td></tr>")
    return f"<details><summary>report.json at a glance</summary><table>{''.join(rows)}</table></details>" \
        if rows else ""


def stage_section(v: StageView) -> str:
    links = []
    if v.rendered:
        links.append(f'<a href="{_esc(v.rendered)}">report</a>')
    if v.has_md:
        links.append(f'<a href="{v.name}/report.md">report.md</a>')
    if v.has_json:
        links.append(f'<a href="{v.name}/report.json">report.json</a>')
    inner = f'<p class="links">{"".join(links)}</p>'
    if v.summary:
        inner += f'<div class="summary">{_esc(v.summary)}</div>'
    inner += _notes(v.notes)
    figures = v.figures
    if v.name == "evaluate":  # its chart is in the Evaluation section, beside the table
        figures = [f for f in figures if f[0] != "evaluate/results.png"]
        inner += '<p class=caption>The results table and chart: <a href="#evaluation">Evaluation</a>.</p>'
    inner += _figures(figures)
    if v.report is not None:
        inner += facts_table(v.report)
    return _section(_esc(v.name), f"stage-{v.name}", inner)
