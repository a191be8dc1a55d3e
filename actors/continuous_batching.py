"""Continuous batching for the transformers engine inside a Serve replica: sequences that arrive while others are
being written join the running batch at the next step (iteration-level scheduling, as in Orca and vLLM), and a
sequence that ends or whose client left leaves it at once. Each sequence keeps its own sampling parameters, seed,
stop strings, JSON schema, soft prompt (embeddings before its prompt) and LoRA adapter (``actors/multi_lora.py``),
so requests for different domains share every step of one base model.

One scheduler thread owns the model. Each turn it prefills the sequences that arrived (together, left-padded),
appends their key/value cache to the running batch's (left-padding the shorter side, so padding is always at the
left, where the attention mask hides it), then runs one decoding step for every running sequence. Positions count
each row's own tokens, so a row's arithmetic is the one it would get alone; only the matrix shapes differ.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .engines import Delta, SamplingParams, UnsatisfiableSchema, _first_stop, effective_temperature

logger = logging.getLogger("ray.serve")


@dataclass(eq=False)
class Sequence:
    """One completion being written: its prompt (token ids), domain (soft prompt and/or LoRA adapter), parameters
    (``n`` is 1) and where its pieces go. ``emit`` is called from the scheduler thread with each ``Delta`` (the last
    one has a ``finish_reason``) or with the exception that ended it."""
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[object], None]
    prefix: Optional[np.ndarray] = None
    adapter: Optional[str] = None
    cancelled: bool = False
    # written by the scheduler
    generated: list[int] = field(default_factory=list)
    text: str = ""  # what the generated tokens spell, as far as it is settled
    prefix_offset: int = 0  # incremental decoding: tokens from here on are decoded again for the next token
    read_offset: int = 0  # ... of which those before this one are already in ``text``
    sent: int = 0  # characters of text already emitted
    done: bool = False
    generator: object = None
    matcher: object = None


class ContinuousBatcher:
    """Runs ``engine``'s model (a ``TransformersEngine``) for every submitted ``Sequence``, at most
    ``max_batch_size`` at a time; the rest wait their turn in arrival order."""

    def __init__(self, engine, max_batch_size: int = 16):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: expected at least 1, got {max_batch_size}")
        self.engine, self.max_batch_size = engine, max_batch_size
        # The scheduler decodes with its own tokenizer: a fast tokenizer used from two threads at once (the event
        # loop counting a new prompt's tokens while this thread decodes) can fail with "Already borrowed".
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self._waiting: queue.Queue = queue.Queue()
        self._active: list[Sequence] = []
        self._cache = self._mask = self._positions = self._last = None
        self.steps = 0  # decoding steps run
        self.peak_running = 0  # the most sequences one step has decoded together
        self.cancelled = 0  # sequences that left before their end (their client went away)
        self._thread = threading.Thread(target=self._loop, name="continuous-batching", daemon=True)
        self._thread.start()

    # -- what the replica calls --------------------------------------------------------------------------------------

    def submit(self, sequence: Sequence) -> None:
        self._waiting.put(sequence)

    @staticmethod
    def cancel(sequence: Sequence) -> None:
        """The client is gone: the sequence leaves the batch before the next step (or is never started)."""
        sequence.cancelled = True

    def load(self) -> dict:
        """Sequences being written now and waiting to start (what /health reports)."""
        return {"running": sum(not s.done for s in list(self._active)), "waiting": self._waiting.qsize(),
                "peak_running": self.peak_running, "cancelled": self.cancelled}

    # -- the scheduler -----------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            arrived: list[Sequence] = []
            try:
                arrived = self._admit()
                if arrived:
                    self._prefill(arrived)
                self._retire()
                if self._active:
                    self._decode()
                    self._retire()
            except Exception as e:  # a fault of the whole step (e.g. out of memory): every sequence in it ends
                logger.exception("batched generation step failed")
                for s in {*self._active, *arrived}:
                    if not s.done:
                        s.done = True
                        s.emit(e)
                self._active, self._cache = [], None

    def _admit(self) -> list[Sequence]:
        """Sequences to start now: as many as there is room for; waits for one when nothing is running."""
        arrived: list[Sequence] = []
        room = self.max_batch_size - len(self._active)
        while len(arrived) < room:
            try:
                s = self._waiting.get(block=not self._active and not arrived)
            except queue.Empty:
                break
            if s.cancelled:  # its client left while it waited
                s.done = True
                self.cancelled += 1
            else:
                arrived.append(s)
        return arrived

    def _forward(self, embeds, mask, positions, sequences: list[Sequence], cache):
        import torch

        lora = self.engine.lora
        if lora is not None:  # each row's own adapter (slot 0: none)
            lora.select([lora.slot(s.adapter) for s in sequences])
        try:
            with torch.no_grad():
                # logits_to_keep=1: only the last position's (a prompt's other positions would cost the output
                # layer once per prompt token for nothing)
                out = self.engine.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                        past_key_values=cache, use_cache=True, logits_to_keep=1)
        finally:
            if lora is not None:
                lora.select(None)
        return out.logits[:, -1, :].float(), out.past_key_values

    def _prefill(self, arrived: list[Sequence]) -> None:
        """Run the new sequences' prompts (left-padded together), pick their first tokens, and append them to the
        running batch."""
        import torch
        from transformers import DynamicCache

        engine = self.engine
        embed = engine.model.get_input_embeddings()
        with torch.no_grad():
            rows = []
            for s in arrived:
                row = embed(torch.tensor(s.prompt_ids, device=engine.device))
                if s.prefix is not None:
                    row = torch.cat([torch.as_tensor(s.prefix, dtype=row.dtype, device=engine.device), row])
                rows.append(row)
        width = max(len(r) for r in rows)
        embeds = torch.zeros(len(rows), width, engine.hidden_size, dtype=rows[0].dtype, device=engine.device)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=engine.device)
        positions = torch.zeros(len(rows), width, dtype=torch.long, device=engine.device)
        for i, row in enumerate(rows):
            embeds[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
            positions[i, width - len(row):] = torch.arange(len(row), device=engine.device)
        for s in arrived:
            self._start(s)
        logits, cache = self._forward(embeds, mask, positions, arrived, DynamicCache(config=engine.model.config))
        last = torch.tensor([self._next_token(s, logits[i]) for i, s in enumerate(arrived)], device=engine.device)
        self._append(arrived, cache, mask, torch.tensor([len(r) for r in rows], device=engine.device), last)

    def _decode(self) -> None:
        """One step for every running sequence: each reads the token it picked last."""
        import torch

        with torch.no_grad():
            embeds = self.engine.model.get_input_embeddings()(self._last[:, None])
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        logits, self._cache = self._forward(embeds, self._mask, self._positions[:, None], self._active, self._cache)
        self._positions = self._positions + 1
        self._last = torch.tensor([self._next_token(s, logits[i]) for i, s in enumerate(self._active)],
                                  device=self._last.device)
        self.steps += 1
        self.peak_running = max(self.peak_running, len(self._active))

    def _append(self, arrived, cache, mask, positions, last) -> None:
        """The new rows' cache, mask, next positions and last tokens after the running batch's."""
        import torch
        import torch.nn.functional as F

        if not self._active:
            self._active, self._cache, self._mask, self._positions, self._last = \
                list(arrived), cache, mask, positions, last
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def left_pad(t, dim_from_end: int):
            missing = width - t.shape[-dim_from_end]
            if not missing:
                return t
            pad = [0, 0] * (dim_from_end - 1) + [missing, 0]
            return F.pad(t, pad)

        for old, new in zip(self._cache.layers, cache.layers):  # [batch, heads, length, head_dim]
            old.keys = torch.cat([left_pad(old.keys, 2), left_pad(new.keys, 2)])
            old.values = torch.cat([left_pad(old.values, 2), left_pad(new.values, 2)])
        self._mask = torch.cat([left_pad(self._mask, 1), left_pad(mask, 1)])
        self._positions = torch.cat([self._positions, positions])
        self._last = torch.cat([self._last, last])
        self._active += arrived

    def _retire(self) -> None:
        """Drop finished and cancelled rows from the batch, and the padding columns no remaining row needs."""
        import torch

        keep = [i for i, s in enumerate(self._active) if not s.done and not s.cancelled]
        if len(keep) == len(self._active):
            return
        for s in self._active:
            if s.cancelled and not s.done:
                s.done = True
                self.cancelled += 1
        if not keep:
            self._active, self._cache = [], None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._active = [self._active[i] for i in keep]
        self._mask, self._positions, self._last = self._mask[index], self._positions[index], self._last[index]
        unused = int(self._mask.argmax(dim=1).min())  # leading columns that are padding in every row
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[index, :, unused:], layer.values[index, :, unused:]
        self._mask = self._mask[:, unused:]

    # -- one sequence's token ----------------------------------------------------------------------------------------

    def _start(self, s: Sequence) -> None:
        import torch

        if s.params.seed is not None and effective_temperature(s.params.temperature) > 0:
            s.generator = torch.Generator(device=self.engine.device).manual_seed(s.params.seed % 2**64)
        if s.params.json_schema is not None:
            import xgrammar

            s.matcher = xgrammar.GrammarMatcher(self.engine.compiled_json_schema(s.params.json_schema))

    def _next_token(self, s: Sequence, logits) -> int:
        """Pick ``s``'s next token from its logits row, record it, and emit what became text; marks ``s`` done when
        it ends. An error of this sequence alone (its schema has no way on) ends it and not the batch."""
        try:
            token = self._pick(s, logits)
        except UnsatisfiableSchema as e:
            s.done = True
            s.emit(e)
            return 0
        eos = self.tokenizer.eos_token_id
        counted = len(s.generated) + 1  # the end-of-sequence token counts against max_tokens, as in generate()
        if token == eos and not s.params.ignore_eos:
            self._finish(s, "stop")
            return token
        s.generated.append(token)
        self._extend_text(s)
        if _first_stop(s.text, s.params.stop) >= 0:
            self._finish(s, "stop")
        elif counted >= s.params.max_tokens:
            self._finish(s, "length")
        else:
            # Hold back what could still become a stop string.
            safe = len(s.text) - max((len(stop) - 1 for stop in s.params.stop), default=0)
            if safe > s.sent:
                s.emit(Delta(s.text[s.sent:safe]))
                s.sent = safe
        return token

    def _extend_text(self, s: Sequence) -> None:
        """Add to ``s.text`` what the newest token spells, decoding only the last few tokens (as vLLM's incremental
        detokenizer does): from the tokens already spelt before them, so that a tokenizer that spells a leading
        space from context spells it the same; a character still being spelt byte by byte waits for its last byte.
        Decoding everything each step would cost a sequence time quadratic in its length."""
        before = self.tokenizer.decode(s.generated[s.prefix_offset:s.read_offset], skip_special_tokens=True)
        after = self.tokenizer.decode(s.generated[s.prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            s.text += after[len(before):]
            s.prefix_offset, s.read_offset = s.read_offset, len(s.generated)

    def _pick(self, s: Sequence, logits) -> int:
        import torch

        from .sampling import truncated_distribution

        row = logits[None, :]
        if s.matcher is not None:
            row = self.engine.constrain_to_json(s.matcher, row)
        temperature = effective_temperature(s.params.temperature)
        if temperature == 0:
            token = int(row.argmax(dim=-1))
        else:
            ids, probs = truncated_distribution(row, temperature, s.params.top_p, s.params.top_k)
            token = int(ids[0, torch.multinomial(probs[0], 1, generator=s.generator)])
        if s.matcher is not None:
            s.matcher.accept_token(token)
        return token

    def _finish(self, s: Sequence, reason: str) -> None:
        """The last piece: the whole completion decoded at once (what ``generate`` returns), cut before its first
        stop string."""
        text = self.tokenizer.decode(s.generated, skip_special_tokens=True)
        cut = _first_stop(text, s.params.stop)
        if cut >= 0:  # the stop string itself is not returned (OpenAI's convention)
            text, reason = text[:cut], "stop"
        s.done = True
        s.emit(Delta(text[s.sent:], reason, len(s.prompt_ids), len(s.generated)))
