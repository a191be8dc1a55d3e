"""One model's evaluation with lm-eval-harness, run as a Ray task: the field's standard harness scores it (its
prompts, metrics and standard errors), not code of ours. A model is a folder or id, optionally with a PEFT adapter
(LoRA or a prompt-tuning soft prompt) that lm-eval's ``hf`` model puts on it (``peft=``)."""

from __future__ import annotations

from typing import Optional


def lm_eval_model_args(model_path: str, adapter: Optional[str], device: str) -> dict:
    """lm-eval's ``hf`` model arguments: float32 on CPU (no bf16 matmuls there), the checkpoint's dtype on GPU."""
    return {"pretrained": model_path, "dtype": "float32" if device == "cpu" else "auto",
            **({"peft": adapter} if adapter else {})}


def evaluate_model(model_path: str, adapter: Optional[str], tasks: list[dict], settings: dict) -> dict:
    """lm-eval's ``simple_evaluate`` on ``tasks`` (task configs); what the report needs of its output: results per
    task (metric values and their standard errors), items evaluated, few-shot counts, which way each metric is better,
    versions, and the model arguments (to reproduce the run with lm-eval's CLI)."""
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # tasks read local files; never reach for the Hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_args = lm_eval_model_args(model_path, adapter, device)
    out = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, device=device, tasks=[dict(t) for t in tasks], num_fewshot=settings.get("num_fewshot"),
        batch_size=settings["batch_size"], limit=settings.get("limit"), log_samples=False,
        bootstrap_iters=settings["bootstrap_iters"], random_seed=settings["seed"],
        numpy_random_seed=settings["seed"], torch_random_seed=settings["seed"], fewshot_random_seed=settings["seed"])
    return {"results": out["results"], "n_samples": out["n-samples"], "n_shot": out["n-shot"],
            "higher_is_better": out["higher_is_better"], "versions": out["versions"], "model_args": model_args,
            "lm_eval_version": out.get("lm_eval_version"), "device": device}
