"""Shared fixtures: a real local Ray (2 CPUs, like CI) and the bundled real data (tests/data, see SOURCE.md)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import ray

from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.runner import run_recipe

DATA = Path(__file__).parent / "data"
BIOMEDICAL_POOL_SUBSETS = {"PubMed Central", "PubMed Abstracts", "NIH ExPorter"}


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (no mocks of Ray)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def medical_abstracts() -> list[dict]:
    rows = read_jsonl_gz(DATA / "medical_abstracts.jsonl.gz")
    random.Random(0).shuffle(rows)
    return rows


@pytest.fixture(scope="session")
def general_pool() -> list[dict]:
    return read_jsonl_gz(DATA / "general_pool.jsonl.gz")


@pytest.fixture(scope="session")
def hidden_corpus(tmp_path_factory, medical_abstracts, general_pool):
    """500 abstracts to seed the classifier; the other 2,388 hidden in the 9,590-document general pool (4 shards)."""
    root = tmp_path_factory.mktemp("hidden")
    seeds, hidden = medical_abstracts[:500], medical_abstracts[500:]
    write_jsonl(root / "in_domain.jsonl", [{"id": r["id"], "text": r["text"]} for r in seeds])
    corpus = [{"id": r["id"], "text": r["text"], "source": "hidden", "subsource": r["label"]} for r in hidden]
    corpus += general_pool
    random.Random(1).shuffle(corpus)
    for shard in range(4):
        write_jsonl(root / "corpus" / f"part-{shard}.jsonl.gz", corpus[shard::4])
    return {"root": root, "in_domain": root / "in_domain.jsonl", "corpus": root / "corpus",
            "hidden_ids": {r["id"] for r in hidden},
            "pool_biomedical_ids": {r["id"] for r in general_pool if r.get("subsource") in BIOMEDICAL_POOL_SUBSETS},
            "rows": len(corpus)}


@pytest.fixture(scope="session")
def classifier(ray_local, hidden_corpus, tmp_path_factory):
    """Train once through the stage itself; the quarantine tests reuse it (--classifier)."""
    run_dir = tmp_path_factory.mktemp("clf")
    recipe = build_recipe({"run_dir": str(run_dir), "select": {
        "in_domain": str(hidden_corpus["in_domain"]), "corpus": str(hidden_corpus["corpus"] / "part-0.jsonl.gz"),
        "negatives_sample": 2000, "quality": {"scorer": "none"}}}, "test", "/")
    run_recipe(recipe, echo=lambda _: None)
    return run_dir / "select" / "classifier.bin"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A tiny Llama and its locally trained tokenizer (random weights: gibberish text, real behaviour)."""
    from domainsynth.actors.tiny_models import make_tiny_llama

    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_4k(tmp_path_factory) -> str:
    """The tiny Llama with a 4,096-token context: CRAFT's prompts carry a document and few-shots."""
    from domainsynth.actors.tiny_models import make_tiny_llama

    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny4k") / "tiny-llama", max_positions=4096))


@pytest.fixture(scope="session")
def soft_prompt_file(tmp_path_factory, tiny_llama) -> str:
    """An 8-token soft prompt for the tiny Llama, saved as DOMINO's training writes it (PEFT's tensor name)."""
    import numpy as np

    from domainsynth.actors.soft_prompt import save_soft_prompt

    matrix = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)
    return save_soft_prompt(matrix, str(tmp_path_factory.mktemp("soft") / "medical.safetensors"))


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports. The sockets stay bound until all are picked: closed one at a time,
    the OS may hand the same port out twice (a Ray head then refuses to start, two components on one port)."""
    import socket
    from contextlib import ExitStack

    with ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def local_progress(progress_file: Path):
    """A reader of a training stage's progress file on local disk for ``run_killing_rank0`` ({} while there is
    none, or while it is being rewritten)."""

    def read_progress() -> dict:
        try:
            return json.loads(progress_file.read_text())
        except (OSError, ValueError):
            return {}

    return read_progress


def run_killing_rank0(recipe, read_progress, at_step: int) -> tuple[dict, list[str]]:
    """Run ``recipe`` in a thread and SIGKILL softprompt's rank 0 (the pid in its progress file, which
    ``read_progress`` returns as a dict, {} while there is none) once its progress lines reach ``at_step``. Returns
    the reports and the lines said; fails if the run ended before the kill."""
    import os
    import re
    import signal
    import threading
    import time

    said, outcome, killed = [], {}, None
    thread = threading.Thread(target=lambda: outcome.update(run_recipe(recipe, echo=said.append)))
    thread.start()
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and thread.is_alive():
        state = read_progress()
        steps = [int(m.group(1)) for _, line in state.get("lines", []) if (m := re.search(r" step (\d+)/", line))]
        if steps and steps[-1] >= at_step:
            killed = state["pid"]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=600)
    assert killed is not None, "the run ended before a worker could be killed"
    return outcome, said
