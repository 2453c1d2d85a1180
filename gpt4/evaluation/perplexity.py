"""Perplexity and bits per byte of a text, with a sliding window (each token scored once, with as much left
context as the window allows)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import GPT4Error


def check_text(text: str) -> str:
    """The text, or GPT4Error where it has nothing to score."""
    if not text.strip():
        raise GPT4Error("The text is empty: there is nothing to score.")
    return text


@torch.inference_mode()
def perplexity(model, text: str, window: int | None = None, stride: int | None = None,
               progress: bool = True) -> dict:
    """{'tokens', 'bytes', 'nll' (nats, total), 'ppl', 'bits_per_byte'}.

    Windows of `window` tokens advance by `stride`; only the tokens a window adds are scored, so each token
    after the first is predicted once, from up to window - 1 tokens of context (as in HF's perplexity guide).
    """
    check_text(text)
    window = min(window or model.config.max_position_embeddings, model.config.max_position_embeddings)
    stride = stride or max(1, window // 2)
    if not 0 < stride <= window:
        raise GPT4Error(f"--stride must be between 1 and the window ({window}).")
    ids = torch.tensor(model.tokenizer.encode(text))  # (N,)
    if len(ids) < 2:
        raise GPT4Error("The text is a single token: perplexity needs at least two.")
    total, scored, prev_end = 0.0, 0, 1  # token 0 has no context: never scored
    starts = list(range(0, max(1, len(ids) - 1), stride))
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress, leave=False):
        end = min(begin + window, len(ids))
        chunk = ids[begin:end][None]  # (1, W)
        new = end - max(prev_end, begin + 1)  # targets not scored by an earlier window
        if new > 0:
            hidden = model.hidden_states(chunk[:, :-1])[0, -new:]  # (new, H)
            logp = F.log_softmax(model.lm_head(hidden).float(), dim=-1)
            total -= logp.gather(1, chunk[0, -new:, None]).sum().item()
            scored += new
        prev_end = end
        if end == len(ids):
            break
    n_bytes = len(text.encode("utf-8"))
    return {"tokens": scored, "bytes": n_bytes, "nll": total, "ppl": math.exp(total / scored),
            "bits_per_byte": total / math.log(2) / n_bytes, "window": window, "stride": stride}
