"""DiagnosticSLM's preference data, made from the model being aligned: for each prompt, ``responses`` answers sampled
from the model (``preference.model`` unless ``sample.model`` names another), then each answer rated against its
prompt by the LLM judge on DOMINO's five levels (the recipe's judge, unless ``sample.judge_model`` names another).
``preference`` builds its chosen/rejected pairs from these ratings, as from a ratings file.

Both passes run on engine pools over Ray Data (``synthesis.generate.EnginePool``): the sampled answers are written to
``sampled/<fingerprint>/responses``, their ratings to ``sampled/<fingerprint>/rated`` with ``summary.json`` last, so
that a rerun after an interrupted training reuses them instead of sampling again (other settings or prompts sample
afresh).
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa
from pydantic import Field

from ...actors.engines import SamplingParams
from .. import paths
from ..corpus import READ_TASK_CPUS, CorpusSpec, drop_internal_columns, read_corpus, without_operator_reservations
from ..rundir import QUARANTINE_PARTS, StageDir, StageError, gather_quarantine
from ..schema import IdField, InputPath, InputPaths, ModelRef
from ..stage import progress
from ..synthesis.generate import EnginePool, EnginePoolConfig
from ..synthesis.judge import PROMPT as JUDGE_PROMPT
from ..synthesis.judge import ApplyThreshold, JudgeConfig, judge_params
from ..synthesis.prompts import PromptTemplate, check_renders, load_template

SAMPLED_DIR, SUMMARY = "sampled", "summary.json"
RESPONSE = "response"  # the sampled answer's column (the judge's own generation writes "completion")
TEMPLATE_VARIABLES, REQUIRED_VARIABLES = {"prompt", "response", "row"}, {"prompt", "response"}


class ResponseSampling(EnginePoolConfig):
    """Several answers per prompt sampled from the model being aligned, each rated by the LLM judge: the preference
    data of DiagnosticSLM's DPO step. The pool settings (engine, batch_size, concurrency, num_cpus, ...) are the
    sampler's."""
    model: Optional[ModelRef] = Field(None, description="The model that answers; null = preference.model (the "
                                                        "policy being aligned).")
    prompts: Optional[InputPaths] = Field(None, description="Prompts (JSONL/Parquet); null = the samples finetune "
                                                          "reads (this run's judge, else qc, else synthesize output).")
    prompt_field: Optional[str] = Field(None, description="The field holding a prompt; null = finetune's (input when "
                                                          "the recipe synthesizes with domino, else instruction).")
    id_field: IdField = "id"
    responses: int = Field(4, ge=2, le=32, description="Answers sampled per prompt (each one rated).")
    max_prompts: Optional[int] = Field(None, gt=0, description="Use at most this many prompts (the first ones).")
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(temperature=1.0, top_p=0.95,
                                                                            max_tokens=256),
                                     description="How answers are sampled (n is set by responses).")
    judge_model: Optional[ModelRef] = Field(None, description="The judge; null = the recipe's judge section (its "
                                                              "model and pool), else the sampler's model and pool.")
    judge_template: Optional[InputPath] = Field(None, description="A Jinja2 template (prompt, response, row) "
                                                                  "replacing the default rating prompt.")
    judge_max_tokens: int = Field(32, gt=0, description="Tokens for the rating's JSON.")


def sampling_prompts(sample: ResponseSampling, recipe) -> Optional[list[str]]:
    from .finetune import upstream_samples

    if sample.prompts is not None:
        return sample.prompts
    upstream = upstream_samples(recipe)
    return [upstream] if upstream else None


def prompt_field(sample: ResponseSampling, recipe) -> str:
    if sample.prompt_field:
        return sample.prompt_field
    synth = recipe.synthesize
    return "input" if synth is not None and synth.method == "domino" else "instruction"


def judge_template(sample: ResponseSampling) -> PromptTemplate:
    template = load_template(sample.judge_template, "judge_response", "preference.sample.judge_template",
                             TEMPLATE_VARIABLES, REQUIRED_VARIABLES)
    check_renders(template, "preference.sample.judge_template", prompt="A question?", response="An answer.",
                  row={"prompt": "A question?"})
    return template


def judge_config(sample: ResponseSampling, sampler: EnginePoolConfig, recipe) -> JudgeConfig:
    """The judge's model and pool: ``judge_model`` on the sampler's pool settings, else the recipe's judge section,
    else the sampler itself."""
    if sample.judge_model is None and recipe.judge is not None:
        return recipe.judge.model_copy(update={"max_tokens": sample.judge_max_tokens})
    pool = sampler.model_dump(exclude={"model"})
    return JudgeConfig(model=sample.judge_model or sampler.model, max_tokens=sample.judge_max_tokens, **pool)


class AsResponses:
    """Ray Data batch function: the sampler's output as answers to rate — the completion renamed ``response`` (and
    its bookkeeping ``response_*``), each answer's id its prompt's id and its choice."""

    def __init__(self, id_field: str):
        self.id_field = id_field

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = {"completion": RESPONSE, "choice": "response_choice", "finish_reason": "response_finish_reason",
                 "prompt_tokens": "response_prompt_tokens", "completion_tokens": "response_tokens"}
        ids = [f"{i}#{c}" for i, c in zip(batch.column(self.id_field).to_pylist(),
                                          batch.column("choice").to_pylist())]
        batch = batch.rename_columns([names.get(c, c) for c in batch.column_names])
        return batch.set_column(batch.column_names.index(self.id_field), self.id_field, pa.array(ids, pa.string()))


class JudgeResponsePrompts:
    """Ray Data batch function: each answer gains the prompt that asks the judge to rate it against its prompt."""

    def __init__(self, template: PromptTemplate, prompt_field: str, max_chars: int):
        self.template, self.prompt_field, self.max_chars = template, prompt_field, max_chars

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        prompts = [self.template.render(prompt=r[self.prompt_field][:self.max_chars],
                                        response=r[RESPONSE][:self.max_chars],
                                        row={k: v for k, v in r.items() if not k.startswith("_")}) for r in rows]
        return batch.append_column(JUDGE_PROMPT, pa.array(prompts, pa.string()))


def sample_and_rate(sample: ResponseSampling, model: str, system_prompt: Optional[str], recipe, stage: StageDir,
                    fingerprint: str) -> dict:
    """Sample (with the system message DPO will train with) and rate, or reuse what an earlier attempt with the same
    settings finished; the summary: where the rated answers are, the prompt field, counts and the rows quarantined on
    the way."""
    from .softprompt import _forget_other_runs

    _forget_other_runs(stage, fingerprint, SAMPLED_DIR)
    folder = StageDir(stage.child(SAMPLED_DIR, fingerprint))
    summary = folder.read_json(SUMMARY)
    if summary is not None:
        progress(f"[preference] rated answers of an earlier attempt reused: {folder.uri}")
        return summary
    folder.clear()
    field = prompt_field(sample, recipe)
    sampler = EnginePoolConfig(**{**sample.model_dump(include=set(EnginePoolConfig.model_fields)),
                                  "model": sample.model or model})
    judge = judge_config(sample, sampler, recipe)
    template = judge_template(sample)
    parts = stage.child(QUARANTINE_PARTS)

    # 1. Answers: every prompt ``responses`` times, sampled.
    pool = EnginePool.plan(sampler, "preference.sample")
    prompts = read_corpus(CorpusSpec(sampling_prompts(sample, recipe), field, sample.id_field),
                          num_cpus=READ_TASK_CPUS, quarantine_dir=parts, rows_per_block=pool.rows_per_block)
    if sample.max_prompts is not None:
        prompts = prompts.limit(sample.max_prompts)
    params = sample.sampling.model_copy(update={"n": sample.responses})
    answers = pool.generate(prompts, params, field, parts, "sample", chat=True, system_prompt=system_prompt) \
        .map_batches(AsResponses(sample.id_field), batch_format="pyarrow") \
        .map_batches(drop_internal_columns, batch_format="pyarrow", batch_size=None)
    with without_operator_reservations():
        answers.write_parquet(folder.child("responses"))
    sampled_quarantine = [{"input": "prompts", **r} for r in gather_quarantine(stage, "prompts")]
    progress(f"[preference] {sample.responses} answers sampled per prompt from {sampler.model}; rating them with "
             f"{judge.model}")

    # 2. Ratings: each answer against its prompt, by the judge (structured JSON, temperature 0).
    pool = EnginePool.plan(judge, "preference.sample.judge")
    answers = read_corpus(CorpusSpec([folder.child("responses")], RESPONSE, sample.id_field),
                          num_cpus=READ_TASK_CPUS, quarantine_dir=parts, rows_per_block=pool.rows_per_block) \
        .map_batches(JudgeResponsePrompts(template, field, judge.max_sample_chars), batch_format="pyarrow",
                     batch_size=None, num_cpus=READ_TASK_CPUS)
    rated = pool.generate(answers, judge_params(judge), JUDGE_PROMPT, parts, "judge", chat=True,
                          system_prompt=judge.system_prompt) \
        .map_batches(ApplyThreshold(RATINGS_ALL), batch_format="pyarrow") \
        .map_batches(drop_internal_columns, batch_format="pyarrow", batch_size=None)
    with without_operator_reservations():
        rated.write_parquet(folder.child("rated"))
    rated_quarantine = [{"input": "answers", **r} for r in gather_quarantine(stage, "answers")]
    summary = {"rated": folder.child("rated"), "prompt_field": field, "sampler": sampler.model,
               "judge": judge.model, "responses_per_prompt": sample.responses,
               "quarantined": sampled_quarantine + rated_quarantine}
    folder.write_json(SUMMARY, summary)
    return summary


RATINGS_ALL = "very poor"  # the threshold that keeps every rated answer: pairs need the low ones too


def check_sampling(sample: ResponseSampling, recipe) -> None:
    """Before any work: prompts to sample from, and a judge template that renders."""
    if sampling_prompts(sample, recipe) is None:
        raise ValueError("preference.sample.prompts: required unless the recipe has a synthesize, qc or judge "
                         "section whose samples give the prompts")
    judge_template(sample)


def empty_result_error(counts: dict, summary: dict) -> StageError:
    return StageError(f"preference.sample: {counts['train']} training pair(s) from the answers in "
                      f"{paths.parent(summary['rated'])} (no prompt had answers rated at least min_margin apart: "
                      f"sample more responses, or lower min_margin)")
