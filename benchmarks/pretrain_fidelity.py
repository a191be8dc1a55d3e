"""Method fidelity of TRAIT's stage-1 continual pretraining and of CRAFT's LoRA SFT on a real model (SmolLM2-135M);
docs/fidelity.md records what it printed.

1. Selection (TRAIT's claim): `select` picks biomedical documents out of a general pool (300 abstracts as seeds, the
   other abstracts hidden among 9,590 general web documents, keep fraction at their share); then the same number of
   steps (the same token budget) of `pretrain` from SmolLM2 on
   - `selected`: select's output,
   - `random`: documents sampled at random from the same pool (the cheap baseline one setting away),
   - `selected+replay`: select's output with general text replayed at 25% of the tokens,
   each scored every few steps on held-out abstracts (never in the pool) and held-out general text. The claim: the
   selected data lowers biomedical perplexity more than random data, and replay bounds the rise of general-text
   perplexity. Forgetting needs a budget that moves the model: `--arms selected,selected+replay --lr 5e-4
   --steps 48` compares the two over a longer, faster run.
2. LoRA SFT on CRAFT samples (`finetune --preset craft`): CRAFT's 32 biology few-shots (multiple choice, answer
   letters), then accuracy on 144 held-out MMLU biology questions (the letter with the highest log-probability after
   the chat prompt), base against adapted.

    python benchmarks/pretrain_fidelity.py --steps 16
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py is named like the stdlib module `select`: this folder goes last on the import path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE] + [HERE]

import argparse
import gzip
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
LETTERS = "ABCD"


def read_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def run(cmd: list[str], log: Path) -> float:
    began = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - began


def build_data(work: Path) -> dict:
    medical = read_gz(DATA / "medical_abstracts.jsonl.gz")
    general = read_gz(DATA / "general_pool.jsonl.gz")
    random.Random(0).shuffle(medical)
    random.Random(1).shuffle(general)
    seeds, heldout_medical, hidden = medical[:300], medical[300:400], medical[400:]
    heldout_general, pool_general = general[:200], general[200:]
    pool = [{"id": r["id"], "text": r["text"]} for r in hidden + pool_general]
    random.Random(2).shuffle(pool)
    return {
        "seeds": write_jsonl(work / "seeds.jsonl", [{"id": r["id"], "text": r["text"]} for r in seeds]),
        "pool": write_jsonl(work / "pool" / "pool.jsonl", pool),
        "random": write_jsonl(work / "random.jsonl", random.Random(3).sample(pool, len(hidden))),
        "general": write_jsonl(work / "general.jsonl", [{"text": r["text"]} for r in pool_general[:3000]]),
        "eval_medical": write_jsonl(work / "eval_medical.jsonl", [{"text": r["text"]} for r in heldout_medical]),
        "eval_general": write_jsonl(work / "eval_general.jsonl", [{"text": r["text"]} for r in heldout_general]),
        "hidden_ids": {r["id"] for r in hidden}, "keep_fraction": len(hidden) / len(pool),
    }


def pretrain_recipe(run_dir: Path, data: list[str], model: str, data_files: dict, steps: int, replay: float,
                    block: int, eval_blocks: int, lr: float = 1e-4, eval_every: int | None = None) -> dict:
    stage = {"name": "knowledge", "data": data,
             "replay": [{"share": replay, "files": [data_files["general"]]}] if replay else []}
    return {"run_dir": str(run_dir), "pretrain": {
        "model": model, "block_size": block, "stages": [stage],
        "eval": {"domain": [data_files["eval_medical"]], "general": [data_files["eval_general"]],
                 "max_blocks": eval_blocks},
        "training": {"max_steps": steps, "batch_size": 4, "lr": lr, "warmup_steps": 2,
                     "eval_every": eval_every or max(1, steps // 2),
                     "checkpoint_every": steps, "log_every": 2, "cpus_per_worker": os.cpu_count() or 1}}}


def mc_accuracy(model_dir: str, adapter: str | None, questions: list[dict]) -> float:
    """Share of questions whose answer letter has the highest log-probability as the assistant's first token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    letter_ids = [tokenizer(letter, add_special_tokens=False).input_ids[0] for letter in LETTERS]
    right = 0
    with torch.no_grad():
        for q in questions:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": q["instruction"]}], tokenize=False,
                                                   add_generation_prompt=True)
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
            logits = model(input_ids=ids).logits[0, -1, letter_ids[:len(q["choices"])]]
            right += int(int(logits.argmax()) == q["answer"])
    return right / len(questions)


def mmlu_questions() -> list[dict]:
    rows = [json.loads(line) for line in open(REPO / "examples" / "data" / "eval_bioqa.jsonl", encoding="utf-8")]
    out = []
    for r in rows:
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(r["choices"]))
        out.append({"instruction": f"{r['question']}\n{options}\nAnswer with the letter of the correct option.",
                    "choices": r["choices"], "answer": r["answer"] if isinstance(r["answer"], int)
                    else LETTERS.index(r["answer"])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--sft-steps", type=int, default=24)
    parser.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks of each set scored")
    parser.add_argument("--arms", default="selected,random,selected+replay",
                        help="pretraining arms to run, of selected, random, selected+replay")
    parser.add_argument("--lr", type=float, default=1e-4, help="pretraining's peak learning rate")
    parser.add_argument("--replay-share", type=float, default=0.25, help="the selected+replay arm's general share")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default half)")
    parser.add_argument("--skip", choices=("pretrain", "sft"), default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    from domainsynth.actors.smollm2 import resolve_model

    model = resolve_model(args.model)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fidelity-pretrain-"))
    work.mkdir(parents=True, exist_ok=True)
    files = build_data(work)
    cli = [sys.executable, "-m", "domainsynth.cluster.cli"]

    if args.skip != "pretrain":
        seconds = run(cli + ["select", "--in-domain", files["seeds"], "--corpus", str(work / "pool"), "--out",
                             str(work / "select-run"), "--keep-fraction", f"{files['keep_fraction']:.4f}",
                             "--quality", "none"], work / "select.log")
        import pyarrow.dataset as pads

        kept = pads.dataset(str(work / "select-run" / "select" / "data"), format="parquet").to_table(
            columns=["id"]).column("id").to_pylist()
        precision = sum(i in files["hidden_ids"] for i in kept) / len(kept)
        print(f"select: {len(kept):,} documents kept of {len(files['hidden_ids']) + 9390:,} (precision "
              f"{precision:.3f} against the hidden abstracts), {seconds:.0f}s", flush=True)
        selected = str(work / "select-run" / "select" / "data")
        arms = {"selected": ([selected], 0.0), "random": ([files["random"]], 0.0),
                "selected+replay": ([selected], args.replay_share)}
        results = {}
        for name in args.arms.split(","):
            data, replay = arms[name]
            recipe = work / f"{name}.yaml"
            recipe.write_text(yaml.safe_dump(pretrain_recipe(work / f"run-{name}", data, model, files, args.steps,
                                                             replay, args.block_size, args.eval_blocks, args.lr,
                                                             args.eval_every)))
            seconds = run(cli + ["run", str(recipe)], work / f"{name}.log")
            report = json.loads((work / f"run-{name}" / "pretrain" / "report.json").read_text())
            results[name] = report["perplexity"]
            d, g = report["perplexity"]["domain"], report["perplexity"]["general"]
            print(f"{name}: {args.steps} steps of {4 * args.block_size} tokens (lr {args.lr:g}) in {seconds:.0f}s; "
                  f"held-out "
                  f"biomedical perplexity {d[0][1]:.2f} -> {d[-1][1]:.2f} ({d[-1][1] / d[0][1] - 1:+.1%}), general "
                  f"{g[0][1]:.2f} -> {g[-1][1]:.2f} ({g[-1][1] / g[0][1] - 1:+.1%}); replay "
                  f"{report['mixes']['knowledge']['replay_share']:.1%}; general perplexity by step "
                  f"{', '.join(f'{int(step)}: {value:.2f}' for step, value in g)}; biomedical by step "
                  f"{', '.join(f'{int(step)}: {value:.2f}' for step, value in d)}", flush=True)
        (work / "pretrain_results.json").write_text(json.dumps(results, indent=1))

    if args.skip != "sft":
        shots = [json.loads(line) for line in open(DATA / "craft_bioqa_fewshot.jsonl", encoding="utf-8")]
        samples = write_jsonl(work / "craft_samples.jsonl", [{"id": f"s{i}", "instruction": s["Instruction"],
                                                              "output": s["Output"]} for i, s in enumerate(shots)])
        seconds = run(cli + ["finetune", "--data", samples, "--model", model, "--out", str(work / "sft-run"),
                             "--preset", "craft", "--max-steps", str(args.sft_steps), "--set",
                             "finetune.validation_fraction=0", "--set",
                             f"finetune.training.cpus_per_worker={os.cpu_count() or 1}", "--set",
                             "finetune.training.batch_size=4", "--set", "finetune.max_length=512"],
                      work / "sft.log")
        questions = mmlu_questions()
        base = mc_accuracy(model, None, questions)
        tuned = mc_accuracy(model, str(work / "sft-run" / "finetune" / "adapter"), questions)
        report = json.loads((work / "sft-run" / "finetune" / "report.json").read_text())
        print(f"finetune (craft preset, {len(shots)} CRAFT biology few-shots, {args.sft_steps} steps, {seconds:.0f}s, "
              f"loss {report['final_loss']:.3f}): MMLU biology accuracy on {len(questions)} questions: base "
              f"{base:.3f}, LoRA {tuned:.3f} ({tuned - base:+.3f}); chance 0.25", flush=True)


if __name__ == "__main__":
    main()
