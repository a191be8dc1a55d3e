"""Benchmark: batch generation through our stack (`domainsynth generate`: Ray Data, an actor pool of engines) against
the loop a user would write without it (transformers' `model.generate` in one process; with --engine vllm, vLLM's
`LLM.generate`), on the same prompts, batch size, sampling settings and CPUs, in the same run.

Prompts are the openings of the bundled PubMedQA abstracts. The model is the tiny Llama made here unless --model
names another (`smollm2`, or any Hugging Face causal LM folder; --engine vllm on a GPU machine). Prints generated
tokens per second for both and their ratio: end to end (model loading, and for ours Ray's start-up, included) and
generation alone.

    python benchmarks/generate.py --model smollm2 --prompts 256 --max-tokens 32
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

# What a user would write with transformers alone: the model in one process (torch's default threads: every CPU),
# left-padded batches, model.generate with the same sampling settings. Tokens are counted up to each row's EOS.
BASELINE = """
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
prompts = [json.loads(line)["prompt"] for line in open(sys.argv[1], encoding="utf-8")]
sampling, batch, model_dir = json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
torch.manual_seed(sampling["seed"])
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
tokens, started = 0, time.perf_counter()
for i in range(0, len(prompts), batch):
    inputs = tokenizer(prompts[i:i + batch], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=sampling["max_tokens"], do_sample=True, pad_token_id=pad,
                             temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"])
    for row in out[:, inputs.input_ids.shape[1]:].tolist():
        ends = [row.index(t) for t in (tokenizer.eos_token_id, pad) if t in row]
        tokens += min(ends) if ends else len(row)
print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - started}))
"""
BASELINE_VLLM = """
import json, sys, time
from vllm import LLM, SamplingParams
prompts = [json.loads(line)["prompt"] for line in open(sys.argv[1], encoding="utf-8")]
sampling, batch, model_dir = json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm, params = LLM(model_dir), SamplingParams(**sampling)
tokens, started = 0, time.perf_counter()
for i in range(0, len(prompts), batch):
    tokens += sum(len(c.token_ids) for out in llm.generate(prompts[i:i + batch], params) for c in out.outputs)
print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - started}))
"""


def write_prompts(path: Path, count: int, words: int = 24) -> None:
    with gzip.open(ABSTRACTS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    with open(path, "w", encoding="utf-8") as out:
        for i in range(count):
            opening = " ".join(texts[i % len(texts)].split()[:words])
            out.write(json.dumps({"id": f"p{i}", "prompt": opening}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default=None, help="a causal LM folder (default: the tiny Llama, made here)")
    parser.add_argument("--engine", default="transformers", choices=("transformers", "vllm"))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to `domainsynth generate` (e.g. generate.num_gpus=1)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-generate-"))
    model = args.model
    if model is None:
        from domainsynth.actors.tiny_models import make_tiny_llama

        model = str(make_tiny_llama(work / "tiny-llama"))
    prompts = work / "prompts.jsonl"
    write_prompts(prompts, args.prompts)
    # Both sides sample the same distribution (a real model's rows end at EOS at different lengths: tokens are
    # counted, not assumed). top_k 50 is transformers' default: the baseline is the loop a user writes as it comes.
    params = {"max_tokens": args.max_tokens, "temperature": 0.8, "top_p": 0.95, "top_k": 50, "seed": 0}
    print(f"{args.prompts:,} prompts, max_tokens {args.max_tokens}, batch {args.batch_size}, model {model} "
          f"({args.engine}); {os.cpu_count()} CPUs")

    from domainsynth.actors.smollm2 import resolve_model

    model = resolve_model(model)  # a name such as smollm2 becomes its folder (converted now, outside both timings)
    baseline = BASELINE if args.engine == "transformers" else BASELINE_VLLM
    base_s, base_peak, out = timed([sys.executable, "-c", baseline, str(prompts), json.dumps(params),
                                    str(args.batch_size), model])
    base = json.loads(out.strip().splitlines()[-1])
    base_rate = base["tokens"] / base["seconds"]
    print(f"baseline (plain {args.engine} generate loop, 1 process, torch's default threads): {base_s:.1f}s end to "
          f"end, {base['tokens'] / base_s:,.1f} tokens/s; generation alone {base_rate:,.1f} tokens/s "
          f"({base['tokens']:,} tokens); peak RSS {base_peak:,.0f} MiB")

    run = work / "run"
    cmd = [sys.executable, "-m", "domainsynth.cluster.cli", "generate", "--prompts", str(prompts), "--model", model,
           "--engine", args.engine, "--out", str(run), "--max-tokens", str(args.max_tokens), "--temperature", "0.8",
           "--seed", "0", "--set", f"generate.batch_size={args.batch_size}", "--set", "generate.sampling.top_p=0.95",
           "--set", "generate.sampling.top_k=50"]
    for item in args.overrides:
        cmd += ["--set", item]
    stage_s, stage_peak, _ = timed(cmd)
    report = json.loads((run / "generate" / "report.json").read_text())
    assert report["rows_out"] == args.prompts, report
    print(f"domainsynth generate (Ray Data, {report['actors']['min']}-{report['actors']['max']} actors x "
          f"{report['cpus_per_actor']} CPU): {stage_s:.1f}s end to end incl. Ray start-up, "
          f"{report['completion_tokens'] / stage_s:,.1f} tokens/s; the stage alone {report['tokens_per_second']:,.1f} "
          f"tokens/s ({report['completion_tokens']:,} tokens); peak RSS of the process tree {stage_peak:,.0f} MiB")
    print(f"ratio, end to end (stage tokens/s / baseline tokens/s): "
          f"{(report['completion_tokens'] / stage_s) / (base['tokens'] / base_s):.2f}x")
    print(f"ratio, generation alone: {report['tokens_per_second'] / base_rate:.2f}x")


if __name__ == "__main__":
    main()
