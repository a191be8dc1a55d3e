"""The recipe: one YAML file per run, validated with pydantic before any work starts.

Relative input paths are resolved against the recipe file's folder; ``run_dir`` is resolved against the current
directory. ``--set key=value`` overrides any field (dotted keys; values parsed as YAML scalars).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..actors.engines import ENGINE_KINDS, SamplingParams
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
    num_cpus: Optional[int] = Field(None, gt=0, description="CPUs of the embedded local Ray; null = all of them.")


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


class GenerateConfig(Strict):
    """Batch generation over Ray Data: one row per completion, from a file of prompts."""
    prompts: PathList = Field(description="Prompts (JSONL/Parquet), one per row.")
    prompt_field: str = "prompt"
    id_field: str = "id"
    chat: bool = Field(False, description="Send each prompt as a user message through the model's chat template.")
    system_prompt: Optional[str] = Field(None, description="chat: a system message before each prompt.")
    model: str = Field(description="Hugging Face id or folder of a causal LM.")
    engine: EngineKind = "transformers"
    engine_options: dict[str, Any] = Field(default_factory=dict, description="Passed to the engine's constructor "
                                           "(transformers: dtype, device; vllm: max_model_len, dtype, ...).")
    soft_prompt: Optional[str] = Field(None, description="A soft prompt placed before every prompt (PEFT "
                                                         "prompt-tuning folder, .safetensors or .npy).")
    sampling: SamplingParams = SamplingParams()
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

    @model_validator(mode="after")
    def _soft_prompts_need_our_backend(self) -> "ServeConfig":
        if self.backend == "ray-serve-llm" and (self.soft_prompts or self.engine != "vllm"):
            raise ValueError("backend ray-serve-llm serves vLLM without soft prompts: set engine: vllm and no "
                             "soft_prompts, or use backend domainsynth")
        if self.served_model_name and self.served_model_name in self.soft_prompts:
            raise ValueError(f"soft_prompts: {self.served_model_name!r} is the base model's name")
        return self


class Recipe(Strict):
    run_dir: Optional[str] = Field(None, description="Where the run writes (local path or pyarrow filesystem URI); "
                                                     "required when the recipe has a stage.")
    ray: RayConfig = RayConfig()
    select: Optional[SelectConfig] = None
    embed: Optional[EmbedConfig] = None
    index: Optional[IndexConfig] = None
    retrieve: Optional[RetrieveConfig] = None
    generate: Optional[GenerateConfig] = None
    serve: Optional[ServeConfig] = None

    @model_validator(mode="after")
    def _embed_has_a_corpus(self) -> "Recipe":
        if self.embed is not None and self.embed.corpus is None and self.select is None:
            raise ValueError("embed.corpus: required unless the recipe has a select section (then embed reads "
                             "select's output)")
        if self.run_dir is None and any(getattr(self, s) is not None for s in STAGE_ORDER):
            raise ValueError("run_dir: required when the recipe has a stage")
        return self

    def stage_fingerprint(self, stage: str) -> str:
        """Hash of one stage's settings and of every configured stage before it: a finished stage is skipped on
        rerun only when this matches its marker, so changing an upstream stage redoes everything downstream."""
        upstream = STAGE_ORDER[:STAGE_ORDER.index(stage)]
        configs = [getattr(self, s).model_dump(mode="json") for s in (*upstream, stage) if getattr(self, s)]
        return hashlib.sha256(json.dumps(configs if upstream else configs[0], sort_keys=True).encode()).hexdigest()[:16]


STAGE_ORDER = ("select", "embed", "index", "retrieve", "generate")
_INPUT_PATH_FIELDS = {"select": ("in_domain", "corpus", "negatives", "classifier"), "embed": ("corpus",),
                      "retrieve": ("few_shots", "index"), "generate": ("prompts", "soft_prompt")}
# Fields that name a model: a Hugging Face id, or a folder (resolved like a path when it exists there or starts
# with ./, ../ or ~).
_MODEL_FIELDS = {"embed": "model", "generate": "model", "serve": "model"}


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
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    return raw


def _resolve_relative(raw: dict, base_dir: str) -> dict:
    for stage, fields in _INPUT_PATH_FIELDS.items():
        section = raw.get(stage)
        if not isinstance(section, dict):
            continue
        for name in fields:
            value = section.get(name)
            if isinstance(value, str):
                section[name] = _absolute(value, base_dir)
            elif isinstance(value, list):
                section[name] = [_absolute(v, base_dir) if isinstance(v, str) else v for v in value]
    for stage, name in _MODEL_FIELDS.items():
        section = raw.get(stage)
        if isinstance(section, dict) and isinstance(section.get(name), str):
            local = _absolute(section[name], base_dir)
            if section[name].startswith(("./", "../", "~")) or os.path.exists(local):
                section[name] = local
    serve = raw.get("serve")
    if isinstance(serve, dict) and isinstance(serve.get("soft_prompts"), dict):
        serve["soft_prompts"] = {k: _absolute(v, base_dir) if isinstance(v, str) else v
                                 for k, v in serve["soft_prompts"].items()}
    return raw


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
