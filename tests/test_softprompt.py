"""DOMINO's soft-prompt learning (pipelines/training/softprompt.py) on a real local Ray with 2 Ray Train workers and
the tiny Llama: both objectives learn (the loss falls), DDP and DeepSpeed ZeRO-2 and ZeRO-3 take the same steps, the
output is a PEFT prompt-tuning folder that PEFT and our engine read alike, malformed references are quarantined, bad
settings fail before any training, a run interrupted with Ctrl-C resumes from its checkpoint to the Z an
uninterrupted run reaches, and a worker killed mid-run is restarted from the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from domainsynth.actors.soft_prompt import load_soft_prompt
from domainsynth.pipelines.recipe import RecipeError, build_recipe
from domainsynth.pipelines.rundir import StageError
from domainsynth.pipelines.runner import run_recipe

from conftest import DATA, local_progress, read_jsonl_gz, run_killing_rank0, write_jsonl

NUM_TOKENS, PRIVATE_TOKENS = 8, 4


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> str:
    """12 abstracts (cut to 300 characters) and one line that is not JSON."""
    path = tmp_path_factory.mktemp("refs") / "references.jsonl"
    write_jsonl(path, [{"id": r["id"], "text": r["text"][:300]}
                       for r in read_jsonl_gz(DATA / "medical_abstracts.jsonl.gz")[:12]])
    with open(path, "a", encoding="utf-8") as f:
        f.write("{not json\n")
    return str(path)


def settings(references: str, model: str, **overrides) -> dict:
    base = {"references": references, "model": model, "num_tokens": NUM_TOKENS, "max_steps": 24, "batch_size": 3,
            "max_length": 48, "workers": 2, "strategy": "ddp", "checkpoint_every": 8, "log_every": 8, "lr": 0.02}
    if overrides.get("objective", "domino") == "domino":
        base["private_tokens"] = PRIVATE_TOKENS
    return {**base, **overrides}


def train(run_dir, **section) -> dict:
    recipe = build_recipe({"run_dir": str(run_dir), "softprompt": section}, "test", "/")
    return run_recipe(recipe, echo=lambda _: None)["softprompt"]


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "softprompt", "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def falls(losses: list[float]) -> bool:
    """The last quarter's mean loss is below the first quarter's."""
    q = max(1, len(losses) // 4)
    return np.mean(losses[-q:]) < np.mean(losses[:q])


@pytest.fixture(scope="module")
def domino_run(ray_local, tmp_path_factory, references, tiny_llama):
    run_dir = tmp_path_factory.mktemp("domino")
    return run_dir, train(run_dir, **settings(references, tiny_llama))


def test_domino_learns_and_accounts_for_every_reference(domino_run):
    run_dir, report = domino_run
    assert report["rows_in"] == 13 and report["rows_out"] == 12 and report["rows_quarantined"] == 1
    quarantined = [json.loads(line) for line in open(run_dir / "softprompt" / "quarantine.jsonl")]
    assert [(q["file"], q["line"]) for q in quarantined] == [("references.jsonl", 13)]
    assert "JSON" in quarantined[0]["reason"], quarantined
    steps = metrics(run_dir)
    assert [m["step"] for m in steps] == list(range(1, 25)) and report["steps"] == 24
    assert falls([m["loss"] for m in steps]) and falls([m["loss_suf"] for m in steps])
    assert all(np.isfinite(m["loss_con"]) and m["loss_con"] >= 0 for m in steps)
    assert (run_dir / "softprompt" / "loss.png").stat().st_size > 5000
    from safetensors.numpy import load_file

    private = load_file(str(run_dir / "softprompt" / "private_prompts.safetensors"))["private_prompts"]
    assert private.shape == (12, PRIVATE_TOKENS, 128)


def test_the_soft_prompt_is_a_peft_folder_that_peft_and_our_engine_read_alike(domino_run, tiny_llama):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from domainsynth.actors.engines import load_engine

    run_dir, _ = domino_run
    folder = str(run_dir / "softprompt" / "soft_prompt")
    config = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == NUM_TOKENS
    prefix = load_soft_prompt(folder)
    assert prefix.shape == (NUM_TOKENS, 128)
    engine = load_engine(tiny_llama, "transformers", torch_threads=1)
    ids = engine.tokenizer("the patients were treated", return_tensors="pt").input_ids
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), folder).eval()
        by_peft = peft_model(input_ids=ids).logits[:, -ids.shape[1]:]
        embedded = engine.model.get_input_embeddings()(ids)
        by_engine = engine.model(inputs_embeds=torch.cat([torch.as_tensor(prefix)[None], embedded], 1)).logits
    torch.testing.assert_close(by_peft, by_engine[:, -ids.shape[1]:], rtol=1e-4, atol=1e-4)
    # And it is no longer where it started: training moved Z.
    assert not np.allclose(prefix, 0)


def test_direct_on_deepspeed_zero2_takes_the_steps_ddp_takes(ray_local, tmp_path, references, tiny_llama):
    """The Direct-Domain baseline (no private prompts) on DeepSpeed ZeRO-2 and on DDP: the loss falls, and both
    strategies compute the same steps (float noise apart)."""
    runs = {}
    for strategy in ("deepspeed", "ddp"):
        report = train(tmp_path / strategy, **settings(references, tiny_llama, objective="direct", strategy=strategy,
                                                        max_steps=12))
        assert report["strategy"] == strategy and not (tmp_path / strategy / "softprompt" /
                                                       "private_prompts.safetensors").exists()
        runs[strategy] = [m["loss"] for m in metrics(tmp_path / strategy)]
    assert falls(runs["deepspeed"])
    np.testing.assert_allclose(runs["deepspeed"], runs["ddp"], rtol=1e-3)


def test_domino_on_deepspeed_zero3_takes_the_steps_ddp_takes_and_saves_z_whole(domino_run, tmp_path, references,
                                                                              tiny_llama):
    """ZeRO-3 partitions Z (and the frozen LM) across the 2 workers: the steps are DDP's (the module fixture's run,
    same settings), and the saved Z and private table are whole — gathered, not rank 0's partition."""
    from safetensors.numpy import load_file

    ddp_dir, _ = domino_run
    report = train(tmp_path, **settings(references, tiny_llama, strategy="deepspeed",
                                        deepspeed={"zero_stage": 3}))
    assert report["zero_stage"] == 3 and report["steps"] == 24
    np.testing.assert_allclose([m["loss"] for m in metrics(tmp_path)], [m["loss"] for m in metrics(ddp_dir)],
                               rtol=1e-3)
    z3, ddp = load_soft_prompt(str(tmp_path / "softprompt" / "soft_prompt")), \
        load_soft_prompt(str(ddp_dir / "softprompt" / "soft_prompt"))
    assert z3.shape == ddp.shape == (NUM_TOKENS, ddp.shape[1])
    np.testing.assert_allclose(z3, ddp, atol=1e-5)
    tables = [load_file(str(d / "softprompt" / "private_prompts.safetensors"))["private_prompts"]
              for d in (tmp_path, ddp_dir)]
    np.testing.assert_allclose(tables[0], tables[1], atol=1e-5)


def test_bad_settings_fail_before_any_training(ray_local, tmp_path, references, tiny_llama):
    with pytest.raises(RecipeError, match="private_tokens: the direct objective has no private prompts"):
        train(tmp_path / "a", **settings(references, tiny_llama, objective="direct", private_tokens=4))
    with pytest.raises(StageError, match=r"softprompt.workers: 3 workers x 1 CPUs need 3 CPUs, the cluster has 2"):
        train(tmp_path / "b", **settings(references, tiny_llama, workers=3))
    assert not (tmp_path / "b" / "softprompt" / "ray").exists()


def cli(run_dir, references, model, *extra) -> list[str]:
    sets = [f"softprompt.{k}={v}" for k, v in settings(references, model, max_steps=60, checkpoint_every=10,
                                                        workers=1).items()
            if k not in ("references", "model", "workers", "max_steps")]
    return [sys.executable, "-m", "domainsynth.cluster.cli", "softprompt", "--references", references, "--model",
            model, "--out", str(run_dir), "--workers", "1", "--max-steps", "60", "--num-cpus", "2",
            *[a for s in sets for a in ("--set", s)], *extra]


def test_an_interrupted_run_resumes_to_the_soft_prompt_an_uninterrupted_run_learns(tmp_path, references,
                                                                                  tiny_llama):
    """Ctrl-C (SIGINT) once the first checkpoints exist; the same command again resumes from the latest and ends
    with Z equal to that of a run never interrupted (each run is its own process with its own local Ray)."""
    interrupted = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cli(interrupted, references, tiny_llama), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    checkpoints = interrupted / "softprompt" / "ray"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if any(len(list(run.glob("checkpoint_*"))) >= 2 for run in checkpoints.glob("softprompt-*")):
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-2000:]
    assert "training resumes from its latest checkpoint" in output
    assert not (interrupted / "softprompt" / "soft_prompt").exists()  # nothing that passes for the output

    resumed = subprocess.run(cli(interrupted, references, tiny_llama, "-v"), env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[softprompt] resumed from step" in resumed.stdout + resumed.stderr
    straight = tmp_path / "straight"
    whole = subprocess.run(cli(straight, references, tiny_llama), env=env, capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert [m["step"] for m in metrics(interrupted)] == list(range(1, 61))
    np.testing.assert_allclose(load_soft_prompt(str(interrupted / "softprompt" / "soft_prompt")),
                               load_soft_prompt(str(straight / "softprompt" / "soft_prompt")), rtol=1e-5, atol=1e-6)


def test_domino_synthesis_in_the_same_recipe_samples_from_the_learned_soft_prompt(domino_run, references,
                                                                                   tiny_llama):
    """softprompt + synthesize --method domino in one recipe: synthesize's soft prompt defaults to what softprompt
    writes (not there yet at preflight), and the finished softprompt stage is skipped on the rerun."""
    from domainsynth.pipelines.runner import preflight

    run_dir, _ = domino_run
    raw = {"run_dir": str(run_dir), "softprompt": settings(references, tiny_llama),
           "synthesize": {"method": "domino", "model": tiny_llama, "domino": {"num_samples": 4, "min_input_chars": 1},
                          "sampling": {"max_tokens": 8, "seed": 0}}}
    recipe = build_recipe(raw, "test", "/")
    assert recipe.synthesize.domino.soft_prompt == str(run_dir / "softprompt" / "soft_prompt")
    preflight(build_recipe({**raw, "run_dir": str(run_dir / "elsewhere")}, "test", "/"))  # nothing there yet
    said = []
    reports = run_recipe(recipe, echo=said.append)
    assert any(line.startswith("[softprompt] already complete") for line in said)
    assert reports["synthesize"]["rows_in"] == 4
    assert reports["synthesize"]["soft_prompt"] == str(run_dir / "softprompt" / "soft_prompt")


def test_domino_synthesis_without_a_soft_prompt_or_a_softprompt_section_is_refused(tiny_llama, tmp_path):
    with pytest.raises(RecipeError, match="synthesize.domino.soft_prompt: required unless the recipe has a "
                                          "softprompt section"):
        build_recipe({"run_dir": str(tmp_path), "synthesize": {"method": "domino", "model": tiny_llama}}, "t", "/")


def test_a_worker_killed_mid_run_is_restarted_from_the_last_checkpoint(ray_local, tmp_path, references, tiny_llama):
    """SIGKILL to rank 0 (its pid from the progress file it writes) after its first checkpoint: Ray Train restarts
    the worker group from the latest checkpoint and the run ends at exactly the planned steps, each once."""
    run_dir = tmp_path / "run"
    section = settings(references, tiny_llama, max_steps=120, checkpoint_every=10, log_every=5)
    recipe = build_recipe({"run_dir": str(run_dir), "softprompt": section}, "test", "/")
    read_progress = local_progress(run_dir / "softprompt" / "progress.json")
    outcome, said = run_killing_rank0(recipe, read_progress, at_step=15)
    assert outcome["softprompt"]["steps"] == 120
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 121))
    resumed = [line for line in said if "resumed from step" in line]
    assert resumed and int(resumed[0].split("resumed from step ")[1].split()[0]) >= 10, said[-5:]
