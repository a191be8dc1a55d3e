"""CRAFT's half-and-half choice of hits over a real faiss index (no Ray needed): each few-shot's own nearest
documents fill half of top_k round-robin, mean similarity the other half, near-duplicates never come back twice, and
lists too shallow to survive deduplication are fetched again, deeper."""

from __future__ import annotations

import faiss
import numpy as np

from domainsynth.pipelines.curation.retrieve import choose_hits


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _index(vectors: np.ndarray):
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index, (lambda q, k: index.search(np.ascontiguousarray(q, np.float32), k)), index.reconstruct_batch


def _near_copies(vector: np.ndarray, n: int, rng) -> np.ndarray:
    return _normalise(vector[None, :] + 0.01 * rng.standard_normal((n, vector.shape[0])))


def test_half_from_each_few_shot_half_by_mean_and_no_near_duplicates():
    rng = np.random.default_rng(0)
    base = _normalise(rng.standard_normal((3000, 32)))
    queries = _normalise(rng.standard_normal((4, 32)))
    best_of_first_query = int(np.argmax(base @ queries[0]))
    vectors = np.concatenate([base, _near_copies(base[best_of_first_query], 3, rng)])
    planted = {best_of_first_query, *range(3000, 3003)}
    index, search, reconstruct = _index(vectors)

    hits = choose_hits(search, reconstruct, queries, index.ntotal, top_k=40, per_few_shot_fraction=0.5,
                       overfetch=0.2, near_duplicate_similarity=0.95)

    chosen = np.array(hits.positions)
    assert len(chosen) == len(set(chosen)) == 40
    assert hits.retrieved_by.count("few_shot") == 20 and hits.retrieved_by.count("mean") == 20
    assert len(planted & set(chosen.tolist())) == 1  # the document and its near-copies count once
    similarity = vectors[chosen] @ vectors[chosen].T
    assert (similarity[~np.eye(40, dtype=bool)] < 0.95).all()
    # Round-robin: every few-shot's own best document is among the first picks.
    own_best = {int(np.argmax(vectors @ q)) for q in queries}
    assert own_best <= set(chosen[:4].tolist()) | planted
    # The mean half is the best by mean similarity among documents not already chosen.
    mean_similarity = vectors @ queries.mean(axis=0)
    by_mean = chosen[np.array(hits.retrieved_by) == "mean"]
    others = np.setdiff1d(np.arange(len(vectors)), np.concatenate([chosen, list(planted)]))
    assert mean_similarity[by_mean].min() >= mean_similarity[others].max() - 1e-6


def test_lists_are_fetched_deeper_when_duplicates_eat_the_over_fetch():
    rng = np.random.default_rng(1)
    base = _normalise(rng.standard_normal((2000, 32)))
    query = _normalise(rng.standard_normal((1, 32)))
    top = np.argsort(-(base @ query[0]))[:10]
    # Every one of the query's ten best documents is there eleven times: a 20% over-fetch cannot absorb that.
    vectors = np.concatenate([base, *[_near_copies(base[i], 10, rng) for i in top]])
    index, search, reconstruct = _index(vectors)

    hits = choose_hits(search, reconstruct, query, index.ntotal, top_k=12, per_few_shot_fraction=0.5,
                       overfetch=0.2, near_duplicate_similarity=0.95)

    assert hits.fetch_rounds > 1
    assert len(set(hits.positions)) == 12
    representatives = vectors[hits.positions]
    assert (representatives @ representatives.T)[~np.eye(12, dtype=bool)].max() < 0.95
    assert hits.near_duplicates >= 100  # the ten copies of each of the ten best were seen and dropped


def test_a_corpus_smaller_than_top_k_returns_what_there_is():
    rng = np.random.default_rng(2)
    vectors = _normalise(rng.standard_normal((30, 16)))
    vectors = np.concatenate([vectors, vectors[:5]])  # five exact copies
    index, search, reconstruct = _index(vectors)
    hits = choose_hits(search, reconstruct, _normalise(rng.standard_normal((3, 16))), index.ntotal, top_k=100,
                       per_few_shot_fraction=0.5, overfetch=0.2, near_duplicate_similarity=0.95)
    originals = sorted(p if p < 30 else p - 30 for p in hits.positions)
    assert originals == list(range(30))  # every distinct document once, whichever copy came first
    assert hits.near_duplicates == 5


def test_recall_is_measured_while_adding_and_the_smallest_sufficient_nprobe_is_chosen():
    from domainsynth.actors.vector_index import ExactNeighbours, IndexPlan, calibrate, new_index

    rng = np.random.default_rng(3)
    centres = _normalise(rng.standard_normal((40, 32)))
    vectors = _normalise(centres[rng.integers(40, size=6000)] + 0.3 * rng.standard_normal((6000, 32)))
    queries = vectors[rng.choice(6000, 100, replace=False)]
    plan = IndexPlan("ivf", 32, nlist=64)
    index = new_index(plan)
    index.train(vectors)
    exact = ExactNeighbours(queries, k=10)
    for shard in np.array_split(vectors, 7):  # shard by shard, as the index step adds them
        index.add(shard)
        exact.add(shard)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    assert exact.recall(truth) == 1.0

    chosen, curve = calibrate(index, plan, exact, target=0.9)
    depths = list(curve)
    assert depths == sorted(depths) and chosen.nprobe == depths[-1]
    assert curve[chosen.nprobe] >= 0.9 and all(curve[d] < 0.9 for d in depths[:-1])
    assert len(depths) > 1  # the first depth tried was not enough: the search really went deeper
    import faiss

    assert faiss.extract_index_ivf(index).nprobe == chosen.nprobe
