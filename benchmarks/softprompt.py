"""Benchmark: soft-prompt learning through our stack (`domainsynth softprompt`: Ray Data tokenisation, a Ray Train
worker group, DeepSpeed or DDP, checkpoints, metrics and report) against the loop a user would write without it (one
process, plain PyTorch: the frozen LM, Z and the private prompts as tensors, AdamW), on the same model, references,
objective, settings and CPUs, in the same run.

References are the bundled PubMedQA abstracts. The model is SmolLM2 unless --model names another (the tiny Llama
with --model tiny). Prints steps per second for both and their ratio, end to end (model loading, and for ours Ray's
start-up, included) and training alone, with the peak memory of each process tree.

    python benchmarks/softprompt.py --model smollm2 --objective domino --steps 36
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
import tempfile
from pathlib import Path

from common import timed

REPO = Path(__file__).resolve().parent.parent
ABSTRACTS = REPO / "tests" / "data" / "pubmedqa_abstracts.jsonl.gz"

# What a user writes with PyTorch and transformers alone: the same objective (methods.md §3) in one process, torch's
# default threads (every CPU), the references tokenised up front, random batches, one AdamW over Z and the table.
BASELINE = """
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
texts = [json.loads(line)["text"] for line in open(sys.argv[1], encoding="utf-8")]
s, model_dir = json.loads(sys.argv[2]), sys.argv[3]
torch.manual_seed(s["seed"])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
lm.requires_grad_(False)
embed = lm.get_input_embeddings()
samples = [ids[:s["max_length"] - 1] + [tokenizer.eos_token_id] for ids in tokenizer(texts).input_ids]
vocab = embed.weight.shape[0]
Z = torch.nn.Parameter(embed.weight[torch.randint(0, vocab, (s["num_tokens"],))].detach().clone())
params = [Z]
if s["objective"] == "domino":
    table = torch.nn.Parameter(embed.weight[torch.randint(0, vocab, (len(samples) * s["private_tokens"],))]
                               .detach().clone().view(len(samples), s["private_tokens"], -1))
    params.append(table)
optimizer = torch.optim.AdamW(params, lr=s["lr"], weight_decay=0.0)
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

def nll(prefix, ids, mask):  # token-averaged NLL of each row of ids after its prefix
    inputs = torch.cat([prefix, embed(ids)], 1)
    attention = torch.cat([torch.ones(prefix.shape[:2], dtype=mask.dtype), mask], 1)
    logits = lm(inputs_embeds=inputs, attention_mask=attention, logits_to_keep=ids.shape[1] + 1).logits[:, :-1]
    token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    return (token * mask).sum(1) / mask.sum(1)

started = time.perf_counter()
for step in range(s["steps"]):
    picked = torch.randperm(len(samples))[:s["batch_size"]].tolist()
    width = max(len(samples[i]) for i in picked)
    ids = torch.full((len(picked), width), pad)
    mask = torch.zeros((len(picked), width), dtype=torch.long)
    for row, i in enumerate(picked):
        ids[row, :len(samples[i])], mask[row, :len(samples[i])] = torch.tensor(samples[i]), 1
    B = len(picked)
    domain = Z.unsqueeze(0).expand(B, -1, -1)
    loss = nll(domain, ids, mask).mean()
    if s["objective"] == "domino":
        prefixes = torch.cat([domain, table[picked]], 1).repeat_interleave(B, 0)
        scores = -nll(prefixes, ids.repeat(B, 1), mask.repeat(B, 1)).view(B, B)
        loss = loss + s["contrastive_weight"] * (torch.logsumexp(scores, 1) - scores.diagonal()).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(json.dumps({"steps": s["steps"], "seconds": time.perf_counter() - started, "loss": float(loss)}))
"""


def write_references(path: Path, count: int) -> None:
    with gzip.open(ABSTRACTS, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:count]
    with open(path, "w", encoding="utf-8") as out:
        out.writelines(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny (the tiny Llama, made here) or a folder")
    parser.add_argument("--objective", default="domino", choices=("domino", "direct"))
    parser.add_argument("--steps", type=int, default=36, help="about five minutes of training here")
    parser.add_argument("--references", type=int, default=100)
    parser.add_argument("--num-tokens", type=int, default=16)
    parser.add_argument("--private-tokens", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="our Ray Train workers (the CPUs shared among them)")
    parser.add_argument("--strategy", default="deepspeed", choices=("deepspeed", "ddp"))
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-softprompt-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model == "tiny":
        from domainsynth.actors.tiny_models import make_tiny_llama

        model = str(make_tiny_llama(work / "tiny-llama"))
    from domainsynth.actors.smollm2 import resolve_model

    model = resolve_model(model)  # smollm2 becomes its folder (converted now, outside both timings)
    references = work / "references.jsonl"
    write_references(references, args.references)
    cpus = os.cpu_count() or 1
    settings = {"objective": args.objective, "num_tokens": args.num_tokens, "private_tokens": args.private_tokens,
                "max_length": args.max_length, "batch_size": args.batch_size, "lr": 1e-3, "contrastive_weight": 1.0,
                "steps": args.steps, "seed": 0}
    print(f"{args.references} references, {args.objective}, m {args.num_tokens}"
          f"{f', p {args.private_tokens}' if args.objective == 'domino' else ''}, max_length {args.max_length}, "
          f"batch {args.batch_size}, {args.steps} steps, model {model}; {cpus} CPUs", flush=True)

    base_s, base_peak, out = timed([sys.executable, "-c", BASELINE, str(references), json.dumps(settings), model])
    base = json.loads(out.strip().splitlines()[-1])
    print(f"baseline (plain PyTorch loop, 1 process, torch's default threads): {base_s:.1f}s end to end, "
          f"{args.steps / base_s:.4f} steps/s; training alone {args.steps / base['seconds']:.4f} steps/s "
          f"({base['seconds']:.1f}s); peak RSS {base_peak:,.0f} MiB", flush=True)

    run = work / "run"
    cmd = [sys.executable, "-m", "domainsynth.cluster.cli", "softprompt", "--references", str(references),
           "--model", model, "--out", str(run), "--objective", args.objective, "--num-tokens", str(args.num_tokens),
           "--max-steps", str(args.steps), "--workers", str(args.workers),
           "--set", f"softprompt.cpus_per_worker={cpus / args.workers:g}",
           "--set", f"softprompt.max_length={args.max_length}", "--set", f"softprompt.batch_size={args.batch_size}",
           "--set", f"softprompt.strategy={args.strategy}", "--set", "softprompt.lr=0.001"]
    if args.objective == "domino":
        cmd += ["--set", f"softprompt.private_tokens={args.private_tokens}"]
    stage_s, stage_peak, _ = timed(cmd)
    metrics = [json.loads(line) for line in open(run / "softprompt" / "metrics.jsonl", encoding="utf-8")]
    assert [m["step"] for m in metrics] == list(range(1, args.steps + 1)), "the stage did not take every step once"
    train_s = metrics[-1]["seconds"]  # the loop's own clock, from its first step to its last
    print(f"domainsynth softprompt ({args.workers} Ray Train worker(s) x {cpus / args.workers:g} CPUs, "
          f"{args.strategy}): {stage_s:.1f}s end to end incl. Ray start-up, {args.steps / stage_s:.4f} steps/s; "
          f"training alone {args.steps / train_s:.4f} steps/s ({train_s:.1f}s); peak RSS of the process tree "
          f"{stage_peak:,.0f} MiB")
    print(f"ratio, end to end (stage steps/s / baseline steps/s): {base_s / stage_s:.2f}x")
    print(f"ratio, training alone: {base['seconds'] / train_s:.2f}x")
    print(f"peak memory ratio (stage / baseline): {stage_peak / base_peak:.2f}x")


if __name__ == "__main__":
    main()
