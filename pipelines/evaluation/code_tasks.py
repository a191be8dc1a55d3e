"""Code generation judged by running it: pass@k on LeetCodeDataset problems with their own tests (DOMINO's code
evaluation). Problems released after the model's training data (``after``, the temporal cutoff against
contamination) are shown to the model as LeetCodeDataset's own prompt — the statement and the starter code, asking
for a Python solution in a fenced block; ``n`` samples per problem are drawn; each sample's program (its last fenced
Python block) runs with the problem's imports and tests in the sandbox (``actors/code_sandbox.py``: its own process,
CPU, memory and wall-time limits, no network, a throwaway directory), where a sample that hangs, forks or eats memory
is simply a failed sample; and pass@k is Chen et al. (2021)'s unbiased estimator, averaged over problems with its
standard error.

The bundled problems are LeetCodeDataset v0.3.1's test split (``tasks/leetcode.test.jsonl``, see ``tasks/SOURCE.md``):
228 problems dated 2024-08-04 to 2025-03-30. A JSONL of your own with the same fields works too.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ...actors.code_sandbox import STATUSES, Limits, RunResult, isolation, run_program

LEETCODE = Path(__file__).parent / "tasks" / "leetcode.test.jsonl"
REQUIRED = ("task_id", "problem_description", "starter_code", "prompt", "entry_point", "test")
# Sampling for pass@k: Chen et al. sample at temperature 0.2 (pass@1) to 0.8 (pass@100) with top-p 0.95; seeded, so a
# rerun draws the same samples. A solution of a hard problem easily takes several hundred tokens.
DEFAULT_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 1024, "seed": 1234}
Progress = Callable[[str, int, int], None]  # (phase: "generate" or "score", done, total)


@dataclass(frozen=True)
class CodeProblem:
    task_id: str
    description: str
    starter_code: str
    imports: str  # what LeetCodeDataset runs before a solution (its ``prompt``): imports and ListNode/TreeNode helpers
    entry_point: str  # e.g. ``Solution().twoSum``
    test: str  # ``def check(candidate): assert ...``
    reference: Optional[str] = None  # a correct solution (LeetCodeDataset's ``completion``)
    date: Optional[str] = None  # estimated release date, ISO
    difficulty: Optional[str] = None


# -------------------------------------------------------------------------------------------------------- problems
def load_problems(path: str | Path | None = None, limit: Optional[int] = None,
                  after: str | datetime.date | None = None) -> list[CodeProblem]:
    """The problems in ``path`` (JSONL with LeetCodeDataset's fields; default: the bundled v0.3.1 test split), those
    released strictly after ``after`` only (a model's training cutoff), the first ``limit`` of them."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit: expected a positive number of problems, got {limit}")
    path = Path(path) if path else LEETCODE
    cutoff = after.isoformat() if isinstance(after, datetime.date) else after
    if cutoff is not None:
        datetime.date.fromisoformat(cutoff)  # a malformed date fails here, not as a silent string comparison
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [f for f in REQUIRED + (("estimated_date",) if cutoff else ()) if not row.get(f)]
        if missing:
            raise ValueError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
        if cutoff and str(row["estimated_date"])[:10] <= cutoff:
            continue
        problems.append(CodeProblem(
            task_id=str(row["task_id"]), description=row["problem_description"], starter_code=row["starter_code"],
            imports=row["prompt"], entry_point=row["entry_point"], test=row["test"], reference=row.get("completion"),
            date=row.get("estimated_date"), difficulty=row.get("difficulty")))
        if limit is not None and len(problems) >= limit:
            break
    return problems


def build_prompt(problem: CodeProblem) -> str:
    """LeetCodeDataset's own prompt (its ``query`` field), so scores compare with the dataset's published ones. The
    caller's engine wraps it in the model's chat template."""
    return ("You are an expert Python programmer. You will be given a question (problem specification) and will "
            "generate a correct Python program that matches the specification and passes all tests.\n\n"
            f"### Question:\n{problem.description}\n\n"
            "### Format: You will use the following starter code to write the solution to the problem and enclose "
            f"your code within delimiters.\n```python\n{problem.starter_code}\n```\n\n"
            "### Answer: (use the provided format with backticks)\n")


FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)  # an unclosed last block counts too


def extract_program(completion: str, problem: Optional[CodeProblem] = None) -> str:
    """The solution in a completion: the last fenced Python block that defines the entry point's class (a model
    often shows usage after its solution), else the last Python block, else the last fenced block, else the text."""
    blocks = [(lang.lower(), code) for lang, code in FENCE.findall(completion)]
    python = [code for lang, code in blocks if lang in ("python", "python3", "py")]
    if problem is not None:
        cls = problem.entry_point.split("(")[0].split(".")[0]
        defining = [code for code in python or [c for _, c in blocks] if re.search(rf"\bclass\s+{cls}\b", code)]
        if defining:
            return defining[-1]
    if python:
        return python[-1]
    return blocks[-1][1] if blocks else completion


def build_test_program(problem: CodeProblem, solution: str) -> str:
    """What runs in the sandbox: the problem's imports, the solution, its tests and the call of the tests."""
    return f"{problem.imports}\n\n{solution}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


# ---------------------------------------------------------------------------------------------------------- pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021): the chance that at least one of k samples drawn without replacement from n, c of them
    correct, passes: 1 - C(n-c, k) / C(n, k), as a product (the binomials overflow for large n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_and_stderr(values: Sequence[float]) -> dict:
    """The mean over problems and its standard error (sample standard deviation / sqrt(problems), as lm-eval's);
    None with fewer than two problems."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"value": mean, "stderr": None}
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return {"value": mean, "stderr": math.sqrt(variance / len(values))}


def score_samples(problems: Sequence[CodeProblem], samples: dict[str, list[str]], ks: Iterable[int] = (1,),
                  limits: Limits = Limits(), workers: Optional[int] = None,
                  progress: Optional[Progress] = None) -> dict:
    """Run every sample (a program: the solution alone, as ``extract_program`` returns it) of every problem against
    the problem's tests in the sandbox, ``workers`` at a time (default: this process's CPUs), and score them: per
    problem the samples' statuses and pass@k; over problems pass@k with its standard error, and how many samples
    ended in each status (a timeout or a memory failure is a failed sample, counted here). Problems whose own
    imports fail here (``unrunnable``: say, ``sortedcontainers`` missing) are left out, named with the reason."""
    ks = sorted(set(ks))
    missing = [p.task_id for p in problems if not samples.get(p.task_id)]
    if missing:
        raise ValueError(f"no samples for {len(missing)} problem(s): {', '.join(missing[:5])}")
    fewest = min(len(samples[p.task_id]) for p in problems)
    if not ks or ks[0] < 1 or ks[-1] > fewest:
        raise ValueError(f"ks {ks}: each k must be between 1 and the samples per problem ({fewest})")
    start, done = time.monotonic(), 0
    broken = unrunnable(problems, limits)
    problems = [p for p in problems if p.task_id not in broken]
    jobs = [(p, s) for p in problems for s in samples[p.task_id]]
    workers = workers or len(os.sched_getaffinity(0))
    results: list[RunResult] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="code-sandbox") as pool:
        for result in pool.map(lambda job: run_program(build_test_program(job[0], job[1]), limits), jobs):
            results.append(result)
            done += 1
            if progress:
                progress("score", done, len(jobs))
    per_problem, at = [], 0
    for p in problems:
        mine, at = results[at:at + len(samples[p.task_id])], at + len(samples[p.task_id])
        passed = sum(r.status == "passed" for r in mine)
        per_problem.append({"task_id": p.task_id, "difficulty": p.difficulty, "date": p.date, "n": len(mine),
                            "passed": passed, "pass@k": {f"pass@{k}": pass_at_k(len(mine), passed, k) for k in ks},
                            "samples": [asdict(r) for r in mine]})
    return {"pass@k": {f"pass@{k}": mean_and_stderr([q["pass@k"][f"pass@{k}"] for q in per_problem]) for k in ks},
            "problems": per_problem, "samples": len(results), "unrunnable": broken,
            "statuses": {s: sum(r.status == s for r in results) for s in STATUSES},
            "isolation": isolation().describe(), "limits": asdict(limits), "workers": workers,
            "seconds": time.monotonic() - start}


def unrunnable(problems: Sequence[CodeProblem], limits: Limits = Limits()) -> dict[str, str]:
    """The problems that no solution could pass here, because their imports fail in the sandbox (LeetCode's judge
    has ``sortedcontainers``; this environment may not): task id -> why. One sandbox run per distinct preamble."""
    failures = {}
    for imports in dict.fromkeys(p.imports for p in problems):
        result = run_program(imports, limits)
        failures[imports] = None if result.status == "passed" else f"its imports fail: {result.detail}"
    broken = {p.task_id: failures[p.imports] for p in problems if failures[p.imports]}
    if len(broken) == len(problems):
        raise RuntimeError(f"code tasks: no problem can run here: {next(iter(broken.values()))}")
    return broken


# ------------------------------------------------------------------------------------------------------ generation
def load_code_engine(model: str, adapter: Optional[str] = None, device: Optional[str] = None):
    """The transformers engine that ``generate`` uses, for ``model`` with ``adapter`` (a PEFT folder) on it, and the
    soft prompt to put before every prompt (None without one). A prompt-tuning adapter is the engine's soft-prompt
    prefix (what PEFT does: its virtual tokens before the prompt's); a LoRA adapter is merged into the weights."""
    import torch

    from ...actors.engines import load_engine
    from ...actors.soft_prompt import load_soft_prompt

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = load_engine(model, "transformers", device=device, dtype="float32" if device == "cpu" else None)
    if not adapter:
        return engine, None
    config_path = os.path.join(adapter, "adapter_config.json")
    try:
        peft_type = json.loads(Path(config_path).read_text())["peft_type"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"adapter {adapter!r}: expected a PEFT folder with adapter_config.json ({e})") from None
    if peft_type == "PROMPT_TUNING":
        prefix = load_soft_prompt(adapter)
        engine.check_prefix(prefix)
        return engine, prefix
    if peft_type in ("PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"):
        raise ValueError(f"adapter {adapter!r}: {peft_type} is not supported (a soft prompt or a LoRA adapter is)")
    from peft import PeftModel

    engine.model = PeftModel.from_pretrained(engine.model, adapter).merge_and_unload().eval()
    return engine, None


def generate_samples(engine, problems: Sequence[CodeProblem], n: int, sampling: dict,
                     prefix=None, chat: Optional[bool] = None, progress: Optional[Progress] = None) -> dict:
    """``n`` completions per problem: one engine call per problem, seeded with the sampling seed plus the problem's
    position (the same samples whatever else is evaluated beside). ``chat``: wrap prompts in the model's chat
    template (default: when it has one). A completion is cut to the room the context leaves; a problem whose prompt
    alone fills it gets empty completions (failed samples), and both are listed."""
    from ...actors.engines import SamplingParams

    params = SamplingParams.model_validate({**DEFAULT_SAMPLING, **sampling, "n": n})
    chat = bool(getattr(engine.tokenizer, "chat_template", None)) if chat is None else chat
    completions, too_long, cut = {}, [], []
    for i, problem in enumerate(problems):
        text = build_prompt(problem)
        prompt = engine.chat_prompt([{"role": "user", "content": text}]) if chat else text
        room = engine.max_model_len - engine.prompt_length(prompt, prefix)
        if room < 1:
            too_long.append(problem.task_id)
            completions[problem.task_id] = [""] * n
        else:
            if room < params.max_tokens:
                cut.append(problem.task_id)
            seed = None if params.seed is None else params.seed + i
            call = params.model_copy(update={"seed": seed, "max_tokens": min(params.max_tokens, room)})
            completions[problem.task_id] = [c.text for c in engine.generate([prompt], call, prefix)[0]]
        if progress:
            progress("generate", i + 1, len(problems))
    return {"completions": completions, "prompt_too_long": too_long, "max_tokens_cut": cut, "chat": chat,
            "sampling": params.model_dump(exclude_none=True)}


def evaluate_code(model: str, adapter: Optional[str] = None, problems: Optional[Sequence[CodeProblem]] = None,
                  n: int = 1, ks: Iterable[int] = (1,), sampling: Optional[dict] = None, limits: Limits = Limits(),
                  device: Optional[str] = None, workers: Optional[int] = None, chat: Optional[bool] = None,
                  progress: Optional[Progress] = None) -> dict:
    """pass@k of ``model`` (with ``adapter``) on ``problems`` (default: all the bundled ones): ``n`` samples per
    problem (``sampling`` over ``DEFAULT_SAMPLING``), each program run against its tests in the sandbox. Returns
    ``score_samples``' result plus the generation's settings and timing."""
    problems = load_problems() if problems is None else list(problems)
    start = time.monotonic()
    engine, prefix = load_code_engine(model, adapter, device)
    generated = generate_samples(engine, problems, n, sampling or {}, prefix, chat, progress)
    generation_s = time.monotonic() - start
    del engine  # the model's memory back before the sandboxes run
    samples = {p.task_id: [extract_program(c, p) for c in generated["completions"][p.task_id]] for p in problems}
    result = score_samples(problems, samples, ks, limits, workers, progress)
    for q in result["problems"]:  # each sample's completion beside its status, for reading what went wrong
        for sample, text in zip(q["samples"], generated["completions"][q["task_id"]]):
            sample["completion"] = text
    return {**result, "model": model, "adapter": adapter, "n": n, "generation_seconds": generation_s,
            **{k: generated[k] for k in ("sampling", "chat", "prompt_too_long", "max_tokens_cut")}}
