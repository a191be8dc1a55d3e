"""Continual pretraining's data on Ray Data: documents tokenised by a pool of tokenizer actors, packed into blocks of
``block_size`` tokens (EOS between documents; what is left over at the end of a batch of documents is dropped, as
Hugging Face's ``group_texts`` does), and mixed with replay data by an exact number of blocks — every block has
``block_size`` tokens, so a share of blocks is the same share of tokens.

The mixed blocks are shuffled (seeded) and written as Parquet with small row groups; training workers read them in
that order (``actors.hf_training.PackedBlocks``), so no process ever holds the corpus, and a resumed run reads what
an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..corpus import READ_TASK_CPUS, CorpusSpec, column_total, read_corpus
from ..rundir import QUARANTINE_PARTS, StageDir, StageError, gather_quarantine

DOCS_PER_PACK = 256  # documents concatenated per packing batch (the tail dropped at each is < block_size tokens)
ROWS_PER_GROUP = 64  # Parquet row group: what a training worker reads at a time


class TokeniseDocuments:
    """Ray Data actor: each document's token ids (no special tokens) followed by EOS."""

    def __init__(self, model: str, text_field: str):
        from transformers import AutoTokenizer

        from ...actors.smollm2 import resolve_model

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
        self.field = text_field

    def __call__(self, batch: pa.Table) -> pa.Table:
        eos = self.tokenizer.eos_token_id
        ids = [e + [eos] for e in self.tokenizer(batch.column(self.field).to_pylist(),
                                                 add_special_tokens=False).input_ids]
        return pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())),
                         "n_tokens": pa.array([len(e) for e in ids], pa.int64())})


def pack_blocks(batch: pa.Table, block_size: int) -> pa.Table:
    """Consecutive documents' tokens cut into blocks of ``block_size`` (the rest of the batch, less than a block, is
    dropped; the stage counts it as all tokens less the blocks' tokens)."""
    flat = batch.column("input_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int32)
    whole = len(flat) // block_size
    values = pa.array(flat[:whole * block_size], pa.int32())
    return pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(values, block_size)})


@dataclass
class Packed:
    """One source, tokenised and packed (materialised in Ray's object store, spilled to disk when large)."""
    name: str
    blocks: object  # ray.data.Dataset with one column, input_ids
    documents: int
    quarantined: list[dict]
    tokens: int  # all tokens of its documents (EOS included)
    num_blocks: int
    block_size: int

    @property
    def dropped_tokens(self) -> int:
        return self.tokens - self.num_blocks * self.block_size


def pack_source(name: str, files: list[str], text_field: str, id_field: str, model: str, block_size: int,
                stage: StageDir, tokenizer_actors: int) -> Packed:
    """A source's documents (malformed rows quarantined) as packed blocks."""
    from ray.data import ActorPoolStrategy

    parts = stage.child(QUARANTINE_PARTS)
    docs = read_corpus(CorpusSpec(files, text_field, id_field), num_cpus=READ_TASK_CPUS, quarantine_dir=parts)
    tokenised = docs.map_batches(TokeniseDocuments, fn_constructor_args=(model, text_field), batch_format="pyarrow",
                                 compute=ActorPoolStrategy(size=tokenizer_actors), num_cpus=1).materialize()
    quarantined = [{"input": name, **row} for row in gather_quarantine_rows(stage)]
    documents = tokenised.count()
    tokens = column_total(tokenised, "n_tokens")
    blocks = tokenised.map_batches(pack_blocks, fn_kwargs={"block_size": block_size}, batch_size=DOCS_PER_PACK,
                                   batch_format="pyarrow").materialize()
    return Packed(name, blocks, documents, quarantined, tokens, blocks.count(), block_size)


def gather_quarantine_rows(stage: StageDir) -> list[dict]:
    """This read's quarantined rows (the stage writes them all to quarantine.jsonl at the end)."""
    rows = gather_quarantine(stage, "_")
    stage.delete("quarantine.jsonl")
    return rows


def replay_counts(shares: list[float], primary_blocks: int) -> list[int]:
    """Blocks of each replay source so that each is its share of the stage's tokens (the stage's own data is the
    rest): the replay total rounded once, then split by largest remainder, so the achieved shares are as close as
    whole blocks allow (within half a block of the stage's total)."""
    total_share = sum(shares)
    if not shares:
        return []
    replay_total = int(round(primary_blocks * total_share / (1.0 - total_share)))
    exact = [replay_total * s / total_share for s in shares]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(shares)), key=lambda k: exact[k] - counts[k], reverse=True)
    for k in by_remainder[:replay_total - sum(counts)]:
        counts[k] += 1
    return counts


def take_blocks(packed_blocks, count: int, available: int, seed: int, field: str, name: str):
    """``count`` blocks of a replay source, drawn at random (seeded) without repeating any."""
    if count > available:
        raise StageError(f"{field}: a share of {name} needs {count:,} blocks, it holds {available:,} (give more "
                         f"replay data or a smaller share)")
    return packed_blocks.random_shuffle(seed=seed).limit(count)


def tagged(blocks, source: str):
    return blocks.map_batches(lambda b: b.append_column("source", pa.array([source] * len(b), pa.string())),
                              batch_format="pyarrow")


def write_mix(parts: list, out: str, seed: int) -> int:
    """The blocks of every part, shuffled together (seeded), written to ``out`` as Parquet; returns how many."""
    mixed = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    mixed = mixed.random_shuffle(seed=seed).materialize()
    mixed.write_parquet(out, row_group_size=ROWS_PER_GROUP, min_rows_per_file=4096)
    return mixed.count()
