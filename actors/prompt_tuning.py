"""DOMINO's soft-prompt objective on a frozen causal LM (../shared/methods.md §3, papers/004).

A domain soft prompt Z (``[m, hidden]``) and, for DOMINO, a private soft prompt z_i per reference sample are the only
trainable tensors. With ℓ(x | P) the token-averaged negative log-likelihood of x after prefix P:

- sufficiency: ``L_suf = mean_i ℓ(x_i | Z)``;
- contrastive disentanglement: ``s_ij = -ℓ(x_j | Z, z_i)``, ``L_con = mean_i [-s_ii + log Σ_j exp(s_ij)]``, all B×B
  pairs of a batch in one batched forward: z_i must help reconstruct x_i and not the others, so what the samples
  share has to live in Z;
- ``L = L_suf + λ·L_con`` (``domino``), or ``L_suf`` alone (``direct``: plain prompt tuning, the Direct-Domain
  baseline).
"""

from __future__ import annotations

import torch
from torch import nn


def nll_after_prefix(lm: nn.Module, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ℓ(x | P) for each row: the token-averaged NLL of ``ids`` (``[R, T]``, right-padded, ``mask`` 1 on real tokens)
    placed after ``prefix`` (``[R, P, hidden]``). Only the logits that predict x are computed (``logits_to_keep``):
    the prefix's would cost R×P×vocab floats for nothing."""
    embeds = lm.get_input_embeddings()(ids)
    inputs = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
    attention = torch.cat([torch.ones(prefix.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1)
    # The logits at positions P-1 .. P+T-2 predict x_0 .. x_{T-1}: the last T+1 positions but the final one.
    logits = lm(inputs_embeds=inputs, attention_mask=attention, logits_to_keep=ids.shape[1] + 1).logits[:, :-1]
    token_nll = nn.functional.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")
    real = mask.to(token_nll.dtype)
    return (token_nll * real).sum(1) / real.sum(1).clamp(min=1)


def contrastive_loss(scores: torch.Tensor) -> torch.Tensor:
    """``mean_i [-s_ii + log Σ_j exp(s_ij)]`` of a ``[B, B]`` score matrix (row i: prefix [Z; z_i], column j: x_j)."""
    return (torch.logsumexp(scores, dim=1) - scores.diagonal()).mean()


class SoftPromptObjective(nn.Module):
    """The frozen LM and the trainable domain prompt Z; ``forward`` returns the loss and its terms. The private
    prompts z_i are an input, not a parameter: each worker keeps its own samples' table outside DDP/ZeRO (it is only
    ever used with those samples, so it needs no all-reduce) and passes the rows of the batch."""

    def __init__(self, lm: nn.Module, domain_init: torch.Tensor, contrastive_weight: float = 1.0):
        super().__init__()
        self.lm = lm
        for p in self.lm.parameters():
            p.requires_grad_(False)
        self.lm.eval()  # frozen, and no dropout: a step is a function of its batch (exact resume)
        self.domain = nn.Parameter(domain_init.detach().clone().float())
        self.contrastive_weight = contrastive_weight

    def train(self, mode: bool = True) -> "SoftPromptObjective":
        super().train(mode)
        self.lm.eval()
        return self

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, private: torch.Tensor | None = None):
        batch = ids.shape[0]
        domain = self.domain.unsqueeze(0).expand(batch, -1, -1)
        sufficiency = nll_after_prefix(self.lm, domain, ids, mask).mean()
        if private is None:
            return sufficiency, {"loss_suf": sufficiency.detach()}
        # Row (i, j) of the pair batch: prefix [Z; z_i] before x_j.
        prefixes = torch.cat([domain, private.to(domain.dtype)], dim=1).repeat_interleave(batch, dim=0)
        pairs = nll_after_prefix(self.lm, prefixes, ids.repeat(batch, 1), mask.repeat(batch, 1))
        contrastive = contrastive_loss(-pairs.view(batch, batch))
        loss = sufficiency + self.contrastive_weight * contrastive
        return loss, {"loss_suf": sufficiency.detach(), "loss_con": contrastive.detach()}


def init_from_vocabulary(embeddings: torch.Tensor, num_tokens: int, seed: int) -> torch.Tensor:
    """``num_tokens`` rows of the embedding matrix, of token ids drawn uniformly (seeded): a start that lies where
    the model's inputs lie, unlike random noise."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, embeddings.shape[0], (num_tokens,), generator=generator)
    return embeddings[ids].detach().clone().float()


def init_from_text(embeddings: torch.Tensor, token_ids: list[int], num_tokens: int) -> torch.Tensor:
    """The embeddings of a text's tokens, repeated or cut to ``num_tokens`` (PEFT's TEXT initialisation)."""
    if not token_ids:
        raise ValueError("init_text: the text has no tokens")
    repeats = -(-num_tokens // len(token_ids))
    ids = torch.tensor((token_ids * repeats)[:num_tokens])
    return embeddings[ids].detach().clone().float()
