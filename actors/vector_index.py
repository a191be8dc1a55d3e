"""faiss vector indexes for CRAFT's retrieval, and the Ray actor that searches one.

Vectors are L2-normalised, so every index uses the inner-product metric and a score is a cosine similarity. Vectors
are added in corpus-shard order without ids: a vector's faiss id is its position, and ``row_ids`` (saved beside the
index) maps positions to the corpus rows' ``_order``. That keeps one code path for every kind, on CPU and on GPU
(faiss-gpu has no id maps for flat or HNSW indexes).

Kinds: ``flat`` is exact search. ``ivf`` clusters the vectors into ``nlist`` cells (k-means trained on a sample) and
searches the ``nprobe`` nearest cells; vectors are stored as float16 (``SQfp16``, the precision the embed stage
wrote, so nothing is lost). ``ivfpq`` compresses each vector to ``pq_m`` bytes (recall drops). ``hnsw`` is a graph
index (no training; CPU only).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, replace

import numpy as np

KINDS = ("flat", "ivf", "ivfpq", "hnsw")


@dataclass(frozen=True)
class IndexPlan:
    kind: str
    dim: int
    nlist: int | None = None
    nprobe: int | None = None
    pq_m: int | None = None
    hnsw_m: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None

    @property
    def factory(self) -> str:
        """The faiss ``index_factory`` description of this index."""
        return {"flat": "Flat", "ivf": f"IVF{self.nlist},SQfp16", "ivfpq": f"IVF{self.nlist},PQ{self.pq_m}",
                "hnsw": f"HNSW{self.hnsw_m},Flat"}[self.kind]

    @property
    def needs_training(self) -> bool:
        return self.kind in ("ivf", "ivfpq")

    @property
    def gpu_capable(self) -> bool:
        return self.kind != "hnsw"

    def to_dict(self) -> dict:
        return asdict(self)


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def new_index(plan: IndexPlan):
    import faiss

    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        index.hnsw.efConstruction = plan.ef_construction
    return index


def to_gpus(index):
    """The same index on every visible GPU (faiss-gpu); training, adding and searching then run there."""
    import faiss

    return faiss.index_cpu_to_all_gpus(index)


def to_cpu(index):
    import faiss

    return faiss.index_gpu_to_cpu(index) if "Gpu" in type(index).__name__ else index


def finish_for_saving(index, plan: IndexPlan):
    """CPU copy, able to hand back stored vectors (IVF needs a position -> list map for that)."""
    import faiss

    index = to_cpu(index)
    if plan.needs_training:
        faiss.extract_index_ivf(index).make_direct_map()
    return index


def set_search_parameters(index, plan: IndexPlan) -> None:
    """nprobe (IVF) or efSearch (HNSW), through faiss's parameter space (CPU and GPU indexes alike)."""
    import faiss

    space = faiss.GpuParameterSpace() if "Gpu" in type(index).__name__ else faiss.ParameterSpace()
    if plan.needs_training:
        space.set_index_parameter(index, "nprobe", plan.nprobe)
    elif plan.kind == "hnsw":
        space.set_index_parameter(index, "efSearch", plan.ef_search)


def save_index(index, filesystem, path: str) -> None:
    """Write the index where the run lives. faiss writes local files itself (no copy of the index in memory); other
    filesystems get a local temporary file streamed up."""
    import faiss
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.LocalFileSystem):
        faiss.write_index(index, path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index, f"{tmp}/index.faiss")
        pafs.copy_files(f"{tmp}/index.faiss", path, destination_filesystem=filesystem)


def load_index(filesystem, path: str):
    import faiss
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.LocalFileSystem):
        return faiss.read_index(path)
    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(path, f"{tmp}/index.faiss", source_filesystem=filesystem)
        return faiss.read_index(f"{tmp}/index.faiss")


class ExactNeighbours:
    """The exact top-k of a few queries, kept up to date as vectors arrive shard by shard (one matrix product a
    shard), so an approximate index's recall can be measured without a second pass over the shards."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), 0), -np.inf, np.float32)
        self.positions = np.zeros((len(queries), 0), np.int64)
        self.seen = 0

    def add(self, vectors: np.ndarray) -> None:
        scores = np.concatenate([self.scores, self.queries @ vectors.T], axis=1)
        positions = np.concatenate([self.positions, np.broadcast_to(
            np.arange(self.seen, self.seen + len(vectors)), (len(self.queries), len(vectors)))], axis=1)
        keep = np.argsort(-scores, axis=1)[:, :self.k]
        self.scores = np.take_along_axis(scores, keep, axis=1)
        self.positions = np.take_along_axis(positions, keep, axis=1)
        self.seen += len(vectors)

    def recall(self, found: np.ndarray) -> float:
        return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, self.positions)]))


def calibrate(index, plan: IndexPlan, exact: ExactNeighbours, target: float) -> tuple[IndexPlan, dict[int, float]]:
    """Recall@k against exact search for growing search depths (IVF: nprobe doubling from nlist/512); the plan comes
    back with the smallest depth that reaches ``target`` (the largest tried if none does). A depth the recipe set is
    only measured."""
    if plan.kind == "flat":
        return plan, {}
    if plan.kind == "hnsw":
        depths, name = [plan.ef_search], "ef_search"
    elif plan.nprobe is not None:
        depths, name = [plan.nprobe], "nprobe"
    else:
        depths, name = sorted({min(plan.nlist, max(1, plan.nlist // 512) * 2 ** i) for i in range(12)}), "nprobe"
    curve: dict[int, float] = {}
    for depth in depths:
        trial = replace(plan, **{name: depth})
        set_search_parameters(index, trial)
        curve[depth] = exact.recall(index.search(exact.queries, exact.k)[1])
        if curve[depth] >= target:
            break
    chosen = replace(plan, **{name: depth})
    set_search_parameters(index, chosen)
    return chosen, curve


class VectorSearcher:
    """Ray actor holding the index and the sentence model that embedded the corpus (queries must be embedded the same
    way). Searches run on GPUs when faiss-gpu sees one and the kind allows; stored vectors come from the CPU copy."""

    def __init__(self, filesystem, index_dir: str, plan: dict, model: str, max_seq_length: int | None,
                 threads: int, use_gpu: bool):
        import faiss
        import torch

        from .embedding import load_sentence_model

        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(threads)
        self.plan = IndexPlan(**plan)
        self.cpu_index = load_index(filesystem, f"{index_dir}/index.faiss")
        with filesystem.open_input_file(f"{index_dir}/row_ids.npy") as f:
            self.row_ids = np.load(f)
        set_search_parameters(self.cpu_index, self.plan)
        self.index = to_gpus(self.cpu_index) if use_gpu and self.plan.gpu_capable and faiss_gpus() else self.cpu_index
        self.model = load_sentence_model(model, max_seq_length)

    def size(self) -> int:
        return self.cpu_index.ntotal

    def embed(self, texts: list[str]) -> np.ndarray:
        from .embedding import encode

        return encode(self.model, texts, batch_size=32).astype(np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions), each ``[len(queries), k]``; position -1 where the index found fewer than k."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        return self.cpu_index.reconstruct_batch(np.asarray(positions, dtype=np.int64))

    def orders(self, positions: np.ndarray) -> np.ndarray:
        return self.row_ids[np.asarray(positions, dtype=np.int64)]
