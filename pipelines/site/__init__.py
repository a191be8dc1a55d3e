"""The run's report site: ``<run>/index.html`` and ``<run>/site/``, static files that open in a browser from disk (or
from wherever the run directory is served or synced to; links are relative).

``index.html`` holds a table of the stages that ran (rows in, out, filtered, quarantined, seconds, each stage's
summary line), the pictures people look for — the data map (TRAIT's Figure 3: general corpus, in-domain examples,
selected documents, synthetic samples and downstream-task items, embedded with the run's embedding model and drawn
in two dimensions), the training curves with the boundary between pretraining's stages (TRAIT's Figure 4), the
evaluation table and chart — then a section per stage with its figures (the PNGs the stage wrote; drawn here from
its data where the stage left none) and links to its report (rendered from report.md into ``site/reports/``),
report.md and report.json. A stage that did not run is absent; a file of a stage that cannot be read gives that
section a "not readable: reason" note and the rest of the page is still written.

``write_site(run_dir, recipe)`` writes it (the runner calls it after the last stage; ``domainsynth report RUN``
rewrites it later). The recipe names the inputs that are not in the run directory (the general corpus, the in-domain
examples, the evaluation items that QC decontaminates against); they are remembered in ``site/sources.json``, so that
a later rewrite without the recipe draws the same groups.
"""

from __future__ import annotations

import json
import posixpath
import time
from typing import Any

from .curves import TRAINING_STAGES, metrics, pretrain_curves, training_curves
from .embedding_map import (MAP_GROUPS, MAP_MAX_SEQ_LENGTH, MAP_POINTS, MAP_TEXT_CHARS, SYNTHETIC_STAGES, MapGroup,
                            data_map, embed_texts_here, map_groups, project_2d)
from .figures import (FALLBACK_FIGURES, FIGURE_CAPTIONS, STAGE_FIGURES, caption_of, judge_ratings, select_histogram,
                      stage_loss)
from .page import CSS, _esc, _figure, _map_section, _notes, _page, _section, evaluation_table, summary_table
from .run import (INDEX, PNG_MAGIC, SITE_DIR, SOURCES, Run, Unreadable, _short, check_png, parquet_folder,
                  stage_names)
from .samples import MAP_SEED, record_text, sample_file_texts, sample_rows, sources_of, task_items
from .sections import (StageView, facts_table, read_stage, rebase_links, render_markdown, stage_section,
                       write_stage_report)

__all__ = [
    "write_site", "stage_names", "Run", "Unreadable", "check_png", "parquet_folder", "sources_of", "record_text",
    "sample_file_texts", "sample_rows", "task_items", "MapGroup", "MAP_GROUPS", "map_groups", "embed_texts_here",
    "project_2d", "data_map", "metrics", "pretrain_curves", "training_curves", "select_histogram", "judge_ratings",
    "stage_loss", "FALLBACK_FIGURES", "STAGE_FIGURES", "FIGURE_CAPTIONS", "caption_of", "StageView",
    "render_markdown", "rebase_links", "read_stage", "write_stage_report", "facts_table", "stage_section", "CSS",
    "summary_table", "evaluation_table", "SITE_DIR", "INDEX", "SOURCES", "PNG_MAGIC", "MAP_POINTS", "MAP_SEED",
    "MAP_TEXT_CHARS", "MAP_MAX_SEQ_LENGTH", "TRAINING_STAGES", "SYNTHETIC_STAGES",
]


def write_site(run_dir: str, recipe: Any = None) -> str:
    """Write ``<run_dir>/index.html`` (and ``<run_dir>/site/``) for the stages the run holds; returns index.html's
    path. ``recipe``: the run's recipe, for the data map's groups that live outside the run directory (remembered in
    ``site/sources.json``; without a recipe, the ones remembered there are used). The data map draws at most
    ``MAP_POINTS`` of each group: this package's setting, read when the page is written (tests lower it)."""
    started = time.perf_counter()
    run = Run(run_dir)
    if recipe is not None:
        sources = sources_of(recipe)
        run.write(f"{SITE_DIR}/{SOURCES}", (json.dumps(sources, indent=2) + "\n").encode("utf-8"))
    else:
        try:
            sources = run.read_json(SITE_DIR, SOURCES)
        except Unreadable:
            sources = {}
    present = [name for name in stage_names() if run.is_dir(name)]
    views = []
    for name in present:
        try:
            view = read_stage(run, name)
            view.rendered = write_stage_report(run, view)
        except Exception as e:  # noqa: BLE001 - the stage's section says why; the others are written all the same
            view = StageView(name, notes=[f"not readable: {_short(e)}"])
        views.append(view)

    try:
        map_info, map_error = data_map(run, sources, present, MAP_POINTS), None
        run.write(f"{SITE_DIR}/embedding_map.json", (json.dumps(map_info, indent=2) + "\n").encode("utf-8"))
    except Exception as e:  # noqa: BLE001 - the rest of the page is written all the same
        map_info, map_error = None, _short(e)
    try:
        curves, curve_notes = training_curves(run, present)
    except Exception as e:  # noqa: BLE001
        curves, curve_notes = None, [f"not readable: the training curves could not be drawn: {_short(e)}"]

    parts = [f"<h1>domainsynth run: {_esc(posixpath.basename(run.path.rstrip('/')) or run.uri)}</h1>",
             f'<p class="meta">{_esc(run.uri)} · {len(present)} stage(s) · page written '
             f'{time.strftime("%Y-%m-%d %H:%M:%S")}</p>']
    toc = ['<a href="#overview">overview</a>', '<a href="#data-map">data map</a>']
    if curves or curve_notes:
        toc.append('<a href="#training">training curves</a>')
    if "evaluate" in present:
        toc.append('<a href="#evaluation">evaluation</a>')
    toc += [f'<a href="#stage-{v.name}">{v.name}</a>' for v in views]
    parts.append(f'<nav class="toc">{"".join(toc)}</nav>')
    if not present:
        parts.append(_section("Overview", "overview", "<p>This run directory holds no stage yet.</p>"))
    else:
        parts.append(_section("Overview", "overview", summary_table(views)
                              + "<p class=caption>rows in = rows out + filtered + quarantined for every stage "
                                "(hover over a filtered count for its reasons); seconds as the stage timed itself."
                                "</p>"))
    parts.append(_section("Data map (TRAIT's Figure 3)", "data-map", _map_section(map_info, map_error, MAP_POINTS)))
    if curves or curve_notes:
        inner = (_figure(curves, "training curves from each stage's metrics.jsonl; pretrain's stages end to end, "
                                 "the dashed line where the next stage starts (TRAIT's Figure 4)", "training curves",
                         wide=True)
                 if curves else "") + _notes(curve_notes)
        parts.append(_section("Training curves (TRAIT's Figure 4)", "training", inner))
    if "evaluate" in present:
        try:
            inner = evaluation_table(run)
        except Unreadable as e:
            inner = _notes([f"not readable: {e}"])
        except Exception as e:  # noqa: BLE001
            inner = _notes([f"not readable: evaluate/results.json: {_short(e)}"])
        chart = next((src for src, _ in next(v for v in views if v.name == "evaluate").figures
                      if src.endswith("results.png")), None)
        if chart:
            inner += _figure(chart, caption_of("evaluate", "results.png"), wide=True)
        parts.append(_section("Evaluation", "evaluation", inner))
    parts += [stage_section(v) for v in views]
    parts.append(f'<p class="meta">Written by domainsynth in {time.perf_counter() - started:.1f} s. Each stage\'s '
                 f'folder holds its data/, report.md, report.json and quarantine.jsonl.</p>')
    run.write(INDEX, _page("domainsynth run report", "\n".join(parts)).encode("utf-8"))
    return run.root.child(INDEX)
