"""The recipe: one YAML file per run, validated with pydantic before any work starts.

Relative input paths are resolved against the recipe file's folder; ``run_dir`` is resolved against the current
directory. ``--set key=value`` overrides any field (dotted keys; values parsed as YAML scalars).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Annotated, Any, Callable, Literal, Optional, Union

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from ..actors.engines import ENGINE_KINDS, SamplingParams
from ..actors.openai_api import RequestLimits
from .paths import is_uri


class RecipeError(ValueError):
    """A recipe or a CLI override is invalid; the message names the file, the field and what was expected."""


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


PathList = Annotated[list[str], BeforeValidator(_as_list), Field(min_length=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Strict):
    address: Optional[str] = Field(None, description="Ray cluster address ('auto', 'ray://host:10001'); "
                                                     "null starts an embedded local Ray.")
    num_cpus: Optional[int] = Field(None, gt=0, description="CPUs of the embedded local Ray; null = what Ray detects "
                                                        "(a container's CPU quota, not the host's cores).")


class FastTextConfig(Strict):
    epoch: int = Field(5, gt=0)
    lr: float = Field(0.1, gt=0)
    word_ngrams: int = Field(2, ge=1, le=5)
    dim: int = Field(32, gt=0)
    bucket: int = Field(262_144, gt=0)
    min_count: int = Field(2, ge=1)
    balance_classes: bool = True
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 13
    threads: int = Field(1, ge=1, description="Training threads; 1 keeps training reproducible (fastText's "
                                              "multi-threaded SGD is not).")


class QualityConfig(Strict):
    scorer: str = Field("heuristic", description="'heuristic', 'none', or 'hf:MODEL' (Hugging Face id or path).")
    min_score: float = Field(0.8, ge=0, le=1, description="Keep documents whose quality_score is at least this.")
    max_length: int = Field(512, gt=0, description="hf: tokens per document.")
    max_score: float = Field(5.0, gt=0, description="hf regression heads: the grade that maps to 1.0.")
    batch_size: int = Field(32, gt=0, description="hf: documents per forward pass.")
    num_gpus: float = Field(0.0, ge=0, description="hf: GPUs per scoring actor.")
    concurrency: int = Field(1, gt=0, description="hf: scoring actors.")

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, value: str) -> str:
        if value in ("heuristic", "none") or (value.startswith("hf:") and len(value) > 3):
            return value
        raise ValueError(f"expected 'heuristic', 'none' or 'hf:MODEL', got {value!r}")


class SelectConfig(Strict):
    in_domain: PathList = Field(description="The small in-domain set (JSONL/Parquet): the classifier's positives.")
    corpus: PathList = Field(description="The general corpus: files, directories or globs, local or URIs.")
    text_field: str = "text"
    in_domain_text_field: Optional[str] = Field(None, description="Text field of the in-domain file; "
                                                                  "null = text_field.")
    id_field: str = "id"
    negatives: Optional[PathList] = Field(None, description="General-text negatives; null = sample the corpus.")
    negatives_sample: int = Field(20_000, gt=0, description="How many negatives to train on.")
    classifier: Optional[str] = Field(None, description="A trained fastText model to reuse instead of training.")
    keep_fraction: Optional[float] = Field(None, gt=0, le=1, description="Keep this top fraction by domain score.")
    threshold: Optional[float] = Field(None, ge=0, le=1, description="Keep domain_score >= threshold "
                                                                     "(default 0.5 when keep_fraction is unset).")
    dedup: bool = Field(True, description="Drop exact duplicates (normalised text hash) among kept documents.")
    batch_size: int = Field(1024, gt=0, description="Documents per scoring batch.")
    scorer_concurrency: Optional[int] = Field(None, gt=0, description="fastText scoring actors; null = one per CPU.")
    fasttext: FastTextConfig = FastTextConfig()
    quality: QualityConfig = QualityConfig()

    @model_validator(mode="after")
    def _one_selection_rule(self) -> "SelectConfig":
        if self.keep_fraction is not None and self.threshold is not None:
            raise ValueError("set keep_fraction or threshold, not both")
        return self

    @property
    def effective_threshold(self) -> Optional[float]:
        if self.keep_fraction is not None:
            return None
        return 0.5 if self.threshold is None else self.threshold


class EmbedConfig(Strict):
    corpus: Optional[PathList] = Field(None, description="Documents to embed: files, directories or globs, local "
                                                         "or URIs; null = this run's select output.")
    text_field: str = "text"
    id_field: str = "id"
    model: str = Field("all-MiniLM-L6-v2", description="sentence-transformers id or path (default bundled).")
    batch_size: int = Field(64, gt=0, description="Texts per forward pass.")
    max_seq_length: Optional[int] = Field(256, gt=0, description="Tokens per text; null = the model's own.")
    num_cpus: Optional[float] = Field(None, gt=0, description="CPUs per embedding actor (torch threads); null = "
                                                              "the cluster's CPUs shared out over the actors.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per embedding actor (GPU clusters).")
    concurrency: Optional[int] = Field(None, gt=0, description="Embedding actors; null = one per CPU (per GPU "
                                                               "when num_gpus is set).")


class IndexConfig(Strict):
    kind: Literal["auto", "flat", "ivf", "ivfpq", "hnsw"] = Field(
        "auto", description="auto = exact 'flat' up to exact_max_rows vectors, 'ivf' above.")
    exact_max_rows: int = Field(200_000, gt=0, description="auto: the largest corpus searched exactly.")
    nlist: Optional[int] = Field(None, gt=0, description="IVF cells; null = a power of two near 4*sqrt(rows).")
    nprobe: Optional[int] = Field(None, gt=0, description="IVF cells searched per query; null = the fewest that "
                                                          "reach target_recall (measured at build time).")
    target_recall: float = Field(0.99, gt=0, le=1, description="IVF with nprobe unset: recall@10 against exact "
                                                               "search that the chosen nprobe must reach.")
    calibration_queries: int = Field(256, gt=0, description="Corpus vectors used as queries to measure recall.")
    pq_m: int = Field(48, gt=0, description="ivfpq: sub-quantizers (must divide the dimension); 8 bits each.")
    hnsw_m: int = Field(32, gt=0, description="hnsw: graph neighbours per vector.")
    ef_construction: int = Field(80, gt=0, description="hnsw: build-time search depth.")
    ef_search: int = Field(128, gt=0, description="hnsw: query-time search depth.")
    train_rows: int = Field(100_000, gt=0, description="IVF: vectors sampled (over all shards) to train on.")
    gpu: Optional[bool] = Field(None, description="Build and search on GPUs with faiss-gpu; null = when faiss "
                                                  "sees one (flat and IVF kinds; HNSW stays on CPU).")
    num_cpus: Optional[int] = Field(None, gt=0, description="CPUs (faiss threads) of the build and search task; "
                                                            "null = the largest node's.")
    seed: int = 0


class RetrieveConfig(Strict):
    few_shots: PathList = Field(description="The task's few-shot examples (JSONL; CRAFT's Text/Instruction/Output "
                                            "format works as is).")
    few_shot_field: Optional[str] = Field(None, description="Few-shot field to embed; null = 'text', else 'Text'.")
    top_k: int = Field(1000, gt=0, description="Documents to return.")
    per_few_shot_fraction: float = Field(0.5, ge=0, le=1, description="Share of top_k filled from each "
                                         "few-shot's own top hits (the rest: by mean similarity to all few-shots).")
    overfetch: float = Field(0.2, ge=0, description="Fetch this much more than needed, to absorb duplicates.")
    near_duplicate_similarity: float = Field(0.95, gt=0, le=1, description="Hits at least this similar (cosine) "
                                             "to a better hit are duplicates and dropped.")
    index: Optional[str] = Field(None, description="The index step's folder; null = this run's index/.")
    map_sample: int = Field(2000, ge=0, description="Corpus vectors drawn for the report's embedding map.")
    num_cpus: Optional[int] = Field(None, gt=0, description="CPUs (threads) of the search actor; null = the "
                                                            "largest node's.")


EngineKind = Literal[ENGINE_KINDS]


class EnginePoolConfig(Strict):
    """The LLM and the Ray Data pool of engine actors that runs it (generate, synthesize, judge)."""
    model: str = Field(description="Hugging Face id or folder of a causal LM.")
    engine: EngineKind = "transformers"
    engine_options: dict[str, Any] = Field(default_factory=dict, description="Passed to the engine's constructor "
                                           "(transformers: dtype, device; vllm: max_model_len, dtype, ...).")
    batch_size: int = Field(8, gt=0, description="Prompts per engine call.")
    concurrency: Union[int, tuple[int, int], None] = Field(
        None, description="Engine actors: a number, or [min, max] to autoscale; null = [1, as many as fit].")
    num_cpus: Optional[float] = Field(None, gt=0, description="CPUs per engine actor (torch threads on CPU); null = "
                                                              "one actor per CPU sharing them (1 per GPU actor).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per engine actor.")

    @field_validator("concurrency")
    @classmethod
    def _pool_size(cls, value):
        low, high = (value, value) if isinstance(value, int) else (value or (1, 1))
        if low < 1 or high < low:
            raise ValueError("expected a number >= 1, or [min, max] with 1 <= min <= max")
        return value


class GenerateConfig(EnginePoolConfig):
    """Batch generation over Ray Data: one row per completion, from a file of prompts."""
    prompts: PathList = Field(description="Prompts (JSONL/Parquet), one per row.")
    prompt_field: str = "prompt"
    id_field: str = "id"
    chat: bool = Field(False, description="Send each prompt as a user message through the model's chat template.")
    system_prompt: Optional[str] = Field(None, description="chat: a system message before each prompt.")
    soft_prompt: Optional[str] = Field(None, description="A soft prompt placed before every prompt (PEFT "
                                                         "prompt-tuning folder, .safetensors or .npy).")
    sampling: SamplingParams = SamplingParams()


# ------------------------------------------------------------------------------------------- synthesis and judging
def _sampling_overrides(value: dict, defaults: dict) -> SamplingParams:
    try:
        return SamplingParams.model_validate({**defaults, **value})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(problems) from None


class CraftConfig(Strict):
    """CRAFT: each retrieved document, with few-shots sampled from the user's examples, becomes one task sample."""
    documents: Optional[PathList] = Field(None, description="Documents to rewrite (JSONL/Parquet); null = this "
                                                            "run's retrieve output.")
    document_field: str = "text"
    id_field: str = "id"
    few_shots: Optional[PathList] = Field(None, description="The task's examples (CRAFT's Text/Instruction/Output "
                                                            "JSONL); null = retrieve.few_shots.")
    few_shot_fields: dict[Literal["text", "instruction", "output"], str] = Field(
        default_factory=lambda: {"text": "Text", "instruction": "Instruction", "output": "Output"},
        description="Where each part of a few-shot is: its corpus-like text, instruction and output.")
    task: Literal["multiple_choice", "qa", "summarization"] = Field(
        "multiple_choice", description="The task type: sets the JSON asked for and how samples are validated.")
    shots_per_prompt: int = Field(3, gt=0, description="Few-shots sampled into each prompt (CRAFT: 3).")
    num_options: int = Field(4, ge=2, le=8, description="multiple_choice: options per question (answer A, B, ...).")
    max_document_chars: int = Field(4000, gt=0, description="A longer document (or few-shot text) is cut to this "
                                                            "in the prompt.")
    min_question_chars: int = Field(15, ge=1, description="multiple_choice and qa: shortest question kept.")
    min_answer_chars: int = Field(1, ge=1, description="qa: shortest answer kept.")
    min_source_chars: int = Field(200, ge=1, description="summarization: shortest source text kept.")
    min_summary_chars: int = Field(40, ge=1, description="summarization: shortest summary kept (and it must be "
                                                         "shorter than its source).")
    summary_instruction: str = Field("Write a TLDR for the following text.", description="summarization: the "
                                     "instruction written before each source text.")


class TraitConfig(Strict):
    """TRAIT: problems of different downstream tasks grouped by a shared entity or shared knowledge; one passage per
    group (the problems, a paragraph solving each, an enlightenment paragraph on what they share)."""
    examples: PathList = Field(description="Downstream-task problems (JSONL/Parquet), one per row.")
    problem_field: str = "question"
    answer_field: Optional[str] = Field("answer", description="Field with the reference answer; null = none.")
    task_field: Optional[str] = Field("task", description="Field naming each problem's task (a passage mixes "
                                                          "tasks); null = all one task.")
    id_field: str = "id"
    grouping: Literal["entity", "knowledge"] = Field(
        "knowledge", description="entity: problems sharing entity_field's value; knowledge: embedding neighbours.")
    entity_field: Optional[str] = Field(None, description="entity grouping: the field holding the shared entity.")
    group_size: int = Field(3, ge=2, le=8, description="Problems per passage (at most).")
    min_group_size: int = Field(2, ge=1, description="A group with fewer problems makes no passage.")
    min_similarity: float = Field(0.3, ge=-1, le=1, description="knowledge: cosine similarity a problem needs to "
                                                                "join a group.")
    embedding_model: str = Field("all-MiniLM-L6-v2", description="knowledge grouping and documents: "
                                                                 "sentence-transformers id or path.")
    documents: Optional[PathList] = Field(None, description="Optional reference documents (e.g. retrieve's output): "
                                                            "each group's prompt gets the closest one.")
    document_field: str = "text"
    max_document_chars: int = Field(2000, gt=0)
    max_problem_chars: int = Field(2000, gt=0, description="A longer problem is cut to this in the prompt.")
    min_solution_chars: int = Field(20, ge=1, description="Shortest solution paragraph kept.")
    min_enlightenment_chars: int = Field(40, ge=1, description="Shortest enlightenment paragraph kept.")

    @model_validator(mode="after")
    def _entity_needs_a_field(self) -> "TraitConfig":
        if self.grouping == "entity" and not self.entity_field:
            raise ValueError("grouping entity needs entity_field (the field holding the shared entity)")
        if self.min_group_size > self.group_size:
            raise ValueError(f"min_group_size ({self.min_group_size}) is above group_size ({self.group_size})")
        return self


class DominoConfig(Strict):
    """DOMINO: new inputs sampled from the domain soft prompt Z (nothing else in the prompt), optionally answered."""
    soft_prompt: str = Field(description="The domain soft prompt: [m, hidden] .safetensors, .npy or PEFT folder.")
    num_samples: int = Field(1000, gt=0, description="Inputs to sample (the authors: 40k-80k).")
    prompt: str = Field("", description="Text after the soft prompt (empty: sample from p(x | Z) alone).")
    min_input_chars: int = Field(20, ge=1, description="Shortest sampled input kept.")
    respond: bool = Field(False, description="Let the same LLM write each kept input's output (SFT pairs).")
    response_sampling: dict[str, Any] = Field(default_factory=dict, description="respond: sampling overrides "
                                              "(default greedy, max_tokens 1024).")

    @property
    def effective_response_sampling(self) -> SamplingParams:
        return _sampling_overrides(self.response_sampling, RESPONSE_SAMPLING)

    @field_validator("response_sampling")
    @classmethod
    def _valid_response_sampling(cls, value: dict) -> dict:
        _sampling_overrides(value, RESPONSE_SAMPLING)
        return value


METHOD_SAMPLING = {  # the papers' settings
    "craft": {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_tokens": 1024},
    "trait": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 2048},
    "domino": {"temperature": 0.8, "max_tokens": 1024},
}
RESPONSE_SAMPLING = {"temperature": 0.0, "max_tokens": 1024}


class DiversityConfig(Strict):
    """How reports measure the diversity of what is kept."""
    sample: int = Field(2000, ge=0, description="Rows (at most) embedded for the diversity measures; 0 = off.")
    model: str = Field("all-MiniLM-L6-v2", description="sentence-transformers id or path.")


class SynthesizeConfig(EnginePoolConfig):
    """The synthesis stage: one of the three methods, through the batch-generation engines."""
    method: Literal["craft", "trait", "domino"]
    template: Optional[str] = Field(None, description="A Jinja2 prompt template replacing the method's default "
                                                      "(pipelines/synthesis/templates/).")
    system_prompt: Optional[str] = Field(None, description="craft/trait: a system message before each prompt.")
    sampling: dict[str, Any] = Field(default_factory=dict, description="Overrides of the method's sampling defaults "
                                     "(craft: T 0.7, top_p 0.9, top_k 40; trait: T 0.7, top_p 0.9; domino: T 0.8).")
    structured_output: bool = Field(True, description="craft/trait: constrain the output to the JSON schema "
                                                      "(vLLM structured outputs / xgrammar); false = ask in words.")
    max_field_chars: Optional[int] = Field(None, gt=0, description="craft/trait: longest string field in the JSON "
                                                                   "(maxLength); null = unbounded.")
    references: Optional[PathList] = Field(None, description="Reference samples the report measures closeness to "
                                           "(JSONL); null = craft's few-shots or trait's examples.")
    reference_fields: Optional[list[str]] = Field(None, description="Fields of a reference joined into its text; "
                                                  "null = craft: the few-shots' instruction and output, else 'text'.")
    craft: Optional[CraftConfig] = None
    trait: Optional[TraitConfig] = None
    domino: Optional[DominoConfig] = None
    diversity: DiversityConfig = DiversityConfig()

    @field_validator("sampling")
    @classmethod
    def _sampling_is_valid(cls, value: dict) -> dict:
        _sampling_overrides(value, {})
        return value

    @model_validator(mode="after")
    def _method_section(self) -> "SynthesizeConfig":
        if self.method == "craft" and self.craft is None:
            self.craft = CraftConfig()
        if self.method == "trait" and self.trait is None:
            raise ValueError("method trait needs a trait section (at least trait.examples)")
        if self.method == "domino" and self.domino is None:
            raise ValueError("method domino needs a domino section (at least domino.soft_prompt)")
        return self

    @property
    def effective_sampling(self) -> SamplingParams:
        return _sampling_overrides(self.sampling, METHOD_SAMPLING[self.method])


RATINGS = ("very poor", "poor", "average", "good", "excellent")  # DOMINO's five levels, worst first


class JudgeConfig(EnginePoolConfig):
    """The LLM judge: each sample rated on DOMINO's five levels with a structured answer at temperature 0."""
    input: Optional[PathList] = Field(None, description="Samples to judge (JSONL/Parquet); null = this run's qc "
                                                        "output, else its synthesize output.")
    text_field: str = Field("text", description="The field the judge reads.")
    id_field: str = "id"
    template: Optional[str] = Field(None, description="A Jinja2 judge template replacing the default.")
    system_prompt: Optional[str] = None
    threshold: Literal[RATINGS] = Field("excellent", description="Keep samples rated at least this.")
    max_tokens: int = Field(32, gt=0, description="Tokens for the rating's JSON.")
    max_sample_chars: int = Field(6000, gt=0, description="A longer sample is cut to this in the prompt.")
    references: Optional[PathList] = Field(None, description="References for the diversity report; null = "
                                                             "synthesize's.")
    reference_fields: Optional[list[str]] = Field(None, description="Fields of a reference joined into its text; "
                                                  "null = as for synthesize.")
    diversity: DiversityConfig = DiversityConfig()


class NearDedupConfig(Strict):
    """MinHash/LSH near-duplicate detection on word shingles."""
    enabled: bool = True
    threshold: float = Field(0.85, gt=0, le=1, description="Jaccard similarity of shingle sets at or above which two "
                                                           "texts are near-duplicates (CRAFT: 85%).")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    shingle_words: int = Field(3, ge=1, le=10, description="Words per shingle.")
    seed: int = 1
    false_negative_weight: float = Field(
        0.5, gt=0, lt=1, description="LSH bands and rows minimise this x the missed pairs above the threshold + "
        "(1 - this) x the candidate pairs below it (0.5: datasketch's choice). Candidates are verified, so a higher "
        "value finds more near-duplicates at the cost of verifying more pairs.")


class DecontaminateConfig(Strict):
    """Drop samples sharing an n-gram with an evaluation item (GPT-3 / Llama style decontamination)."""
    eval_files: PathList = Field(description="Evaluation sets (JSONL/Parquet) that must not leak into training data.")
    eval_fields: Optional[list[str]] = Field(None, description="Fields of an eval row whose text is checked; null = "
                                             "every string field.")
    ngram: int = Field(13, ge=3, le=50, description="Words per n-gram (13: GPT-3's choice).")


class QcConfig(Strict):
    """Quality control: exact and near-duplicates (within the set and against references), decontamination against
    evaluation sets, similarity to references; every removal counted by reason."""
    input: Optional[PathList] = Field(None, description="Samples to check (JSONL/Parquet); null = this run's "
                                                        "synthesize output.")
    text_field: str = "text"
    id_field: str = "id"
    exact_dedup: bool = True
    near_dedup: NearDedupConfig = NearDedupConfig()
    references: Optional[PathList] = Field(None, description="Reference samples (e.g. the few-shots): samples that "
                                           "near-duplicate one are dropped; null = synthesize's references.")
    reference_fields: Optional[list[str]] = Field(None, description="Fields of a reference joined into its text; "
                                                  "null = as for synthesize.")
    decontaminate: Optional[DecontaminateConfig] = None
    max_reference_similarity: Optional[float] = Field(None, gt=0, le=1, description="Drop samples whose embedding "
                                                      "cosine to the closest reference is at least this; null = off.")
    batch_size: int = Field(1024, gt=0, description="Rows per hashing batch.")
    diversity: DiversityConfig = DiversityConfig()


class AutoscalingConfig(Strict):
    """Serve's autoscaling: replicas are added when ongoing requests per replica stay above the target for
    ``upscale_delay_s``, removed when below it for ``downscale_delay_s``."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    initial_replicas: Optional[int] = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0, description="Requests queued or running per replica.")
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0, description="Window the request metric is averaged over.")

    @model_validator(mode="after")
    def _min_below_max(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class ServeConfig(Strict):
    """The generator endpoint (``domainsynth serve``): OpenAI-compatible routes on Ray Serve."""
    model: str = Field(description="Hugging Face id or folder of a causal LM.")
    served_model_name: Optional[str] = Field(None, description="Name clients ask for; null = the model folder's name.")
    backend: Literal["domainsynth", "ray-serve-llm"] = Field(
        "domainsynth", description="domainsynth: our deployment around an engine (soft prompts, CPU or GPU); "
                                   "ray-serve-llm: Ray's build_openai_app over vLLM (GPU clusters).")
    engine: EngineKind = "transformers"
    engine_options: dict[str, Any] = Field(default_factory=dict, description="Passed to the engine's constructor "
                                           "(ray-serve-llm: vLLM engine_kwargs).")
    soft_prompts: dict[str, str] = Field(default_factory=dict, description="Model name -> soft prompt file: each is "
                                         "served as a model of its own.")
    host: str = Field("127.0.0.1", description="Address the HTTP proxy listens on (0.0.0.0 in a cluster).")
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "generator"
    route_prefix: str = "/"
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica (torch threads on CPU).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica.")
    max_ongoing_requests: int = Field(8, gt=0, description="Requests a replica accepts before Serve queues them.")
    default_max_tokens: int = Field(16, gt=0, description="max_tokens of a request that sets none (OpenAI's 16).")
    api_key_env: Optional[str] = Field("DOMAINSYNTH_API_KEY", description="Environment variable holding the API "
                                       "key clients must send; unset or empty variable = no key required.")
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    limits: RequestLimits = Field(RequestLimits(), description="What one request may ask (backend domainsynth): "
                                  "sizes, counts, tokens, JSON schema size; over a limit is a 400 (413 for the body).")
    api_docs: bool = Field(False, description="Serve /docs, /redoc and /openapi.json (backend domainsynth).")

    @model_validator(mode="after")
    def _soft_prompts_need_our_backend(self) -> "ServeConfig":
        if self.backend == "ray-serve-llm" and (self.soft_prompts or self.engine != "vllm"):
            raise ValueError("backend ray-serve-llm serves vLLM without soft prompts: set engine: vllm and no "
                             "soft_prompts, or use backend domainsynth")
        if self.served_model_name and self.served_model_name in self.soft_prompts:
            raise ValueError(f"soft_prompts: {self.served_model_name!r} is the base model's name")
        return self


Quantity = Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, (int, float)) else v),
                     Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")]
K8sName = Annotated[str, Field(pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$", max_length=47)]  # KubeRay: RayJob/RayService names


def _positive_cpus(value: str) -> str:
    if float(value.rstrip("m")) <= 0:
        raise ValueError("expected more than 0 CPUs")
    return value


CpuQuantity = Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, (int, float)) else v),
                        Field(pattern=r"^[0-9]+(\.[0-9]+)?m?$"), AfterValidator(_positive_cpus)]


class PodResources(Strict):
    """What one Ray pod asks Kubernetes for (requests = limits, so Ray's view of the node matches the pod's)."""
    cpu: CpuQuantity = Field("4", description="CPU cores (Kubernetes quantity: 4, 500m).")
    memory: Quantity = Field("16Gi", description="Memory (Kubernetes quantity: 16Gi).")


class HeadGroup(PodResources):
    cpu: CpuQuantity = "2"
    memory: Quantity = "8Gi"


class WorkerGroup(PodResources):
    min_replicas: int = Field(0, ge=0, description="Pods kept even when idle (0: the autoscaler starts them on "
                                                   "demand).")
    max_replicas: Optional[int] = Field(None, ge=1, description="Most pods; null = enough for the recipe's largest "
                                                                "pool (4 when no pool has a maximum).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the group's pods need, e.g. "
                                          "{nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}.")

    @model_validator(mode="after")
    def _min_below_max(self) -> "WorkerGroup":
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class GpuWorkerGroup(WorkerGroup):
    cpu: CpuQuantity = "8"
    memory: Quantity = "64Gi"
    gpus: int = Field(1, ge=1, description="nvidia.com/gpu per pod.")
    accelerator_type: Optional[str] = Field(None, description="Ray accelerator type of the GPUs (H100, A100, L4): "
                                            "the group offers Ray resource accelerator_type:TYPE, so the autoscaler "
                                            "can start it from zero for work asking for one. Which nodes the pods "
                                            "land on is node_selector's business.")


class VolumeConfig(Strict):
    claim_name: str = Field(description="A ReadWriteMany PersistentVolumeClaim every Ray pod mounts.")
    mount_path: str = Field("/data", pattern=r"^/", description="Where the pods see it.")


class RayJobConfig(Strict):
    ttl_seconds_after_finished: int = Field(3600, ge=0, description="How long the finished job's cluster stays "
                                            "(logs, dashboard) before KubeRay deletes it.")
    active_deadline_seconds: Optional[int] = Field(None, gt=0, description="Fail the job after this long; null = "
                                                                           "no limit.")
    backoff_limit: int = Field(0, ge=0, description="Retries of a failed job (each on a new cluster).")


class KubernetesConfig(Strict):
    """What ``domainsynth k8s render`` puts in KubeRay manifests (see docs/kubernetes.md)."""
    name: K8sName = Field("domainsynth", description="Name of the RayCluster / RayJob / RayService.")
    namespace: Optional[K8sName] = Field(None, description="Namespace; null = kubectl's current one.")
    image: Optional[str] = Field(None, description="Image with domainsynth installed; null = the tags k8s/Dockerfile "
                                 "builds: domainsynth:0.1.0-gpu when a GPU group is rendered, else "
                                 "domainsynth:0.1.0-cpu.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    project_dir: str = Field("/home/ray/domainsynth", pattern=r"^/", description="Where the image holds the project: "
                             "local paths of the recipe inside the current directory are found there.")
    volume: Optional[VolumeConfig] = Field(None, description="A shared volume on every pod, for run_dir and inputs "
                                           "(run_dir must be shared: a URI such as s3://, or this volume).")
    head: HeadGroup = HeadGroup()
    cpu_workers: WorkerGroup = WorkerGroup()
    gpu_workers: Optional[GpuWorkerGroup] = Field(None, description="The GPU worker group; null = one GPU per pod, "
                                                  "added when a stage or the endpoint asks for GPUs.")
    idle_timeout_seconds: int = Field(60, ge=0, description="The autoscaler removes a worker idle this long.")
    auth: Literal["token", "disabled"] = Field("token", description="Ray's token authentication on the cluster "
                                               "(KubeRay keeps the token in a Secret; see docs/kubernetes.md).")
    job: RayJobConfig = RayJobConfig()


class Recipe(Strict):
    run_dir: Optional[str] = Field(None, description="Where the run writes (local path or pyarrow filesystem URI); "
                                                     "required when the recipe has a stage.")
    ray: RayConfig = RayConfig()
    select: Optional[SelectConfig] = None
    embed: Optional[EmbedConfig] = None
    index: Optional[IndexConfig] = None
    retrieve: Optional[RetrieveConfig] = None
    generate: Optional[GenerateConfig] = None
    synthesize: Optional[SynthesizeConfig] = None
    qc: Optional[QcConfig] = None
    judge: Optional[JudgeConfig] = None
    serve: Optional[ServeConfig] = None
    kubernetes: KubernetesConfig = KubernetesConfig()

    @model_validator(mode="after")
    def _embed_has_a_corpus(self) -> "Recipe":
        if self.embed is not None and self.embed.corpus is None and self.select is None:
            raise ValueError("embed.corpus: required unless the recipe has a select section (then embed reads "
                             "select's output)")
        if self.run_dir is None and self.has_stage():
            raise ValueError("run_dir: required when the recipe has a stage")
        craft = self.synthesize.craft if self.synthesize and self.synthesize.method == "craft" else None
        if craft is not None:
            if craft.documents is None and self.retrieve is None:
                raise ValueError("synthesize.craft.documents: required unless the recipe has a retrieve section "
                                 "(then craft rewrites retrieve's output)")
            if craft.few_shots is None:
                if self.retrieve is None:
                    raise ValueError("synthesize.craft.few_shots: required unless the recipe has a retrieve section "
                                     "(then retrieve.few_shots are used)")
                craft.few_shots = list(self.retrieve.few_shots)
        if self.qc is not None and self.qc.input is None and self.synthesize is None:
            raise ValueError("qc.input: required unless the recipe has a synthesize section")
        if self.judge is not None and self.judge.input is None and self.synthesize is None and self.qc is None:
            raise ValueError("judge.input: required unless the recipe has a synthesize or qc section")
        return self

    def has_stage(self) -> bool:
        """Whether ``run`` has anything to do (a recipe with only ``serve`` or ``kubernetes`` has not)."""
        return any(getattr(self, stage) is not None for stage in STAGE_ORDER)

    def stage_fingerprint(self, stage: str, inputs: Optional[dict[str, str]] = None) -> str:
        """Hash of one stage's settings and input files and of those of every configured stage before it: a finished
        stage is skipped on rerun only when this matches its marker, so changing an upstream stage or its inputs
        redoes everything downstream. Input files are identified as pipelines/input_identity.py says (content hash
        when small, size and modification time when large; other stages' outputs in this run are left out).
        ``inputs``: a cache of each stage's input digest, filled as needed (pass one dict for all stages of a run
        so that each stage's inputs are looked at once)."""
        from .input_identity import stage_inputs_digest

        inputs = {} if inputs is None else inputs
        chain = [s for s in (*STAGE_ORDER[:STAGE_ORDER.index(stage)], stage) if getattr(self, s) is not None]
        for s in chain:
            if s not in inputs:
                inputs[s] = stage_inputs_digest(self, s)
        payload = [{"stage": s, "settings": getattr(self, s).model_dump(mode="json"), "inputs": inputs[s]}
                   for s in chain]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# qc before judge: dropping duplicates is cheap, a judgment is an LLM call per row.
STAGE_ORDER = ("select", "embed", "index", "retrieve", "generate", "synthesize", "qc", "judge")
_INPUT_PATH_FIELDS = {"select": ("in_domain", "corpus", "negatives", "classifier"), "embed": ("corpus",),
                      "retrieve": ("few_shots", "index"), "generate": ("prompts", "soft_prompt"),
                      "synthesize": ("template", "references"), "synthesize.craft": ("documents", "few_shots"),
                      "synthesize.trait": ("examples", "documents"), "synthesize.domino": ("soft_prompt",),
                      "qc": ("input", "references"), "qc.decontaminate": ("eval_files",),
                      "judge": ("input", "template", "references")}
# Fields that name a model: a Hugging Face id, or a folder (resolved like a path when it exists there or starts
# with ./, ../ or ~).
_MODEL_FIELDS = {"embed": "model", "generate": "model", "serve": "model", "synthesize": "model", "judge": "model",
                 "synthesize.trait": "embedding_model", "qc.diversity": "model", "judge.diversity": "model"}


def input_lists(recipe: Recipe, stage: str) -> list[tuple[str, list[str]]]:
    """(field, specs) for each input of ``stage`` that is a list of files, directories or globs (a corpus, prompts,
    samples), as the recipe sets it."""
    raw = recipe.model_dump(mode="json")
    found = []
    for section, names in _INPUT_PATH_FIELDS.items():
        if section.split(".")[0] != stage:
            continue
        values = _section(raw, section)
        for name in names if isinstance(values, dict) else ():
            if isinstance(values.get(name), list):
                found.append((f"{section}.{name}", values[name]))
    return found


def apply_overrides(raw: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply ``key.sub=value`` overrides to the raw recipe mapping."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"{source} {item!r}: expected KEY=VALUE, e.g. select.keep_fraction=0.1")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise RecipeError(f"{source} {item!r}: empty field name in {key!r}")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"{source} {item!r}: {part!r} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            problem = str(getattr(e, "problem", None) or e).strip()
            raise RecipeError(f"{source} {item!r}: the value is not valid YAML ({problem}); quote a string, "
                              f"write lists as [a, b]") from None
    return raw


def _resolve_relative(raw: dict, base_dir: str) -> dict:
    """Relative paths against the recipe's folder; a model name only when it is a folder there (or starts with ./,
    ../ or ~), since otherwise it is a Hugging Face id."""
    def resolve(field: str, value: str, is_model: bool) -> str:
        local = _absolute(value, base_dir)
        return local if not is_model or value.startswith(("./", "../", "~")) or os.path.exists(local) else value

    return _map_paths(raw, resolve)


def map_local_paths(raw: dict, move: Callable[[str, str], str]) -> dict:
    """Replace every local path of a resolved recipe mapping (inputs, model folders, soft prompts) by
    ``move(field, path)``, in place; URIs and Hugging Face ids stay."""
    return _map_paths(raw, lambda field, value, is_model: move(field, value)
                      if not is_uri(value) and os.path.isabs(value) else value)


def travelling_recipe(recipe: Recipe, move: Callable[[str, str], str]) -> dict:
    """How a recipe goes to a cluster (a submitted job's working_dir, a RayJob's ConfigMap): its stages as set, every
    local path replaced by ``move(field, path)``. The job joins the cluster it runs in (no ``ray``); ``kubernetes``
    and ``serve`` are not the job's."""
    raw = recipe.model_dump(mode="json", exclude_unset=True, exclude={"ray", "kubernetes", "serve"})
    return map_local_paths(raw, move)


def _map_paths(raw: dict, fn: Callable[[str, str, bool], str]) -> dict:
    """``fn(field, path, is_model)`` on every path a recipe mapping holds (one string or a list), in place."""
    def fields():
        for stage, names in _INPUT_PATH_FIELDS.items():
            section = _section(raw, stage)
            for name in names if isinstance(section, dict) else ():
                yield section, name, f"{stage}.{name}", False
        for stage, name in _MODEL_FIELDS.items():
            section = _section(raw, stage)
            if isinstance(section, dict):
                yield section, name, f"{stage}.{name}", True
        soft_prompts = _section(raw, "serve.soft_prompts")
        for name in soft_prompts if isinstance(soft_prompts, dict) else ():
            yield soft_prompts, name, f"serve.soft_prompts.{name}", False

    for section, name, field, is_model in list(fields()):
        value = section.get(name)
        if isinstance(value, str):
            section[name] = fn(field, value, is_model)
        elif isinstance(value, list) and not is_model:
            section[name] = [fn(field, v, is_model) if isinstance(v, str) else v for v in value]
    return raw


def _section(raw: dict, dotted: str):
    """``raw["a"]["b"]`` for ``"a.b"``; None when a part is missing or not a mapping."""
    node = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _absolute(path: str, base_dir: str) -> str:
    if is_uri(path) or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def build_recipe(raw: Any, source: str, base_dir: str, overrides: list[str] = ()) -> Recipe:
    """Validate a raw mapping (plus overrides) into a Recipe; errors name ``source`` and the field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected a mapping of recipe fields at the top level, got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides))
    raw = _resolve_relative(raw, base_dir)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(format_validation_error(source, e)) from None


def load_recipe(path: str, overrides: list[str] = ()) -> Recipe:
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a directory; expected a recipe file (YAML)") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected a recipe file (YAML)") \
            from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    return build_recipe(raw, path, os.path.dirname(os.path.abspath(path)), overrides)


def format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid recipe"]
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see docs/recipes.md)"
        elif err["type"] == "missing":
            message = "required field is missing"
        got = err.get("input")
        suffix = f" (got {got!r})" if err["type"] not in ("missing", "extra_forbidden") and not isinstance(got, dict) else ""
        lines.append(f"  {field}: {message}{suffix}")
    return "\n".join(lines)
