"""Method fidelity of DOMINO's soft-prompt learning on a real model (docs/fidelity.md records what it printed).

Learns the domain soft prompt Z from the same reference samples with each objective — `domino` (L_suf + λ·L_con,
private prompts z_i) and `direct` (L_suf alone, the Direct-Domain baseline) — through a recipe of `softprompt` then
`synthesize --method domino` (`domainsynth run`, the path users take), samples from each Z at temperature 0.8, and
compares what was sampled (every sample, kept or dropped by synthesize's checks):

- diversity: distinct-2/3 (normalised words), the mean pairwise embedding distance (all-MiniLM-L6-v2), and the share
  of samples opening with the most common first three words;
- copying: the share of samples holding an 8-gram (normalised words) of a reference, and each sample's cosine to
  its nearest reference;
- domain agreement: P(in-domain) from a fastText classifier of the references against general web text, trained
  as `select` trains it (FastTextParams' defaults, balanced classes); held-out abstracts of the same source and
  general texts, cut to the samples' median length, are the ceiling and the floor.

DOMINO's claim (papers/004): more diversity and less copying at equal domain agreement.

    python benchmarks/softprompt_fidelity.py --model smollm2 --references 100 --samples 200
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
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ABSTRACTS = REPO / "tests" / "data" / "pubmedqa_abstracts.jsonl.gz"
GENERAL = REPO / "tests" / "data" / "general_pool.jsonl.gz"


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def recipe(run_dir: Path, references: Path, args, objective: str) -> dict:
    softprompt = {"references": str(references), "model": args.model, "objective": objective,
                  "num_tokens": args.num_tokens, "lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size,
                  "max_length": args.max_length, "seed": args.seed, "workers": 1,
                  "cpus_per_worker": float(os.cpu_count() or 1), "checkpoint_every": 1000, "log_every": 10}
    if objective == "domino":
        softprompt["private_tokens"] = args.private_tokens
    return {"run_dir": str(run_dir), "softprompt": softprompt,
            "synthesize": {"method": "domino", "model": args.model,
                           "domino": {"num_samples": args.samples, "min_input_chars": 20},
                           "sampling": {"temperature": 0.8, "max_tokens": args.max_tokens, "seed": args.seed}}}


def run_recipe(raw: dict, path: Path) -> float:
    import yaml

    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "domainsynth.cluster.cli", "run", str(path)], check=True)
    return time.perf_counter() - started


def sampled_texts(run_dir: Path) -> tuple[list[str], int]:
    """Every sample synthesize drew (kept ones and dropped ones), and how many it kept."""
    kept, dropped = inputs_in(run_dir / "synthesize" / "data"), inputs_in(run_dir / "synthesize" / "dropped")
    return kept + dropped, len(kept)


def inputs_in(folder: Path) -> list[str]:
    import pyarrow.parquet as pq

    files = sorted(folder.rglob("*.parquet")) if folder.exists() else []
    return [t for f in files for t in pq.read_table(f, columns=["input"]).column("input").to_pylist() if t is not None]


def ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


class Measures:
    """The measures, with the references' embeddings, 8-grams and the domain classifier computed once."""

    def __init__(self, references: list[str], negatives: list[str], embedder: str):
        from domainsynth.actors.embedding import encode, load_sentence_model
        from domainsynth.actors.fasttext_domain import FastTextParams, load_model
        from domainsynth.actors.minhash import normalised_words

        self.words, self._encode = (lambda texts: normalised_words(texts).to_pylist()), encode
        self.model = load_sentence_model(embedder)
        self.reference_vectors = self.embed(references)
        self.reference_8grams = set().union(*(ngrams(w, 8) for w in self.words(references)))
        trained = train_in_fresh_process(references, negatives, FastTextParams())
        self.classifier, self.classifier_metrics = load_model(trained.model_bytes), trained.metrics

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._encode(self.model, texts, 32).astype(np.float64)  # normalised rows: dot = cosine

    def features(self, texts: list[str]) -> dict:
        """What the measures are computed from, per sample."""
        from domainsynth.actors.fasttext_domain import predict_in_domain_probability

        words = self.words(texts)
        vectors = self.embed(texts)
        return {"words": words, "cos": vectors @ vectors.T,
                "nearest": (vectors @ self.reference_vectors.T).max(axis=1),
                "copies": np.array([bool(ngrams(w, 8) & self.reference_8grams) for w in words]),
                "in_domain": predict_in_domain_probability(self.classifier, texts)}

    @staticmethod
    def aggregate(f: dict, rows: np.ndarray) -> dict:
        """The measures over the samples ``rows`` (all of them, or a bootstrap resample)."""
        from domainsynth.pipelines.synthesis.diversity import distinct_n

        words = [f["words"][i] for i in rows]
        cos = f["cos"][np.ix_(rows, rows)]
        distinct = rows[:, None] != rows[None, :]  # a resample repeats samples: pairs of one sample are left out
        return {"samples": len(rows), "median_words": int(np.median([len(w) for w in words])),
                "distinct_2": distinct_n(words, 2), "distinct_3": distinct_n(words, 3),
                "mean_pairwise_distance": round(float(1 - cos[distinct].mean()), 4),
                "copies_8gram": round(float(f["copies"][rows].mean()), 4),
                "nearest_reference_mean": round(float(f["nearest"][rows].mean()), 4),
                "nearest_reference_max": round(float(f["nearest"][rows].max()), 4),
                "in_domain_mean": round(float(f["in_domain"][rows].mean()), 4),
                "in_domain_share": round(float((f["in_domain"][rows] >= 0.5).mean()), 4),
                "top_opening_share": round(Counter(tuple(w[:3]) for w in words).most_common(1)[0][1] / len(rows), 4)}

    def __call__(self, texts: list[str]) -> dict:
        return self.aggregate(self.features(texts), np.arange(len(texts)))


COMPARED = ("distinct_2", "distinct_3", "mean_pairwise_distance", "top_opening_share", "copies_8gram",
            "nearest_reference_mean", "in_domain_mean", "in_domain_share")


def bootstrap_difference(a: dict, b: dict, resamples: int, seed: int) -> dict:
    """95% percentile intervals of measure(a) - measure(b), resampling each side's samples with replacement."""
    rng = np.random.default_rng(seed)
    na, nb = len(a["words"]), len(b["words"])
    draws = {k: [] for k in COMPARED}
    for _ in range(resamples):
        ma = Measures.aggregate(a, rng.integers(0, na, na))
        mb = Measures.aggregate(b, rng.integers(0, nb, nb))
        for k in COMPARED:
            draws[k].append(ma[k] - mb[k])
    return {k: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]
            for k, v in draws.items()}


def train_in_fresh_process(positives: list[str], negatives: list[str], params):
    """fastText trains once per process and now and then stops on "Encountered NaN": as `select` does, each try runs
    in a new process (here a spawned one), three tries at most."""
    import multiprocessing

    from domainsynth.actors.fasttext_domain import train_classifier

    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for attempt in range(3):
            try:
                return pool.apply(train_classifier, (positives, negatives, params))
            except RuntimeError as e:
                if attempt == 2:
                    raise
                print(f"fastText: {e}; training again in a new process", flush=True)


def cut_words(texts: list[str], words: int) -> list[str]:
    return [" ".join(t.split()[:words]) for t in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--references", type=int, default=100)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--num-tokens", type=int, default=16, help="m")
    parser.add_argument("--private-tokens", type=int, default=16, help="p (domino)")
    parser.add_argument("--max-length", type=int, default=96, help="tokens of a reference (EOS included)")
    parser.add_argument("--max-tokens", type=int, default=160, help="tokens of a sample")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--negatives", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=500, help="resamples for the domino - direct intervals")
    parser.add_argument("--objectives", default="domino,direct")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fidelity-softprompt-"))
    work.mkdir(parents=True, exist_ok=True)
    abstracts = read_jsonl_gz(ABSTRACTS)
    references, held_out = abstracts[:args.references], abstracts[args.references:args.references + args.samples]
    references_file = work / "references.jsonl"
    references_file.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in references))
    general = [r["text"] for r in read_jsonl_gz(GENERAL)]
    random.Random(args.seed).shuffle(general)
    negatives, general_held_out = general[:args.negatives], general[args.negatives:args.negatives + args.samples]
    print(f"{len(references)} references (PubMedQA abstracts), {args.samples} samples per objective, model "
          f"{args.model}, m {args.num_tokens}, p {args.private_tokens}, max_length {args.max_length}, "
          f"{args.epochs} epochs, lr {args.lr:g}, batch {args.batch_size}; {os.cpu_count()} CPUs; work {work}",
          flush=True)

    results = {"settings": vars(args), "objectives": {}}
    samples = {}
    for objective in args.objectives.split(","):
        run_dir = work / objective
        timing = work / f"{objective}_seconds.json"  # a rerun measures again and keeps the first run's time
        if not timing.exists():
            seconds = run_recipe(recipe(run_dir, references_file, args, objective), work / f"{objective}.yaml")
            timing.write_text(json.dumps(seconds))
        seconds = json.loads(timing.read_text())
        texts, kept = sampled_texts(run_dir)
        samples[objective] = texts
        metrics = [json.loads(line) for line in open(run_dir / "softprompt" / "metrics.jsonl", encoding="utf-8")]
        results["objectives"][objective] = {"seconds": round(seconds, 1), "kept_by_synthesize": kept,
                                            "steps": len(metrics), "first_loss_suf": metrics[0]["loss_suf"],
                                            "last_loss_suf": metrics[-1]["loss_suf"]}
        (work / f"{objective}_samples.json").write_text(json.dumps(texts, indent=1))

    measure = Measures([r["text"] for r in references], negatives, "all-MiniLM-L6-v2")
    results["classifier"] = measure.classifier_metrics
    median_words = int(np.median([len(t.split()) for texts in samples.values() for t in texts]))
    anchors = {"held-out abstracts": cut_words([r["text"] for r in held_out], median_words),
               "general web text": cut_words(general_held_out, median_words)}
    table = {**samples, **anchors}
    features = {name: measure.features(texts) for name, texts in table.items()}
    results["measures"] = {name: Measures.aggregate(f, np.arange(len(f["words"]))) for name, f in features.items()}
    if "domino" in features and "direct" in features:
        results["domino_minus_direct_95"] = bootstrap_difference(features["domino"], features["direct"],
                                                                 args.bootstrap, args.seed)
    (work / "results.json").write_text(json.dumps(results, indent=1))

    columns = ["samples", "median_words", *COMPARED]
    print("\n| | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for name, row in results["measures"].items():
        print(f"| {name} | " + " | ".join(str(row[c]) for c in columns) + " |")
    for objective, info in results["objectives"].items():
        print(f"{objective}: {info['steps']} steps, L_suf {info['first_loss_suf']} -> {info['last_loss_suf']}, "
              f"synthesize kept {info['kept_by_synthesize']}/{args.samples}, {info['seconds']} s")
    if "domino_minus_direct_95" in results:
        print("domino - direct, 95% bootstrap intervals: " + ", ".join(
            f"{k} [{lo:+.4f}, {hi:+.4f}]" for k, (lo, hi) in results["domino_minus_direct_95"].items()))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
