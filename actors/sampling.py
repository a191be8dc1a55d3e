"""Temperature, top-k and top-p sampling on a short list of candidate tokens, for the transformers engine.

transformers samples by sorting the whole vocabulary for top-p and drawing from a softmax over all of it, every
step: for a 135M model with a 49,152-token vocabulary on a CPU that is a fifth of each decoding step. The nucleus
almost always lies among the few hundred most likely tokens, so this sampler looks there first (``torch.topk``)
and sorts the whole vocabulary only for a row whose nucleus reaches past them. The distribution is exactly the one
transformers' (and vLLM's) warpers give: temperature, then top-k, then top-p over what top-k kept.

It runs as the last logits processor of a greedy ``generate``: it draws each row's token and leaves only that token
allowed, so the greedy step picks it.
"""

from __future__ import annotations

CANDIDATES = 256  # tokens looked at first; enough for the nucleus of nearly every step of a real model


def truncated_distribution(scores, temperature: float, top_p: float = 1.0, top_k: int = 0,
                           candidates: int = CANDIDATES):
    """(token ids, probabilities), both ``[rows, c]``: the tokens sampling may pick in each row, most likely first,
    with their probabilities after temperature, top-k and top-p (each row sums to 1; tokens cut off have 0)."""
    import torch

    scores = scores.float() / temperature
    vocab = scores.shape[-1]
    keep = min(top_k, vocab) if top_k else vocab  # top-k's cut, before the nucleus
    look = min(keep, candidates)
    while True:
        top, ids = scores.topk(look, dim=-1)  # sorted, most likely first
        # Normalise over what top-k keeps: the candidates when they are all of it, else the whole row.
        norm = torch.logsumexp(top if look == keep else scores, dim=-1, keepdim=True)
        probs = (top - norm).exp()
        if top_p >= 1.0 and look == keep:
            break
        before = probs.cumsum(dim=-1) - probs  # mass of the likelier candidates
        # The nucleus is inside the candidates when they reach top_p, or when they hold every allowed token.
        inside = (before[:, -1] + probs[:, -1] >= top_p) | torch.isneginf(top[:, -1]) | (look == keep)
        if top_p < 1.0 and bool(inside.all()):
            # Keep a token while less than top_p precedes it, and always the likeliest (as transformers'
            # min_tokens_to_keep=1): a top_p below float32's smallest value would otherwise cut every token.
            cut = before >= top_p
            cut[:, 0] = False
            probs = probs.masked_fill(cut, 0.0)
            break
        look = keep  # some row's nucleus (or top_p 1 with a wide top-k) reaches past the candidates: look at all
    return ids, probs / probs.sum(dim=-1, keepdim=True)


class SampleAsLastProcessor:
    """A logits processor that samples: each row's drawn token keeps its score, every other token gets -inf, so a
    greedy ``generate`` emits the drawn token. Draws use torch's global generator (seeded by the engine)."""

    def __init__(self, temperature: float, top_p: float, top_k: int):
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def __call__(self, input_ids, scores):
        import torch

        ids, probs = truncated_distribution(scores, self.temperature, self.top_p, self.top_k)
        drawn = ids.gather(-1, torch.multinomial(probs, 1))
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(-1, drawn, 0.0)
