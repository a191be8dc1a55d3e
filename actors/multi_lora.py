"""Many LoRA adapters on one base model, applied per row of a batch (the problem S-LoRA and vLLM's Punica kernels
solve on GPUs). Each adapted linear layer keeps every adapter's A matrices stacked into one ``[n x r, in]`` matrix and
their B matrices (scaling folded in) side by side in one ``[out, n x r]``; a forward hook computes ``x A^T`` for all
adapters at once, zeroes in each row the columns of the adapters that row does not use (a one-hot mask made once
per forward pass), and adds the product with B. Two matrix products per layer whatever the mix of adapters; the
wasted work is ``n x r`` columns instead of ``r``, small next to the layer itself.

Why not PEFT's mixed-adapter batches (``adapter_names``): they split the batch by adapter in Python inside every
layer; on SmolLM2 on 2 CPUs a batch of 4 domains decoded at 0.59x the base model's speed (``benchmarks/serve.py``),
and gathering each row's matrices (``A[slot]``, batched products) still cost 26% a step for LoRA rows. The adapters
are PEFT's own folders (the ``finetune`` and ``preference`` outputs), read with PEFT's config class;
``tests/test_continuous_batching.py`` checks the logits against PEFT's own forward."""

from __future__ import annotations

import os
from typing import Optional


class MultiLoRA:
    """The adapters loaded on ``model`` (a Hugging Face causal LM). ``select(slots)`` (one per batch row; ``slot(name)``
    gives an adapter's, 0 is none) before a forward pass, ``select(None)`` after: the base model alone."""

    def __init__(self, model):
        self.model = model
        self.names: list[str] = []  # adapter names[i] has slot i + 1
        self.rank = 0  # every adapter's matrices are zero-padded to the largest rank
        self._weights: dict[str, list] = {}  # module name -> per adapter (A [r, in], B [out, r] scaled) or None
        self._stacked: dict[str, tuple] = {}  # module name -> (A [n*r, in], B [out, n*r])
        self._mask = None  # [rows, 1, n*r]: 1 where a column belongs to the row's adapter
        self._hooked: set[str] = set()

    def slot(self, name: Optional[str]) -> int:
        return 0 if name is None else self.names.index(name) + 1

    def select(self, slots: Optional[list[int]]) -> None:
        import torch

        if slots is None or not any(slots):  # no row has an adapter: the hooks step aside
            self._mask = None
            return
        columns = torch.arange(1, len(self.names) + 1).repeat_interleave(self.rank)  # each column's slot
        self._mask = (torch.tensor(slots)[:, None] == columns[None, :]).to(self._dtype())[:, None, :]

    def load(self, name: str, path: str) -> None:
        """Add the PEFT LoRA folder ``path`` as adapter ``name``; ValueError saying why when it cannot be served
        this way (another PEFT method, DoRA, extra trained modules, layers the base lacks or shapes it lacks)."""
        weights = _adapter_weights(path, self.model)  # checked whole before anything changes
        for module in set(self._weights) | set(weights):
            self._weights.setdefault(module, [None] * len(self.names)).append(weights.get(module))
        self.names.append(name)
        self.rank = max(pair[0].shape[0] for per_adapter in self._weights.values() for pair in per_adapter
                        if pair is not None)
        for module, per_adapter in self._weights.items():
            self._stacked[module] = self._stack(module, per_adapter)
            if module not in self._hooked:
                self.model.get_submodule(module).register_forward_hook(self._hook(module))
                self._hooked.add(module)

    def _dtype(self):
        return next(iter(self._stacked.values()))[0].dtype

    def _stack(self, module: str, per_adapter: list) -> tuple:
        import torch

        linear = self.model.get_submodule(module)
        kind = {"dtype": linear.weight.dtype, "device": linear.weight.device}
        a_all = torch.zeros(len(per_adapter) * self.rank, linear.in_features, **kind)
        b_all = torch.zeros(linear.out_features, len(per_adapter) * self.rank, **kind)
        for i, pair in enumerate(per_adapter):
            if pair is not None:
                a, b = pair
                a_all[i * self.rank:i * self.rank + a.shape[0]] = a.to(**kind)
                b_all[:, i * self.rank:i * self.rank + b.shape[1]] = b.to(**kind)
        return a_all, b_all

    def _hook(self, module: str):
        from torch.nn import functional as F

        def add_update(layer, inputs, output):
            mask = self._mask
            if mask is None:
                return output
            a_all, b_all = self._stacked[module]
            low = F.linear(inputs[0], a_all) * mask.to(inputs[0].device)  # [rows, tokens, n*r]
            return output + F.linear(low, b_all)

        return add_update


def _adapter_weights(path: str, model) -> dict:
    """module name -> (A [r, in], B [out, r] times the adapter's scaling) for the PEFT LoRA folder ``path``."""
    from peft import PeftConfig
    from safetensors.torch import load_file
    from torch import nn

    config = PeftConfig.from_pretrained(path)
    if config.peft_type != "LORA":
        raise ValueError(f"a {config.peft_type} adapter, not LoRA")
    unsupported = [what for what, present in (
        ("DoRA", getattr(config, "use_dora", False)), ("extra trained modules (modules_to_save)",
                                                        bool(getattr(config, "modules_to_save", None))),
        ("LoRA biases", getattr(config, "lora_bias", False)), ("fan_in_fan_out layers",
                                                                getattr(config, "fan_in_fan_out", False)),
        ("per-module alphas (alpha_pattern)", bool(getattr(config, "alpha_pattern", None))),
        ("target_parameters", bool(getattr(config, "target_parameters", None)))) if present]
    if unsupported:
        raise ValueError(f"uses {', '.join(unsupported)}, which the endpoint does not serve; merge it "
                         f"(finetune.merge) and serve the merged model")
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    pairs: dict[str, dict] = {}
    for key, tensor in tensors.items():
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ValueError(f"holds {key}, which is not a LoRA A or B matrix of a linear layer")
        pairs.setdefault(module, {})[part[0]] = tensor
    out = {}
    for module, pair in pairs.items():
        try:
            linear = model.get_submodule(module)
        except AttributeError:
            raise ValueError(f"adapts {module}, which this model does not have") from None
        a, b = pair.get("A"), pair.get("B")
        if not isinstance(linear, nn.Linear) or a is None or b is None or a.shape[0] != b.shape[1] \
                or a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
            raise ValueError(f"its matrices for {module} do not fit this model's layer "
                             f"({type(linear).__name__} {getattr(linear, 'in_features', '?')} -> "
                             f"{getattr(linear, 'out_features', '?')})")
        rank = a.shape[0]
        scaling = config.lora_alpha / (rank ** 0.5 if getattr(config, "use_rslora", False) else rank)
        out[module] = (a, b * scaling)
    if not out:
        raise ValueError("holds no LoRA weights")
    return out
