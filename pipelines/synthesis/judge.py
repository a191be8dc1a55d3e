"""The LLM judge (DOMINO's post-processing): the LLM rates each sample on five levels — very poor, poor, average,
good, excellent — answering with JSON held to an enum at temperature 0; samples rated at least ``threshold``
(default: excellent, as the authors kept) are kept. Every row, kept or dropped, carries ``judge_rating`` and
``judge_score`` (1-5); an answer that cannot be read is dropped as ``unrated``."""

from __future__ import annotations

import json
from typing import Literal, Optional

import pyarrow as pa
from pydantic import Field

from ...actors.engines import SamplingParams
from .. import paths
from ..corpus import READ_TASK_CPUS, CorpusSpec, read_corpus
from ..report import _png, _pyplot, markdown_table, write_report
from ..rundir import QUARANTINE_PARTS, StageDir
from ..schema import IdField, InputPath, InputPaths
from ..stage import Stage, StageClock, check_inputs, check_model
from .diversity import DiversityConfig
from .generate import EnginePool, EnginePoolConfig
from .outcomes import (DROP_DETAIL, DROP_REASON, OutcomeReport, acceptance_rate, finish_outcomes, kept_diversity,
                       outcome_rows, outcome_summary, value_counts)
from .prompts import PromptTemplate, check_renders, load_template
from .references import References, load_reference_texts, references_of

RATINGS = ("very poor", "poor", "average", "good", "excellent")  # DOMINO's five levels, worst first


class JudgeConfig(EnginePoolConfig):
    """The LLM judge: each sample rated on DOMINO's five levels with a structured answer at temperature 0."""
    input: Optional[InputPaths] = Field(None, description="Samples to judge (JSONL/Parquet); null = this run's qc "
                                                        "output, else its synthesize output.")
    text_field: str = Field("text", description="The field the judge reads.")
    id_field: IdField = "id"
    template: Optional[InputPath] = Field(None, description="A Jinja2 judge template replacing the default.")
    system_prompt: Optional[str] = Field(None, description="A system message before each prompt.")
    threshold: Literal[RATINGS] = Field("excellent", description="Keep samples rated at least this.")
    max_tokens: int = Field(32, gt=0, description="Tokens for the rating's JSON.")
    max_sample_chars: int = Field(6000, gt=0, description="A longer sample is cut to this in the prompt.")
    references: Optional[InputPaths] = Field(None, description="References for the diversity report; null = "
                                                             "synthesize's.")
    reference_fields: Optional[list[str]] = Field(None, description="Fields of a reference joined into its text; "
                                                  "null = as for synthesize.")
    diversity: DiversityConfig = DiversityConfig()

TEMPLATE_VARIABLES, REQUIRED_VARIABLES = {"sample", "row"}, {"sample"}
RATING_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["rating"],
                 "properties": {"rating": {"type": "string", "enum": list(RATINGS)}}}
PROMPT = "_prompt"


def judge_params(cfg: JudgeConfig) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens, json_schema=RATING_SCHEMA)


def prepare(cfg: JudgeConfig) -> PromptTemplate:
    template = load_template(cfg.template, "judge", "judge.template", TEMPLATE_VARIABLES, REQUIRED_VARIABLES)
    check_renders(template, "judge.template", sample="A sample.", row={cfg.text_field: "A sample."})
    return template


def read_rating(completion: str) -> str | None:
    try:
        answer = json.loads(completion)
    except json.JSONDecodeError:
        return None
    rating = answer.get("rating") if isinstance(answer, dict) else None
    return rating if rating in RATINGS else None


class JudgePrompts:
    """Ray Data batch function: each sample row gains the prompt that asks for its rating."""

    def __init__(self, template: PromptTemplate, cfg: JudgeConfig):
        self.template, self.field, self.max_chars = template, cfg.text_field, cfg.max_sample_chars

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        prompts = [self.template.render(sample=r[self.field][:self.max_chars],
                                        row={k: v for k, v in r.items() if not k.startswith("_")}) for r in rows]
        return batch.append_column(PROMPT, pa.array(prompts, pa.string()))


class ApplyThreshold:
    """Ray Data batch function: the rating on every row; rows below the threshold (or unrated) get a drop reason."""

    def __init__(self, threshold: str):
        self.threshold = RATINGS.index(threshold)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ratings = [read_rating(c) for c in batch.column("completion").to_pylist()]
        finish = batch.column("finish_reason").to_pylist()
        reasons, details = [], []
        for rating, completion, why in zip(ratings, batch.column("completion").to_pylist(), finish):
            if rating is None:
                cut = " (cut off at max_tokens)" if why == "length" else ""
                reasons.append("unrated")
                details.append(f"no rating in the judge's answer{cut}: {completion[:80]!r}")
            elif RATINGS.index(rating) < self.threshold:
                reasons.append("below_threshold")
                details.append(f"rated {rating}, below {RATINGS[self.threshold]}")
            else:
                reasons.append(None)
                details.append(None)
        drop = [PROMPT, "choice", "completion", "finish_reason", "prompt_tokens", "completion_tokens"]
        batch = batch.drop_columns([c for c in drop if c in batch.column_names])
        columns = {"judge_rating": pa.array(ratings, pa.string()),
                   "judge_score": pa.array([None if r is None else RATINGS.index(r) + 1 for r in ratings], pa.int8()),
                   DROP_REASON: pa.array(reasons, pa.string()), DROP_DETAIL: pa.array(details, pa.string())}
        for name, values in columns.items():
            if name in batch.column_names:  # samples judged before: the new rating replaces the old
                batch = batch.drop_columns([name])
            batch = batch.append_column(name, values)
        return batch


def run_judge(cfg: JudgeConfig, stage: StageDir, upstream: str | None = None,
              references: References | None = None) -> dict:
    clock = StageClock()
    template = prepare(cfg)
    pool = EnginePool.plan(cfg, "judge")
    parts = stage.child(QUARANTINE_PARTS)
    spec = CorpusSpec(cfg.input or [upstream], cfg.text_field, cfg.id_field)
    rows = read_corpus(spec, num_cpus=READ_TASK_CPUS, quarantine_dir=parts, rows_per_block=pool.rows_per_block) \
        .map_batches(JudgePrompts(template, cfg), batch_format="pyarrow", batch_size=None, num_cpus=READ_TASK_CPUS)
    judged = pool.generate(rows, judge_params(cfg), PROMPT, parts, "judge", chat=True,
                           system_prompt=cfg.system_prompt) \
        .map_batches(ApplyThreshold(cfg.threshold), batch_format="pyarrow")
    kept, dropped, quarantined, rows_in, ids_renamed = finish_outcomes(judged, stage, "samples", cfg.id_field)
    judging = clock.seconds()
    ratings = _rating_counts(stage)
    refs = references_of(cfg, references)
    reference_texts = load_reference_texts(refs, "judge.references") if refs else None
    diversity, diversity_lines = kept_diversity(stage, cfg.text_field, reference_texts, cfg.diversity)
    report = {
        "stage": "judge", "rows_in": rows_in, "rows_out": kept, "rows_quarantined": quarantined,
        "rows_filtered": {"below_threshold": dropped.get("below_threshold", 0), "unrated": dropped.get("unrated", 0)},
        "ids_made_unique": ids_renamed,
        "acceptance_rate": acceptance_rate(kept, rows_in), "threshold": cfg.threshold, "ratings": ratings,
        "model": cfg.model, "engine": cfg.engine, "diversity": diversity,
        "samples_per_second": round(rows_in / max(judging, 1e-9), 2), **clock.timings(),
        "outputs": {"data": stage.child("data"), "dropped": stage.child("dropped"),
                    "quarantine": stage.child("quarantine.jsonl")},
    }
    stage.write_bytes("ratings.png", ratings_png(ratings, cfg.threshold))
    write_report(stage, report, "\n".join([
        "# judge — LLM ratings", "", markdown_table(outcome_rows(report) + [
            ("threshold", cfg.threshold),
            ("ratings", ", ".join(f"{k}: {v:,}" for k, v in ratings.items())),
            ("model", f"{cfg.model} ({cfg.engine})"), ("samples / second", report["samples_per_second"]),
            ("seconds", report["seconds"])]), "", "![ratings](ratings.png)", "", *diversity_lines, ""]))
    return report


def _rating_counts(stage: StageDir) -> dict[str, int]:
    counts = {r: 0 for r in (*RATINGS, None)}
    for folder in ("data", "dropped"):
        for rating, n in value_counts(stage.child(folder), "judge_rating").items():
            counts[rating] += n
    return {("unrated" if k is None else k): v for k, v in counts.items()}


def ratings_png(ratings: dict[str, int], threshold: str) -> bytes:
    names = list(ratings)
    kept = [n in RATINGS and RATINGS.index(n) >= RATINGS.index(threshold) for n in names]
    fig, ax = _pyplot().subplots(figsize=(6.5, 3.2), dpi=110)
    ax.bar(names, [ratings[n] for n in names], color=["tab:green" if k else "tab:gray" for k in kept])
    ax.set_ylabel("samples")
    ax.set_title(f"judge ratings (kept: {threshold} and above, in green)")
    return _png(fig)


def _judge_context(recipe) -> dict:
    """What the judge reads when its section names no input (this run's qc output, else its synthesize output)
    and the references of its diversity report when it names none (synthesize's)."""
    from .synthesize import default_references

    before = "qc" if recipe.qc is not None else "synthesize"
    references = default_references(recipe.synthesize) if recipe.synthesize is not None else None
    return {"upstream": paths.join(recipe.run_dir, before, "data"), "references": references}


class Judge(Stage):
    name, config, report = "judge", JudgeConfig, OutcomeReport
    help = "The LLM judge: each sample rated on DOMINO's five levels; those rated at least the threshold are kept."

    def check_recipe(self, cfg: JudgeConfig, recipe) -> None:
        if cfg.input is None and recipe.synthesize is None and recipe.qc is None:
            raise ValueError("judge.input: required unless the recipe has a synthesize or qc section")

    def preflight(self, cfg: JudgeConfig, recipe) -> None:
        check_model("judge.model", cfg.model)
        if cfg.input is not None:
            check_inputs("judge.input", cfg.input)
        prepare(cfg)

    def upstream(self, cfg: JudgeConfig, recipe) -> dict[str, str]:
        return {} if cfg.input else {"judge.input": _judge_context(recipe)["upstream"]}

    def run(self, cfg: JudgeConfig, stage: StageDir, recipe) -> dict:
        return run_judge(cfg, stage, **_judge_context(recipe))

    def summary(self, r: OutcomeReport) -> str:
        return outcome_summary("judge", r)
