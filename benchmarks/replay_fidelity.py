"""Method fidelity of TRAIT's replay against forgetting, where there is forgetting to bound.

SmolLM2-Instruct shows none at this budget (docs/fidelity.md: its general-text perplexity falls under any plain-text
training), and a run long enough to move it is hours on 2 cores. So the claim is tested on a model whose general
knowledge is all it has: a small Llama (4 layers, hidden 256, the tokenizer `actors/tiny_models.py` trains) pretrained
from random weights on general web text (stage `general`), then continually pretrained on biomedical abstracts
(stage `knowledge`) by `domainsynth pretrain`, in three arms that differ only in the second stage's replay of
stage-1 data: none, 25% and 50% of its tokens (TRAIT's `replay: [{stage: general, share: ...}]`). All arms have the
same token budget in each stage and share stage 1 exactly (same seed and data). Each is scored every few steps on
held-out abstracts and held-out general text, never trained on. The claim: without replay, general-text perplexity
rises during stage 2; replay bounds the rise, at some cost to the in-domain gain.

    python benchmarks/replay_fidelity.py
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py is named like the stdlib module `select`: this folder goes last on the import path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE] + [HERE]

import argparse
import json
import random
import tempfile
from pathlib import Path

import yaml
from pretrain_fidelity import DATA, read_gz, run, write_jsonl


def build_data(work: Path) -> dict[str, str]:
    medical = read_gz(DATA / "medical_abstracts.jsonl.gz")
    general = read_gz(DATA / "general_pool.jsonl.gz")
    random.Random(0).shuffle(medical)
    random.Random(1).shuffle(general)
    text = lambda rows: [{"text": r["text"]} for r in rows]  # noqa: E731
    return {
        "general": write_jsonl(work / "general.jsonl", text(general[300:])),
        "medical": write_jsonl(work / "medical.jsonl", text(medical[200:])),
        "eval_general": write_jsonl(work / "eval_general.jsonl", text(general[:300])),
        "eval_medical": write_jsonl(work / "eval_medical.jsonl", text(medical[:200])),
    }


def recipe(run_dir: Path, model: str, files: dict, replay_share: float, args) -> dict:
    knowledge = {"name": "knowledge", "data": [files["medical"]], "max_steps": args.knowledge_steps,
                 "lr": args.knowledge_lr,
                 "replay": [{"stage": "general", "share": replay_share}] if replay_share else []}
    return {"run_dir": str(run_dir), "pretrain": {
        "model": model, "block_size": args.block_size,
        "stages": [{"name": "general", "data": [files["general"]], "max_steps": args.general_steps, "replay": []},
                   knowledge],
        "eval": {"domain": [files["eval_medical"]], "general": [files["eval_general"]], "max_blocks": args.eval_blocks},
        "training": {"batch_size": args.batch_size, "lr": args.general_lr, "warmup_steps": 20,
                     "eval_every": args.eval_every, "checkpoint_every": 10_000, "log_every": 25,
                     "cpus_per_worker": os.cpu_count() or 1}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shares", default="0,0.25,0.5", help="stage 2's replay shares, one arm each")
    parser.add_argument("--general-steps", type=int, default=600)
    parser.add_argument("--knowledge-steps", type=int, default=300)
    parser.add_argument("--general-lr", type=float, default=2e-3)
    parser.add_argument("--knowledge-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from domainsynth.actors.tiny_models import make_tiny_llama

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fidelity-replay-"))
    work.mkdir(parents=True, exist_ok=True)
    model = str(make_tiny_llama(work / "init", hidden_size=256, num_layers=4))
    files = build_data(work)
    cli = [sys.executable, "-m", "domainsynth.cluster.cli"]
    results = {}
    for share in (float(s) for s in args.shares.split(",")):
        name = f"replay-{share:g}"
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe(work / f"run-{name}", model, files, share, args)))
        seconds = run(cli + ["run", str(path)], work / f"{name}.log")
        report = json.loads((work / f"run-{name}" / "pretrain" / "report.json").read_text())
        results[name] = report
        d, g = report["perplexity"]["domain"], report["perplexity"]["general"]
        boundary = args.general_steps
        g1 = next(v for s, v in g if s == boundary)
        d1 = next(v for s, v in d if s == boundary)
        achieved = report["mixes"]["knowledge"].get("replay_share", 0.0)
        print(f"{name}: {seconds:.0f}s; replay achieved {achieved:.1%}; at the stage boundary (step {boundary}) "
              f"general {g1:.2f}, biomedical {d1:.2f}; end general {g[-1][1]:.2f} ({g[-1][1] / g1 - 1:+.1%}, "
              f"peak {max(v for s, v in g if s >= boundary):.2f}), biomedical {d[-1][1]:.2f} "
              f"({d[-1][1] / d1 - 1:+.1%})", flush=True)
        print(f"  general by step: {', '.join(f'{int(s)}: {v:.1f}' for s, v in g)}", flush=True)
        print(f"  biomedical by step: {', '.join(f'{int(s)}: {v:.1f}' for s, v in d)}", flush=True)
    (work / "replay_results.json").write_text(json.dumps(
        {k: v["perplexity"] for k, v in results.items()}, indent=1))
    plot(results, args.general_steps, work / "replay.png")
    print(f"reports: {work}/run-*/pretrain/report.md; the arms side by side: {work / 'replay.png'}", flush=True)


def plot(results: dict, boundary: int, out: Path) -> None:
    """Both held-out perplexities of every arm over the steps, the stage boundary marked (TRAIT's Figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, (key, title) in zip(axes, (("general", "held-out general text (forgetting)"),
                                       ("domain", "held-out biomedical text"))):
        for name, report in results.items():
            points = report["perplexity"][key]
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".", label=name)
        ax.axvline(boundary, color="grey", linestyle="--", linewidth=1)
        ax.text(boundary, ax.get_ylim()[1], " knowledge starts", va="top", fontsize=8, color="grey")
        ax.set(title=title, xlabel="optimizer step", ylabel="perplexity", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
