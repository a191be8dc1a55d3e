"""Benchmark: the generator endpoint under load, as users run it (`domainsynth serve RECIPE`, one replica, SmolLM2 on
the transformers engine, clients over loopback HTTP), in one run:

1. one client sending requests one after another (what a replica without batching gives, whatever the load);
2. the same requests from 16 concurrent clients, base model only;
3. the same load spread over 4 domains: 2 soft prompts and 2 LoRA adapters, all on the one base model.

Each request is a completion of the opening of a bundled biomedical abstract, greedy, writing exactly `max_tokens`
tokens (`ignore_eos`, as vLLM's serving benchmark does: otherwise domains that end sooner would look slower). Prints
completion tokens per second, requests per second, p50/p95/p99 latency and errors for each phase, and the ratios
2/1 (target >= 3x) and 3/2 (target >= 0.8x), with the server's peak memory. The soft prompts are the model's own
embeddings of a domain instruction (16 tokens); the adapters are PEFT LoRA folders in DOMINO's preset shape (r 8,
every linear layer) with random non-zero weights, written here.

    python benchmarks/serve.py --clients 16 --requests 48 --max-tokens 48
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE] + [HERE]

import argparse
import gzip
import json
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import requests

from common import TreeMemory

REPO = Path(__file__).resolve().parent.parent
ABSTRACTS = REPO / "tests" / "data" / "medical_abstracts.jsonl.gz"
DOMAINS = {"cardiology": "You are a cardiologist. Answer as a clinical expert on the heart and blood vessels.",
           "oncology": "You are an oncologist. Answer as a clinical expert on cancer biology and treatment."}


def prompts(count: int) -> list[str]:
    """The first 12 words of ``count`` abstracts."""
    with gzip.open(ABSTRACTS, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(count), f)]
    return [" ".join(r["text"].split()[:12]) for r in rows]


def make_domains(model_dir: str, folder: Path) -> tuple[dict, dict]:
    """Two soft prompts (the model's embeddings of a domain instruction, 16 tokens) and two LoRA adapters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domainsynth.actors.soft_prompt import save_soft_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    soft, loras = {}, {}
    for name, instruction in DOMAINS.items():
        ids = tokenizer(instruction).input_ids[:16]
        with torch.no_grad():
            matrix = model.get_input_embeddings()(torch.tensor(ids)).numpy()
        soft[f"{name}-prompt"] = save_soft_prompt(matrix, str(folder / f"{name}.safetensors"))
    for seed, name in enumerate(DOMAINS):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                               init_lora_weights=False))
        with torch.no_grad():  # small updates: the adapted model still writes text
            for pname, p in lora.named_parameters():
                if "lora_B" in pname:
                    p.mul_(0.01)
        lora.save_pretrained(str(folder / f"{name}-lora"))
        loras[f"{name}-lora"] = str(folder / f"{name}-lora")
    return soft, loras


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_load(url: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int) -> dict:
    """Send ``jobs`` (model, prompt) from ``clients`` threads, each taking the next job when its last is answered."""
    latencies, tokens, errors, lock = [], [0], [], threading.Lock()
    todo = list(reversed(jobs))

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                if not todo:
                    return
                model, prompt = todo.pop()
            began = time.perf_counter()
            try:
                r = session.post(f"{url}/v1/completions", timeout=600, json={
                    "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True})
                ok = r.status_code == 200
                used = r.json()["usage"]["completion_tokens"] if ok else 0
            except requests.RequestException as e:
                ok, used, r = False, 0, e
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - began)
                    tokens[0] += used
                else:
                    errors.append(str(getattr(r, "text", r))[:200])

    began = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"clients": clients, "requests": len(jobs), "seconds": seconds, "tokens": tokens[0],
            "tokens_per_s": tokens[0] / seconds, "requests_per_s": len(latencies) / seconds,
            "p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "errors": len(errors), "error_samples": errors[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48, help="requests in each concurrent phase")
    parser.add_argument("--sequential-requests", type=int, default=16, help="requests of the one-at-a-time phase")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--cpus", type=float, default=2.0, help="the replica's CPUs (its torch threads)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    args = parser.parse_args()

    from domainsynth.actors.smollm2 import smollm2_folder

    model_dir = smollm2_folder()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    soft, loras = make_domains(model_dir, work)
    port = free_port()
    recipe = work / "serve.yaml"
    recipe.write_text(json.dumps({"serve": {
        "model": model_dir, "served_model_name": "smollm2", "port": port, "num_cpus": args.cpus,
        "api_key_env": None, "max_batch_size": args.max_batch_size,
        "max_ongoing_requests": max(args.clients, args.max_batch_size) * 2,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1}, "soft_prompts": soft, "adapters": loras}}))
    env = {**os.environ, "RAY_TMPDIR": str(work / "ray")}  # this run's own Ray temp dir
    server = subprocess.Popen([str(Path(sys.executable).with_name("domainsynth")), "serve", str(recipe)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = TreeMemory(server.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the endpoint did not start:\n{server.stdout.read()[-3000:]}")
            time.sleep(1)
        texts = prompts(max(args.requests, args.sequential_requests))
        run_load(url, [("smollm2", texts[0])], 1, args.max_tokens)  # warm-up
        phases = {
            "one at a time": run_load(url, [("smollm2", t) for t in texts[:args.sequential_requests]], 1,
                                      args.max_tokens),
            f"{args.clients} clients, base model": run_load(
                url, [("smollm2", t) for t in texts[:args.requests]], args.clients, args.max_tokens),
            f"{args.clients} clients, 4 domains": run_load(
                url, [(names[i % 4], t) for i, t in enumerate(texts[:args.requests])
                      for names in [list(soft) + list(loras)]], args.clients, args.max_tokens),
        }
        health = requests.get(f"{url}/health", timeout=30).json()
    finally:
        server.send_signal(signal.SIGINT)  # the serve command's own Ctrl-C: it takes down what it started
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
        peak_mib = memory.stop()

    print(f"SmolLM2-135M-Instruct, transformers engine, 1 replica x {args.cpus:g} CPUs, max_batch_size "
          f"{args.max_batch_size}, {args.max_tokens} tokens a request, greedy")
    print(f"{'phase':<28} {'requests':>8} {'tokens/s':>9} {'req/s':>6} {'p50 s':>6} {'p95 s':>6} {'p99 s':>6} "
          f"{'errors':>6}")
    for name, p in phases.items():
        print(f"{name:<28} {p['requests']:>8} {p['tokens_per_s']:>9.1f} {p['requests_per_s']:>6.2f} "
              f"{p['p50']:>6.2f} {p['p95']:>6.2f} {p['p99']:>6.2f} {p['errors']:>6}")
        for sample in p["error_samples"]:
            print(f"  error: {sample}")
    single, base, mixed = phases.values()
    print(f"concurrent / one at a time: {base['tokens_per_s'] / single['tokens_per_s']:.2f}x tokens/s (target >= 3x)")
    print(f"4 domains / base only: {mixed['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s (target >= 0.8x)")
    print(f"peak batch {health.get('peak_running')}, server peak RSS {peak_mib:,.0f} MiB")
    print(json.dumps({"phases": phases, "peak_rss_mib": peak_mib}, default=str))


if __name__ == "__main__":
    main()
