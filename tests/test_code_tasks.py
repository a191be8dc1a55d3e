"""Code pass@k with real sandboxed subprocesses (no mocks): bundled reference solutions pass and a wrong one fails;
a sample that hangs, eats memory, forks, reaches for the network or writes files fails within its limits, leaves
nothing behind, and the batch goes on; the pass@k estimator equals brute-force enumeration; the tiny model's samples
are generated, scored and accounted for end to end."""

from __future__ import annotations

import itertools
import json
import os
import socket
import time

import psutil
import pytest

from domainsynth.actors.code_sandbox import MARKER, UID_BASE, UID_SLOTS, Limits, isolation, run_program
from domainsynth.pipelines.evaluation.code_tasks import (build_prompt, build_test_program, evaluate_code,
                                                         extract_program, generate_samples, load_code_engine,
                                                         load_problems, pass_at_k, score_samples)

FAST = ("convert-date-to-binary", "find-the-key-of-the-numbers", "hash-divided-string",
        "count-the-number-of-good-nodes")  # quick references (0.05 s each), none needing sortedcontainers
SLACK_S = 1.5  # start-up, the group kill and a loaded CI machine


@pytest.fixture(scope="module")
def problems() -> dict:
    return {p.task_id: p for p in load_problems()}


def solution(body: str, method: str = "convertDateToBinary", preamble: str = "") -> str:
    """A Solution class for convert-date-to-binary whose method runs ``body``."""
    indented = "\n".join("        " + line for line in body.splitlines())
    return f"{preamble}\nclass Solution:\n    def {method}(self, date: str) -> str:\n{indented}\n"


def leftovers() -> list:
    """This process's sandbox processes still alive (zombies aside): those under it, and those with one of its
    dedicated uids (an orphan is reparented away from us). Other processes (a session's Ray) do not count."""
    first = UID_BASE + (os.getpid() % (1 << 22)) * UID_SLOTS
    ours = {c.pid for c in psutil.Process().children(recursive=True)}
    return [p for p in psutil.process_iter(["cmdline", "status", "uids"])
            if MARKER in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE
            and (p.pid in ours or first <= p.info["uids"].real < first + UID_SLOTS)]


def test_bundled_reference_solutions_pass_and_a_wrong_one_fails(problems):
    chosen = [problems[t] for t in FAST]
    result = score_samples(chosen, {p.task_id: [p.reference] for p in chosen}, limits=Limits(wall_s=20))
    assert result["statuses"]["passed"] == len(chosen), result["problems"]
    assert result["pass@k"]["pass@1"]["value"] == 1.0 and result["pass@k"]["pass@1"]["stderr"] == 0.0
    assert result["unrunnable"] == {}  # their imports need nothing missing

    problem = problems["convert-date-to-binary"]
    wrong = run_program(build_test_program(problem, solution("return date")), Limits(wall_s=20))
    assert wrong.status == "failed" and wrong.detail.startswith("AssertionError")
    early_exit = run_program(build_test_program(problem, solution("return date", preamble="import sys\nsys.exit(0)")))
    assert early_exit.status == "failed" and "before its end" in early_exit.detail  # exit 0 is not a pass


def test_hanging_samples_time_out_within_their_limit_and_the_batch_goes_on(problems):
    problem = problems["convert-date-to-binary"]
    samples = [problem.reference, solution("while True:\n    pass"), solution("import time\ntime.sleep(1000)"),
               solution("return ''")]
    limits = Limits(wall_s=2)
    start = time.monotonic()
    result = score_samples([problem], {problem.task_id: samples}, ks=(1, 2), limits=limits, workers=2)
    runs = result["problems"][0]["samples"]
    assert [r["status"] for r in runs] == ["passed", "timeout", "timeout", "failed"]
    assert all(limits.wall_s <= r["seconds"] < limits.wall_s + SLACK_S for r in runs[1:3])
    assert time.monotonic() - start < 2 * (limits.wall_s + SLACK_S)  # two workers: the hangs ran side by side
    assert result["problems"][0]["passed"] == 1 and result["samples"] == 4
    assert result["statuses"] == {"passed": 1, "failed": 1, "timeout": 2, "memory": 0, "error": 0}
    assert result["pass@k"]["pass@1"]["value"] == pytest.approx(0.25)
    assert result["pass@k"]["pass@2"]["value"] == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert not leftovers()


@pytest.mark.parametrize("hog", ["x = bytearray(4 * 2**30)",
                                 "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))"])
def test_a_memory_hog_fails_as_memory_well_within_its_limits(problems, hog):
    result = run_program(build_test_program(problems["convert-date-to-binary"], solution(hog)),
                         Limits(wall_s=20, memory_mb=512))
    assert result.status == "memory" and "MemoryError" in result.detail
    assert result.seconds < 10  # stopped by the address-space limit (512 MiB of 4 GiB), not the clock
    assert not leftovers()


def test_a_fork_bomb_fails_and_leaves_no_process_behind(problems):
    problem = problems["convert-date-to-binary"]
    for bomb in ("import os\nwhile True:\n    os.fork()", "import subprocess\nsubprocess.run(['sh', '-c', ':'])"):
        result = run_program(build_test_program(problem, solution(bomb)), Limits(wall_s=5))
        assert result.status == "failed" and "sandbox: this program may not" in result.detail
    # Past the Python guard (ctypes' fork), only the kernel's process limit and the kills after the run stand.
    if isolation().processes == "python-guard":
        pytest.skip("root without a droppable uid: RLIMIT_NPROC does not bind root, only the Python guard does")
    bomb = "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()"
    result = run_program(build_test_program(problem, solution(bomb)), Limits(wall_s=2, python_guards=False))
    assert result.status == "timeout" and result.seconds < 2 + SLACK_S
    assert not leftovers()


def test_the_network_is_out_of_reach():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).sendall(b'leak')\n"
    try:
        result = run_program(program, Limits(wall_s=10))
        assert result.status == "failed", result
        assert ("Network is unreachable" in result.detail if isolation().network != "python-guard"
                else "may not import socket" in result.detail)
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing came through
    finally:
        listener.close()


def test_files_a_sample_writes_stay_in_its_throwaway_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    program = ("import os, tempfile\nopen('left-behind.txt', 'w').write('x')\ntempfile.mkstemp()\n"
               "raise RuntimeError(os.getcwd() + ' ' + tempfile.gettempdir())\n")
    result = run_program(program, Limits(wall_s=10))
    assert result.status == "failed"
    workdir, tempdir = result.detail.removeprefix("RuntimeError: ").split()
    assert tempdir == workdir and MARKER in workdir
    assert not os.path.exists(workdir) and not os.path.exists(os.path.dirname(workdir))  # removed after the run
    assert list(tmp_path.iterdir()) == []


def test_pass_at_k_equals_enumeration_over_subsets():
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets), abs=1e-12)
    assert pass_at_k(200, 0, 100) == 0.0 and 0 < pass_at_k(1000, 1, 1) < 0.002  # large n: no overflow
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_prompt_program_extraction_and_problem_loading(problems, tmp_path):
    problem = problems["convert-date-to-binary"]
    prompt = build_prompt(problem)
    assert problem.description in prompt and f"```python\n{problem.starter_code}\n```" in prompt
    fenced = ("Here:\n```python\nclass Solution:\n    pass\n```\nUsage:\n```python\nprint(Solution())\n```\n")
    assert extract_program(fenced, problem) == "class Solution:\n    pass\n"
    assert extract_program("```py\nx = 1\n", problem) == "x = 1\n"  # cut off before its closing fence
    assert extract_program("class Solution: pass", problem) == "class Solution: pass"
    assert "check(Solution().convertDateToBinary)" in build_test_program(problem, "x = 1")

    assert len(problems) == 228
    late = load_problems(after="2025-01-01", limit=3)
    assert len(late) == 3 and all(p.date > "2025-01-01" for p in late)
    rows = [{"task_id": "t", "problem_description": "d", "starter_code": "s", "prompt": "", "entry_point": "e",
             "test": "t"}]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"mine.jsonl:1: missing field\(s\) prompt"):
        load_problems(tmp_path / "mine.jsonl")


def test_the_tiny_model_s_samples_are_generated_and_scored(tiny_llama, problems, tmp_path):
    """Random weights write gibberish: what is checked is the accounting, not a pass rate."""
    chosen = [problems["number-of-subsequences-with-odd-sum"], problems["find-the-key-of-the-numbers"]]
    sampling = {"max_tokens": 16, "seed": 7}
    result = evaluate_code(tiny_llama, problems=chosen, n=2, ks=(1, 2), sampling=sampling, limits=Limits(wall_s=10),
                           device="cpu")
    assert result["samples"] == 4 and sum(result["statuses"].values()) == 4 and result["unrunnable"] == {}
    assert [(q["task_id"], q["n"], len(q["samples"])) for q in result["problems"]] == \
        [(p.task_id, 2, 2) for p in chosen]
    assert all(isinstance(s["completion"], str) and s["status"] in result["statuses"]
               for q in result["problems"] for s in q["samples"])
    assert set(result["pass@k"]) == {"pass@1", "pass@2"} and 0 <= result["pass@k"]["pass@2"]["value"] <= 1
    assert result["chat"] is True and result["sampling"]["seed"] == 7 and result["isolation"]
    again = generate_samples(load_code_engine(tiny_llama, device="cpu")[0], chosen, 2, sampling)
    assert again["completions"] == {q["task_id"]: [s["completion"] for s in q["samples"]] for q in result["problems"]}

    # Adapters: a soft prompt becomes the engine's prefix; a LoRA adapter is merged into the weights.
    import torch
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    for name, config in (("soft", PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)),
                         ("lora", LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj"]))):
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(tmp_path / name)
        engine, prefix = load_code_engine(tiny_llama, str(tmp_path / name), device="cpu")
        assert (prefix.shape == (4, engine.hidden_size)) if name == "soft" else prefix is None
        assert type(engine.model).__name__ == "LlamaForCausalLM"
        out = generate_samples(engine, chosen[:1], 2, sampling, prefix)
        assert len(out["completions"][chosen[0].task_id]) == 2
