"""One model's evaluation with lm-eval-harness, run as a Ray task: the field's standard harness scores it (its
prompts, metrics and standard errors), not code of ours. A model is a folder or id, optionally with a PEFT adapter
(LoRA or a prompt-tuning soft prompt) that lm-eval's ``hf`` model puts on it (``peft=``)."""

from __future__ import annotations

import time
from typing import Callable, Optional

import ray


def lm_eval_model_args(model_path: str, adapter: Optional[str], device: str) -> dict:
    """lm-eval's ``hf`` model arguments: float32 on CPU (no bf16 matmuls there), the checkpoint's dtype on GPU."""
    return {"pretrained": model_path, "dtype": "float32" if device == "cpu" else "auto",
            **({"peft": adapter} if adapter else {})}


@ray.remote(num_cpus=0)
class EvalProgress:
    """Requests each model's lm-eval has scored so far, for the driver's progress lines."""

    def __init__(self) -> None:
        self.scored: dict[str, int] = {}

    def update(self, label: str, scored: int) -> None:
        self.scored[label] = scored

    def snapshot(self) -> dict[str, int]:
        return dict(self.scored)


def _progress_hook(report: Callable[[int], None], every_s: float):
    """An lm-eval cache hook that caches nothing and counts: lm-eval hands it every request it has scored (a choice's
    log-likelihood, a document's rolling one, a generation), which is the progress a long evaluation shows."""
    from lm_eval.api.model import CacheHook

    class Counting(CacheHook):
        def __init__(self) -> None:
            super().__init__(None)
            self.scored, self.reported_at = 0, time.monotonic()

        def add_partial(self, attr, req, res) -> None:
            self.scored += 1
            if time.monotonic() - self.reported_at >= every_s:
                self.reported_at = time.monotonic()
                report(self.scored)

    return Counting()


def evaluate_model(model_path: str, adapter: Optional[str], tasks: list[dict], settings: dict,
                   progress: Optional[Callable[[int], None]] = None, progress_every_s: float = 30.0) -> dict:
    """lm-eval's ``simple_evaluate`` on ``tasks`` (task configs); what the report needs of its output: results per
    task (metric values and their standard errors), items evaluated, few-shot counts, which way each metric is better,
    versions, the model arguments (to reproduce the run with lm-eval's CLI) and the requests scored. ``progress`` is
    called with the requests scored so far, every ``progress_every_s``."""
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # tasks read local files; never reach for the Hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_args = lm_eval_model_args(model_path, adapter, device)
    scored = {"results": {}, "n_samples": {}, "n_shot": {}, "higher_is_better": {}, "versions": {},
              "model_args": model_args, "lm_eval_version": lm_eval.__version__, "device": device, "requests": 0}
    if tasks:
        scored.update(_lm_eval(model_args, device, tasks, settings, progress, progress_every_s))
    if settings.get("code"):
        done_before = scored["requests"]
        code = _code_task(model_path, adapter, device, settings["code"],
                          lambda done: progress(done_before + done) if progress else None)
        scored["code"] = code
        for key, part in code_results(code, settings["code"]["k"]).items():
            scored[key][CODE_TASK] = part
        scored["requests"] += code["samples"]
    return scored


CODE_TASK = "leetcode"


def _lm_eval(model_args: dict, device: str, tasks: list[dict], settings: dict,
             progress: Optional[Callable[[int], None]], progress_every_s: float) -> dict:
    import lm_eval
    from lm_eval.api.registry import get_model

    # The model built as simple_evaluate builds it from these arguments, so that the counting hook can be set on it.
    lm = get_model("hf").create_from_arg_obj(model_args, {"batch_size": settings["batch_size"],
                                                          "max_batch_size": None, "device": device})
    hook = _progress_hook(progress or (lambda scored: None), progress_every_s)
    lm.set_cache_hook(hook)
    out = lm_eval.simple_evaluate(
        model=lm, model_args=model_args, tasks=[dict(t) for t in tasks], num_fewshot=settings.get("num_fewshot"),
        batch_size=settings["batch_size"], limit=settings.get("limit"), log_samples=False,
        bootstrap_iters=settings["bootstrap_iters"], random_seed=settings["seed"],
        numpy_random_seed=settings["seed"], torch_random_seed=settings["seed"], fewshot_random_seed=settings["seed"])
    return {"results": out["results"], "n_samples": out["n-samples"], "n_shot": out["n-shot"],
            "higher_is_better": out["higher_is_better"], "versions": out["versions"],
            "lm_eval_version": out.get("lm_eval_version"), "requests": hook.scored}


def _code_task(model_path: str, adapter: Optional[str], device: str, code: dict,
               progress: Callable[[int], None]) -> dict:
    """pass@k of the model on the code problems: programs sampled by our own engine (as generate samples), each run
    in the sandbox. The sandboxes share the CPUs Ray gave this task (OMP_NUM_THREADS is what it set)."""
    import os

    from ..actors.code_sandbox import Limits
    from ..pipelines.evaluation.code_tasks import evaluate_code, load_problems

    problems = load_problems(code["problems"], code["limit"], code["after"])
    workers = max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    def counted(phase: str, done: int, total: int) -> None:  # programs written (each is a request to the model)
        if phase == "generate":
            progress(done * code["samples"])

    return evaluate_code(model_path, adapter, problems, n=code["samples"], ks=code["k"], sampling=code["sampling"],
                         limits=Limits(wall_s=code["wall_seconds"], memory_mb=code["memory_mb"]), device=device,
                         workers=workers, progress=counted)


def code_results(code: dict, ks: list[int]) -> dict[str, dict]:
    """The code task in lm-eval's result shape (metric,filter keys; items; which way is better), so the results
    table, chart and deltas treat it as any other task."""
    results = {}
    for k in ks:
        value = code["pass@k"][f"pass@{k}"]
        results[f"pass@{k},none"], results[f"pass@{k}_stderr,none"] = value["value"], value["stderr"]
    scored = len(code["problems"])
    return {"results": results, "n_samples": {"original": scored, "effective": scored},
            "higher_is_better": {f"pass@{k}": True for k in ks}, "n_shot": 0, "versions": "LeetCodeDataset-v0.3.1"}
