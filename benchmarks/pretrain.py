"""Benchmark: continual pretraining through our stack (`domainsynth pretrain`: Ray Data tokenising and packing, a Ray
Train worker, DeepSpeed ZeRO-2 or DDP through the Hugging Face integration, checkpoints, metrics and report) against
what a user would write without it (one process, a plain Hugging Face Trainer), on the same model, the same packed
blocks (the ones our stage wrote), settings and CPUs, in the same run.

Documents are the bundled biomedical abstracts. The model is SmolLM2 unless --model names another (the tiny Llama
with --model tiny). Prints tokens per second for both and their ratio, end to end (model loading, and for ours Ray's
start-up and the packing, included) and training alone, with the peak memory of each process tree.

    python benchmarks/pretrain.py --model smollm2 --steps 48
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py is named like the stdlib module `select`: this folder goes last on the import path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE] + [HERE]

import argparse
import glob
import gzip
import json
import tempfile
from pathlib import Path

from common import timed

REPO = Path(__file__).resolve().parent.parent
ABSTRACTS = REPO / "tests" / "data" / "medical_abstracts.jsonl.gz"

# What a user writes with transformers alone: the packed blocks as a list, one Trainer in one process (torch's
# default threads: every CPU), the same optimizer, schedule and batch, and the model saved at the end.
BASELINE = """
import glob, json, sys, time
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator
files = sorted(glob.glob(sys.argv[1] + "/*.parquet"))
s, model_dir, out = json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
blocks = [ids for f in files for ids in pq.read_table(f, columns=["input_ids"]).column("input_ids").to_pylist()]
data = [{"input_ids": torch.tensor(b), "labels": torch.tensor(b)} for b in blocks]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
args = TrainingArguments(output_dir=out, max_steps=s["steps"], per_device_train_batch_size=s["batch_size"],
                         learning_rate=s["lr"], lr_scheduler_type="cosine", warmup_steps=s["warmup"],
                         logging_steps=10, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                         use_cpu=True)
trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
began = time.perf_counter()
result = trainer.train()
seconds = time.perf_counter() - began  # the wall time of train(), as the stage's train_wall_seconds
trainer.save_model(out)
print(json.dumps({"seconds": seconds, "loss": result.training_loss}))
"""


def write_documents(path: Path, count: int) -> None:
    with gzip.open(ABSTRACTS, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:count]
    with open(path, "w", encoding="utf-8") as out:
        out.writelines(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny (the tiny Llama, made here) or a folder")
    parser.add_argument("--steps", type=int, default=48, help="about five minutes of training here with SmolLM2")
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=50, help="the stage's default (the baseline saves "
                        "no checkpoint)")
    parser.add_argument("--strategy", default="deepspeed", choices=("deepspeed", "ddp"))
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pretrain-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model == "tiny":
        from domainsynth.actors.tiny_models import make_tiny_llama

        model = str(make_tiny_llama(work / "tiny-llama"))
    from domainsynth.actors.smollm2 import resolve_model

    model = resolve_model(model)  # smollm2 becomes its folder (converted now, outside both timings)
    documents = work / "documents.jsonl"
    write_documents(documents, args.documents)
    cpus = os.cpu_count() or 1
    tokens = args.steps * args.batch_size * args.block_size
    print(f"{args.documents} abstracts, blocks of {args.block_size}, batch {args.batch_size}, {args.steps} steps "
          f"({tokens:,} tokens), full parameters, model {model}; {cpus} CPUs", flush=True)

    run = work / "run"
    cmd = [sys.executable, "-m", "domainsynth.cluster.cli", "pretrain", "--data", str(documents), "--model", model,
           "--out", str(run), "--max-steps", str(args.steps), "--workers", "1",
           "--set", f"pretrain.block_size={args.block_size}", "--set", f"pretrain.training.cpus_per_worker={cpus}",
           "--set", f"pretrain.training.batch_size={args.batch_size}", "--set", "pretrain.training.lr=5e-5",
           "--set", "pretrain.training.warmup_steps=4", "--set", f"pretrain.training.strategy={args.strategy}",
           "--set", f"pretrain.training.checkpoint_every={args.checkpoint_every}",
           "--set", f"pretrain.training.eval_every={10 * args.steps}", "--set", "pretrain.eval.max_blocks=8"]
    stage_s, stage_peak, _ = timed(cmd)
    history = [json.loads(line) for line in open(run / "pretrain" / "pretrain" / "metrics.jsonl", encoding="utf-8")]
    train_s = next(h["train_wall_seconds"] for h in history if "train_wall_seconds" in h)
    print(f"domainsynth pretrain (1 Ray Train worker x {cpus} CPUs, {args.strategy}): {stage_s:.1f}s end to end "
          f"incl. Ray start-up and packing, {tokens / stage_s:,.1f} tokens/s; training alone "
          f"{tokens / train_s:,.1f} tokens/s ({train_s:.1f}s); peak RSS of the process tree {stage_peak:,.0f} MiB",
          flush=True)

    [packed] = glob.glob(str(run / "pretrain" / "packed" / "*" / "pretrain"))
    settings = {"steps": args.steps, "batch_size": args.batch_size, "lr": 5e-5, "warmup": 4}
    base_s, base_peak, out = timed([sys.executable, "-c", BASELINE, packed, json.dumps(settings), model,
                                    str(work / "baseline-model")])
    base = json.loads(out.strip().splitlines()[-1])
    print(f"baseline (plain Hugging Face Trainer, 1 process, torch's default threads, same blocks): {base_s:.1f}s "
          f"end to end, {tokens / base_s:,.1f} tokens/s; training alone {tokens / base['seconds']:,.1f} tokens/s "
          f"({base['seconds']:.1f}s); peak RSS {base_peak:,.0f} MiB")
    print(f"ratio, end to end (stage tokens/s / baseline tokens/s): {base_s / stage_s:.2f}x")
    print(f"ratio, training alone: {base['seconds'] / train_s:.2f}x")
    print(f"peak memory ratio (stage / baseline): {stage_peak / base_peak:.2f}x")


if __name__ == "__main__":
    main()
