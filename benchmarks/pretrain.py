"""Benchmark: continual pretraining through our stack (`domainsynth pretrain`: Ray Data tokenising and packing, a Ray
Train worker, the Hugging Face Trainer with the strategy the stage picks (auto: DDP on CPU workers, DeepSpeed on
GPUs), held-out perplexity before the first step and after the last, metrics and report) against what a user would
write without it (one process, a plain Hugging Face Trainer, the same evaluations), on the same model, the same
packed blocks (the ones our stage wrote), settings and CPUs, in the same run.

Documents are the bundled biomedical abstracts. The model is SmolLM2 unless --model names another (the tiny Llama
with --model tiny). Prints tokens per second for both and their ratio, end to end (model loading, and for ours Ray's
start-up and the packing, included) and training alone, with the peak memory of each process tree. The machine's
speed drifts by several percent from minute to minute, so --repeats runs the pair that many times, alternating
which side goes first, and the median of the pairs' ratios is the figure.

    python benchmarks/pretrain.py --model smollm2 --steps 64 --repeats 2
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
import statistics
import tempfile
from pathlib import Path

from common import timed

REPO = Path(__file__).resolve().parent.parent
ABSTRACTS = REPO / "tests" / "data" / "medical_abstracts.jsonl.gz"

# What a user writes with transformers alone: the packed blocks as a list, one Trainer in one process (torch's
# default threads: every CPU), the same optimizer, schedule and batch, held-out perplexity on the same blocks before
# the first step and after the last (as the stage does), and the model saved at the end.
BASELINE = """
import glob, json, math, sys, time
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator
def blocks(folder):
    files = sorted(glob.glob(folder + "/*.parquet"))
    ids = [b for f in files for b in pq.read_table(f, columns=["input_ids"]).column("input_ids").to_pylist()]
    return [{"input_ids": torch.tensor(b), "labels": torch.tensor(b)} for b in ids]
s, model_dir, out = json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
if s["threads"]:
    torch.set_num_threads(s["threads"])
data, held_out = blocks(sys.argv[1]), blocks(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
args = TrainingArguments(output_dir=out, max_steps=s["steps"], per_device_train_batch_size=s["batch_size"],
                         per_device_eval_batch_size=s["batch_size"], learning_rate=s["lr"],
                         lr_scheduler_type="cosine", warmup_steps=s["warmup"], logging_steps=10,
                         eval_strategy="steps", eval_steps=s["steps"], eval_on_start=True, save_strategy="no",
                         report_to=[], disable_tqdm=True, seed=0, use_cpu=True)
trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=held_out,
                  data_collator=default_data_collator)
began = time.perf_counter()
result = trainer.train()
seconds = time.perf_counter() - began  # the wall time of train(), as the stage's train_wall_seconds
trainer.save_model(out)
perplexity = [math.exp(h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]
print(json.dumps({"seconds": seconds, "loss": result.training_loss, "perplexity": perplexity}))
"""


def write_documents(path: Path, count: int) -> None:
    with gzip.open(ABSTRACTS, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:count]
    with open(path, "w", encoding="utf-8") as out:
        out.writelines(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny (the tiny Llama, made here) or a folder")
    parser.add_argument("--steps", type=int, default=64, help="about five minutes of training here with SmolLM2")
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps between the stage's checkpoints "
                        "(default: none before the end; the baseline writes none, and a checkpoint of SmolLM2 with "
                        "its optimizer state costs about 30 s here: docs/benchmarks.md)")
    parser.add_argument("--strategy", default="auto", choices=("auto", "deepspeed", "ddp"))
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs, alternating which side goes first")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs the training uses: the worker's "
                        "cpus_per_worker and the baseline's torch threads (default: every CPU; fewer leave the "
                        "rest to Ray's own processes)")
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
    cpus = args.cpus or os.cpu_count() or 1
    tokens = args.steps * args.batch_size * args.block_size
    print(f"{args.documents} abstracts, blocks of {args.block_size}, batch {args.batch_size}, {args.steps} steps "
          f"({tokens:,} tokens), full parameters, model {model}; {cpus} CPUs; {args.repeats} pair(s) of runs",
          flush=True)

    def ours(k: int) -> dict:
        run = work / f"run-{k}"
        cmd = [sys.executable, "-m", "domainsynth.cluster.cli", "pretrain", "--data", str(documents), "--model",
               model, "--out", str(run), "--max-steps", str(args.steps), "--workers", "1",
               "--set", f"pretrain.block_size={args.block_size}", "--set", f"pretrain.training.cpus_per_worker={cpus}",
               "--set", f"pretrain.training.batch_size={args.batch_size}", "--set", "pretrain.training.lr=5e-5",
               "--set", "pretrain.training.warmup_steps=4", "--set", f"pretrain.training.strategy={args.strategy}",
               "--set", f"pretrain.training.checkpoint_every={args.checkpoint_every or args.steps}",
               "--set", f"pretrain.training.eval_every={args.steps}", "--set", "pretrain.eval.max_blocks=8"]
        seconds, peak, _ = timed(cmd)
        history = [json.loads(line) for line in open(run / "pretrain" / "pretrain" / "metrics.jsonl",
                                                     encoding="utf-8")]
        train_s = next(h["train_wall_seconds"] for h in history if "train_wall_seconds" in h)
        report = json.loads((run / "pretrain" / "report.json").read_text())
        print(f"  domainsynth pretrain (1 Ray Train worker x {cpus} CPUs, strategy {args.strategy}): {seconds:.1f}s "
              f"end to end incl. Ray start-up and packing, {tokens / seconds:,.1f} tokens/s; training alone "
              f"{tokens / train_s:,.1f} tokens/s ({train_s:.1f}s); peak RSS of the process tree {peak:,.0f} MiB; "
              f"phases {report['phases']}", flush=True)
        return {"seconds": seconds, "train": train_s, "peak": peak, "run": run}

    def baseline(run: Path) -> dict:
        [packed] = glob.glob(str(run / "pretrain" / "packed" / "*"))
        settings = {"steps": args.steps, "batch_size": args.batch_size, "lr": 5e-5, "warmup": 4,
                    "threads": args.cpus}
        seconds, peak, out = timed([sys.executable, "-c", BASELINE, f"{packed}/pretrain", f"{packed}/eval-domain",
                                    json.dumps(settings), model, str(work / "baseline-model")])
        result = json.loads(out.strip().splitlines()[-1])
        print(f"  baseline (plain Hugging Face Trainer, 1 process, {args.cpus or 'the default'} torch threads, same "
              f"blocks and evaluations): {seconds:.1f}s end to end, {tokens / seconds:,.1f} tokens/s; training alone "
              f"{tokens / result['seconds']:,.1f} tokens/s ({result['seconds']:.1f}s); peak RSS {peak:,.0f} MiB; "
              f"held-out perplexity {' -> '.join(f'{p:.2f}' for p in result['perplexity'])}", flush=True)
        return {"seconds": seconds, "train": result["seconds"], "peak": peak}

    pairs = []
    for k in range(args.repeats):
        print(f"pair {k + 1}:", flush=True)
        if k % 2 == 0:  # ours first (its packing is what the baseline reads), then the other way round
            stage = ours(k)
            base = baseline(stage["run"])
        else:
            base = baseline(pairs[0][0]["run"])
            stage = ours(k)
        pairs.append((stage, base))
        print(f"  ratio end to end {base['seconds'] / stage['seconds']:.3f}x, training alone "
              f"{base['train'] / stage['train']:.3f}x", flush=True)
    end_to_end = statistics.median(b["seconds"] / s["seconds"] for s, b in pairs)
    training = statistics.median(b["train"] / s["train"] for s, b in pairs)
    memory = statistics.median(s["peak"] / b["peak"] for s, b in pairs)
    print(f"ratio, end to end (stage tokens/s / baseline tokens/s), median of {len(pairs)}: {end_to_end:.2f}x")
    print(f"ratio, training alone: {training:.2f}x")
    print(f"peak memory ratio (stage / baseline): {memory:.2f}x")


if __name__ == "__main__":
    main()
