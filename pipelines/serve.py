"""The generator endpoint as a Serve application, from the recipe's ``serve`` section: our deployment around an
engine (``backend: domainsynth``; soft prompts, CPU or GPU), or Ray's own vLLM app (``backend: ray-serve-llm``,
``ray.serve.llm.build_openai_app``) on GPU clusters. Clients see the same OpenAI routes either way."""

from __future__ import annotations

import json
import os

from .recipe import ServeConfig

# What a Serve config file (a RayService's serveConfigV2) names to build the endpoint: see app_builder below.
APP_BUILDER = "domainsynth.pipelines.serve:app_builder"


def served_model_name(cfg: ServeConfig) -> str:
    return cfg.served_model_name or os.path.basename(cfg.model.rstrip("/"))


def api_key(cfg: ServeConfig) -> str | None:
    """The key clients must send, from the environment (never from the recipe, which is shared and logged)."""
    return (os.environ.get(cfg.api_key_env) or None) if cfg.api_key_env else None


def autoscaling_config(cfg: ServeConfig) -> dict:
    """Serve's ``autoscaling_config`` keys, as the recipe sets them."""
    return cfg.autoscaling.model_dump(exclude_none=True)


def build_application(cfg: ServeConfig):
    """The Serve application the recipe describes (not yet running)."""
    if cfg.backend == "ray-serve-llm":
        return _ray_serve_llm_app(cfg)
    from ..actors.serve_app import generator_app

    return generator_app(
        cfg.model, engine=cfg.engine, engine_options=cfg.engine_options, served_model_name=served_model_name(cfg),
        soft_prompts=cfg.soft_prompts, adapters=check_adapters(cfg.adapters), api_key=api_key(cfg),
        default_max_tokens=cfg.default_max_tokens, limits=cfg.limits, api_docs=cfg.api_docs,
        autoscaling_config=autoscaling_config(cfg), num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
        max_ongoing_requests=cfg.max_ongoing_requests, max_batch_size=cfg.max_batch_size)


def check_adapters(adapters: dict[str, str]) -> dict[str, str]:
    """Each folder is a PEFT LoRA adapter (its adapter_config.json says so), checked before anything starts; that
    it fits the base model is checked when a replica loads it."""
    for name, path in adapters.items():
        try:
            with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
                kind = json.load(f).get("peft_type")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"serve.adapters.{name}: {path} is not a PEFT adapter folder (no readable "
                             f"adapter_config.json: {getattr(e, 'strerror', None) or e})") from None
        if kind != "LORA":
            raise ValueError(f"serve.adapters.{name}: {path} holds a {kind} adapter; expected LoRA")
    return adapters


def app_builder(args: dict):
    """Serve's application builder for config files: ``import_path: domainsynth.pipelines.serve:app_builder`` with
    ``args`` = a recipe's ``serve`` section. This is what a RayService's ``serveConfigV2`` (and ``serve deploy``)
    runs; the config's ``deployments`` entry for ``generator`` may override replicas and autoscaling."""
    return build_application(ServeConfig.model_validate(args))


def _ray_serve_llm_app(cfg: ServeConfig):
    if api_key(cfg):
        raise ValueError(f"serve.backend ray-serve-llm does not check API keys: unset {cfg.api_key_env} or use "
                         f"backend domainsynth")
    if "limits" in cfg.model_fields_set or cfg.api_docs:
        raise ValueError("serve.limits and serve.api_docs apply to backend domainsynth only; ray-serve-llm has its "
                         "own (vLLM's) request checks")
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as e:
        raise ValueError(f"serve.backend ray-serve-llm needs vLLM (pip install 'domainsynth[gpu]'): {e}") from None
    config = LLMConfig(
        model_loading_config={"model_id": served_model_name(cfg), "model_source": cfg.model},
        engine_kwargs=dict(cfg.engine_options),
        deployment_config={"autoscaling_config": autoscaling_config(cfg),
                           "max_ongoing_requests": cfg.max_ongoing_requests},
    )
    return build_openai_app({"llm_configs": [config]})
