"""Batch generation on Ray Data, the engine room of every synthesis stage: prompts are read in small blocks and
handed to an autoscaling pool of engine actors (``concurrency: [min, max]``); each prompt gives ``sampling.n`` rows
in ``generate/data/*.parquet`` (its input fields plus ``choice``, ``completion``, ``finish_reason`` and token
counts). Rows that cannot be read or generated go to ``quarantine.jsonl`` with file, line and reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import numpy as np
import pyarrow.dataset as pads
from pydantic import ByteSize, Field, ValidationError, field_validator
from ray.data import ActorPoolStrategy, Dataset

from ...actors.engines import ENGINE_KINDS, SamplingParams
from ...actors.generation import GenerateBatch
from .. import corpus
from ..corpus import (READ_TASK_CPUS, CorpusSpec, drop_internal_columns, read_corpus, reading_cpus,
                      without_operator_reservations)
from ..report import markdown_table, token_histogram_png, write_report
from ..resources import cluster_cpus, cluster_gpus, retry_limits_allowed
from ..rundir import QUARANTINE_PARTS, StageDir, StageError, gather_quarantine, write_quarantine_part
from ..schema import IdField, InputPath, InputPaths, ModelRef, Strict
from ..stage import Stage, StageClock, StageReport, check_inputs, check_model, check_soft_prompt
from ..unique_ids import make_ids_unique

EngineKind = Literal[ENGINE_KINDS]


class EnginePoolConfig(Strict):
    """The LLM and the Ray Data pool of engine actors that runs it (generate, synthesize, judge)."""
    model: ModelRef = Field(description="Hugging Face id or folder of a causal LM.")
    engine: EngineKind = Field("transformers", description="transformers (CPU or GPU) or vllm (GPU).")
    engine_options: dict[str, Any] = Field(default_factory=dict, description="Passed to the engine's constructor "
                                           "(transformers: dtype, device; vllm: max_model_len, dtype, ...).")
    batch_size: int = Field(8, gt=0, description="Prompts per engine call.")
    concurrency: Union[int, tuple[int, int], None] = Field(
        None, description="Engine actors: a number, or [min, max] to autoscale; null = [1, as many as fit].")
    num_cpus: Optional[float] = Field(None, gt=0, description="CPUs per engine actor (torch threads on CPU); null = "
                                                              "one actor per CPU sharing them (1 per GPU actor).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per engine actor.")
    memory: Optional[ByteSize] = Field(None, description="Host memory Ray reserves for each engine actor (bytes, or "
                                                         "a size such as 2GiB): actors are placed where it fits, "
                                                         "and Ray Data stops warning that the pool asks for none. "
                                                         "null = none reserved.")

    @field_validator("concurrency")
    @classmethod
    def _pool_size(cls, value):
        low, high = (value, value) if isinstance(value, int) else (value or (1, 1))
        if low < 1 or high < low:
            raise ValueError("expected a number >= 1, or [min, max] with 1 <= min <= max")
        return value


class GenerateConfig(EnginePoolConfig):
    """Batch generation over Ray Data: one row per completion, from a file of prompts."""
    prompts: InputPaths = Field(description="Prompts (JSONL/Parquet), one per row.")
    prompt_field: str = Field("prompt", description="Field holding the prompt.")
    id_field: IdField = "id"
    chat: bool = Field(False, description="Send each prompt as a user message through the model's chat template.")
    system_prompt: Optional[str] = Field(None, description="chat: a system message before each prompt.")
    soft_prompt: Optional[InputPath] = Field(None, description="A soft prompt placed before every prompt (PEFT "
                                                         "prompt-tuning folder, .safetensors or .npy).")
    sampling: SamplingParams = SamplingParams()


# ------------------------------------------------------------------------------------------- synthesis and judging
def sampling_overrides(value: dict, defaults: dict) -> SamplingParams:
    try:
        return SamplingParams.model_validate({**defaults, **value})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(problems) from None


class GenerateError(StageError):
    """The generate stage cannot run as configured; the message names the field."""


def engine_pool(cfg: EnginePoolConfig, cpus: int, gpus: float, section: str = "generate") -> tuple[int, int, float]:
    """(min actors, max actors, CPUs per actor): as configured, else autoscale from one to as many as the cluster
    holds. On CPUs the default is one single-threaded engine per CPU, sharing what the read task leaves (as for
    embedding: several small torch processes decode faster than one multi-threaded one)."""
    reserved, _ = reading_cpus(cpus)
    if cfg.num_gpus:
        per_actor = cfg.num_cpus or 1.0
        fits = int(gpus // cfg.num_gpus)
        what = f"{gpus:g} GPUs for {cfg.num_gpus:g} per actor"
    elif cfg.num_cpus is None:
        fits, per_actor = cpus, (cpus - reserved) / cpus
        what = f"{cpus} CPUs (less {reserved:g} for reading)"
    else:
        per_actor = cfg.num_cpus
        fits = int((cpus - reserved) // per_actor)
        what = f"{cpus} CPUs (less {reserved:g} for reading) for {per_actor:g} per actor"
    if fits < 1:
        raise GenerateError(f"{section}.num_cpus/num_gpus: no engine actor fits: {what}")
    if cfg.concurrency is None:
        return 1, fits, per_actor
    low, high = (cfg.concurrency, cfg.concurrency) if isinstance(cfg.concurrency, int) else cfg.concurrency
    if low > fits:
        raise GenerateError(f"{section}.concurrency: at least {low} actors asked, {fits} fit ({what})")
    return low, high, per_actor


class QuarantineFailedRows:
    """Where engine actors put rows they could not generate: one part per row, named by its place in the input, so
    that a batch run again (after an actor died) rewrites the same parts instead of adding copies."""

    def __init__(self, parts_uri: str, name: str = "generate"):
        self.parts_uri, self.name = parts_uri, name

    def __call__(self, rows: list[dict]) -> None:
        for row in rows:
            write_quarantine_part(self.parts_uri, f"{self.name}-{row[corpus.ORDER]:020d}.jsonl", [{
                "file": row[corpus.SOURCE_FILE], "line": row[corpus.SOURCE_LINE], "reason": row["reason"],
                "raw": row["prompt"]}])


ENGINE_RESTARTS = 3


@dataclass(frozen=True)
class EnginePool:
    """A sized pool of engine actors: what ``engine_pool`` decided, and whether reads are cut into small blocks."""
    cfg: EnginePoolConfig
    low: int
    high: int
    cpus_per_actor: float
    cut_blocks: bool

    @classmethod
    def plan(cls, cfg: EnginePoolConfig, section: str = "generate") -> "EnginePool":
        cpus = cluster_cpus()
        low, high, per_actor = engine_pool(cfg, cpus, cluster_gpus(), section)
        return cls(cfg, low, high, per_actor, reading_cpus(cpus)[1])

    @property
    def rows_per_block(self) -> int | None:
        """Blocks of one engine call each, so that every actor of the pool gets work (Ray Data hands out whole
        blocks); with one CPU there is one actor, and no cutting."""
        return self.cfg.batch_size if self.cut_blocks else None

    def generate(self, rows: Dataset, params: SamplingParams, prompt_field: str, parts_uri: str,
                 quarantine_name: str = "generate", chat: bool = False, system_prompt: str | None = None,
                 soft_prompt: str | None = None, schema_column: str | None = None,
                 seed_column: str | None = None) -> Dataset:
        """``rows`` (with provenance columns) through the pool: one row per completion, with GenerateBatch's
        columns; rows that cannot be generated go to ``parts_uri`` as quarantine parts."""
        cfg = self.cfg
        engine_options = dict(cfg.engine_options)
        if cfg.engine == "transformers" and not cfg.num_gpus:
            # torch threads are what the actor asked for, rounded, at least one: a 0.375-CPU actor uses a core.
            engine_options.setdefault("torch_threads", max(1, round(self.cpus_per_actor)))
        with retry_limits_allowed():
            return rows.map_batches(
                GenerateBatch,
                fn_constructor_kwargs={
                    "model": cfg.model, "engine": cfg.engine, "engine_options": engine_options,
                    "params": params.model_dump(), "prompt_field": prompt_field, "chat": chat,
                    "system_prompt": system_prompt, "soft_prompt": soft_prompt,
                    "on_failure": QuarantineFailedRows(parts_uri, quarantine_name),
                    "failure_columns": (corpus.SOURCE_FILE, corpus.SOURCE_LINE, corpus.ORDER),
                    "schema_column": schema_column, "seed_column": seed_column},
                # Unset concurrency: start with every actor that fits now (they are free: a ramp from one would leave
                # them idle while the first works); a set [min, max] starts at min.
                compute=ActorPoolStrategy(min_size=self.low, max_size=self.high,
                                          initial_size=self.high if cfg.concurrency is None else self.low),
                num_cpus=self.cpus_per_actor, num_gpus=cfg.num_gpus or None,
                **({"memory": int(cfg.memory)} if cfg.memory else {}),
                # An actor that dies is restarted and its batch retried, but not forever (Ray Data's default): one that
                # keeps dying (out of memory, a crashing device) fails the stage, naming the cause.
                max_restarts=ENGINE_RESTARTS, max_task_retries=ENGINE_RESTARTS,
                batch_size=cfg.batch_size, batch_format="pyarrow")


def run_generate(cfg: GenerateConfig, stage: StageDir) -> dict:
    clock = StageClock()
    pool = EnginePool.plan(cfg)
    low, high, cpus_per_actor = pool.low, pool.high, pool.cpus_per_actor
    spec = CorpusSpec(cfg.prompts, cfg.prompt_field, cfg.id_field)
    data_uri, parts_uri = stage.child("data"), stage.child(QUARANTINE_PARTS)
    prompts = read_corpus(spec, num_cpus=READ_TASK_CPUS, quarantine_dir=parts_uri, rows_per_block=pool.rows_per_block)
    completions = (pool.generate(prompts, cfg.sampling, cfg.prompt_field, parts_uri, chat=cfg.chat,
                                 system_prompt=cfg.system_prompt, soft_prompt=cfg.soft_prompt)
                   .map_batches(drop_internal_columns, batch_format="pyarrow", batch_size=None))
    with without_operator_reservations():  # per-operator reservations would hold the engine pool to a share of the CPUs
        completions.write_parquet(data_uri)
    seconds_generating = clock.seconds()
    ids_renamed = make_ids_unique([data_uri], cfg.id_field)

    failed = gather_quarantine(stage, "prompts")
    fs, path = StageDir(data_uri).fs_path
    try:
        written = pads.dataset(path, filesystem=fs, format="parquet").to_table(
            columns=[cfg.id_field, "finish_reason", "completion_tokens"])
    except (FileNotFoundError, KeyError):
        written = None
    completions = 0 if written is None else written.num_rows
    tokens = np.zeros(0, np.int64) if written is None else written.column("completion_tokens").to_numpy()
    finish = {} if written is None else {
        reason: int(count) for reason, count in
        zip(*np.unique(written.column("finish_reason").to_numpy(zero_copy_only=False), return_counts=True))}
    prompts_out = completions // cfg.sampling.n
    if len(tokens):
        stage.write_bytes("completion_tokens.png", token_histogram_png(tokens, cfg.sampling.max_tokens))
    report = {
        "stage": "generate", "rows_in": prompts_out + len(failed), "rows_out": prompts_out,
        "rows_quarantined": len(failed), "rows_filtered": {}, "ids_made_unique": ids_renamed, "completions": completions,
        "completion_tokens": int(tokens.sum()), "finish_reasons": finish, "model": cfg.model, "engine": cfg.engine,
        "soft_prompt": cfg.soft_prompt, "sampling": cfg.sampling.model_dump(exclude_none=True),
        "actors": {"min": low, "max": high}, "cpus_per_actor": round(cpus_per_actor, 3), "gpus_per_actor": cfg.num_gpus,
        "tokens_per_second": round(float(tokens.sum()) / max(seconds_generating, 1e-9), 1),
        **clock.timings(),
        "outputs": {"data": data_uri, "quarantine": stage.child("quarantine.jsonl")},
    }
    write_report(stage, report, "\n".join([
        "# generate — batch generation", "",
        markdown_table([
            ("prompts in", report["rows_in"]), ("prompts answered", prompts_out), ("completions", completions),
            ("quarantined (see quarantine.jsonl)", len(failed)), ("ids made unique (ID#k)", ids_renamed),
            ("completion tokens", report["completion_tokens"]),
            ("finish reasons", ", ".join(f"{k}: {v:,}" for k, v in finish.items()) or "-"),
            ("model", f"{cfg.model} ({cfg.engine})"), ("engine actors (min / max)", f"{low} / {high}"),
            ("tokens / second", report["tokens_per_second"]), ("seconds", report["seconds"])]), "",
        "![completion lengths](completion_tokens.png)" if len(tokens) else "", ""]))
    return report



class GenerateReport(StageReport):
    completions: int
    completion_tokens: int
    tokens_per_second: float


class Generate(Stage):
    name, config, report = "generate", GenerateConfig, GenerateReport
    help = "Batch generation: completions for a file of prompts on an autoscaling pool of engines."

    def preflight(self, cfg: GenerateConfig, recipe) -> None:
        check_model("generate.model", cfg.model)
        check_inputs("generate.prompts", cfg.prompts)
        check_soft_prompt("generate.soft_prompt", cfg.soft_prompt)

    def run(self, cfg: GenerateConfig, stage: StageDir, recipe) -> dict:
        return run_generate(cfg, stage)

    def summary(self, r: GenerateReport) -> str:
        return (f"generate: {r.completions:,} completions for {r.rows_out:,} of {r.rows_in:,} prompts "
                f"({r.completion_tokens:,} tokens, {r.tokens_per_second:,.0f} tokens/s); quarantined "
                f"{r.rows_quarantined:,}")
