"""Choosing the next token: pure functions on a batch of logits (B, V), in transformers' order.

    logit_bias -> repetition penalty -> presence/frequency penalties -> temperature -> top-k -> top-p -> min-p
    -> sample (or argmax when not sampling)
"""

from __future__ import annotations

import torch


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None,
                    repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                    frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None) -> torch.Tensor:
    """logits (B, V) float; seen (B, V) bool = in prompt or output; counts (B, V) = times generated so far.

    repetition_penalty follows transformers/CTRL (divide positive scores, multiply negative ones, over prompt and
    output); presence/frequency follow OpenAI (subtract, over generated tokens only).
    """
    if logit_bias:
        ids = torch.tensor(list(logit_bias.keys()), device=logits.device)
        logits[:, ids] += torch.tensor(list(logit_bias.values()), dtype=logits.dtype, device=logits.device)
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if counts is not None and (presence_penalty or frequency_penalty):
        logits = logits - presence_penalty * (counts > 0) - frequency_penalty * counts
    return logits


def warp(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
         min_p: float | None = None) -> torch.Tensor:
    """Reshape the distribution for sampling; removed tokens get -inf."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - top_p  # the low tail whose mass is at most 1 - top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    if min_p:
        probs = logits.softmax(-1)
        threshold = min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def choose(logits: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,): argmax, or a draw from softmax(logits)."""
    if not do_sample:
        return argmax(logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


ARGMAX_BLOCK = 1024


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) for (B, V), the same ids (first maximum; a NaN counts as the maximum), found in two passes:
    each block of 1024 logits' maximum, then the argmax within the first block holding the largest. PyTorch's CPU
    argmax along a row is several times slower than its max: for 49152 logits, 1 / 8 rows, 119 / 473 us against
    55 / 121 here (a compiled decode step of 8 sequences takes 7-11 ms on this machine)."""
    batch, vocab = logits.shape
    if vocab < 2 * ARGMAX_BLOCK:
        return logits.argmax(-1)
    full = vocab // ARGMAX_BLOCK * ARGMAX_BLOCK
    maxima = logits[:, :full].reshape(batch, -1, ARGMAX_BLOCK).amax(-1)  # (B, blocks); amax propagates NaN
    if full < vocab:  # the last, shorter block
        maxima = torch.cat([maxima, logits[:, full:].amax(-1, keepdim=True)], dim=1)
    first = maxima.argmax(-1, keepdim=True) * ARGMAX_BLOCK  # (B, 1)
    # The block's ids; past the end of the vocabulary they repeat its last id, after that id's own first place.
    ids = (first + torch.arange(ARGMAX_BLOCK, device=logits.device)).clamp_(max=vocab - 1)  # (B, block)
    return ids.gather(1, logits.gather(1, ids).argmax(-1, keepdim=True)).squeeze(1)


def verify_draft(scores: torch.Tensor, draft: list[int], do_sample: bool,
                 generator: torch.Generator | None = None) -> tuple[int, int]:
    """Speculative decoding's check of a draft: (how many of its leading tokens are kept, the token after them).

    scores (n + 1, V): the penalised, warped logits for the token after the sequence's last one and after each of
    the n draft tokens. Each draft token is decided by choose_over_draft; the first one not kept is replaced by
    that choice, and after a draft kept whole the next token is chosen as usual.
    """
    assert scores.shape[0] == len(draft) + 1
    for j, token in enumerate(draft):
        chosen = choose_over_draft(scores[j:j + 1], token, do_sample, generator)
        if chosen != token:
            return j, chosen
    return len(draft), int(choose(scores[-1:], do_sample, generator)[0])


def choose_over_draft(scores: torch.Tensor, draft_token: int, do_sample: bool,
                      generator: torch.Generator | None = None) -> int:
    """The next token where a draft proposes draft_token, from scores (1, V) (penalised, warped).

    Greedy: the argmax, whatever the draft: the ids plain greedy decoding gives. Sampling: the draft token with
    probability p(d), else a draw from p without d. Either way the token follows p exactly (P(d) = p(d);
    P(x) = (1 - p(d)) p(x) / (1 - p(d)) for x != d), as if drawn alone.
    """
    if not do_sample:
        return int(argmax(scores)[0])
    probs = scores[0].softmax(-1)  # (V,)
    if torch.rand((), generator=generator) < probs[draft_token]:
        return draft_token
    rest = probs.clone()
    rest[draft_token] = 0
    return int(torch.multinomial(rest, 1, generator=generator))
