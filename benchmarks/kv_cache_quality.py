"""What a KV cache's dtype costs in quality: every position of a long real text scored through the cache.

Whole-window perplexity (bench_inference.py, `gpt4 perplexity`) never reads a cache. Here the text goes through the
model in its prompt chunks (256 tokens for the default model), each chunk after the first attending to the earlier
ones through the cache, as a long prompt and its decoding do; every position's logits are scored. Per cache dtype:
the perplexity, and how often its next-token choice equals the first dtype's.

    python benchmarks/kv_cache_quality.py [--tokens 4096] [--dtypes float32 float16 int8] [--model gpt4]

The text: pydoc's topics from the 9th on, as bench_inference.py's --long-context prompt takes them.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from pydoc_data.topics import topics

from gpt4 import GPT4LMHeadModel


def long_text_ids(tokenizer, count: int) -> list[int]:
    """The first `count` tokens of pydoc's topics from the 9th on (also bench_inference.py's --long-context prompt)."""
    ids: list[int] = []
    for key in sorted(topics)[8:]:
        if len(ids) >= count:
            break
        ids += tokenizer.encode(topics[key] + "\n\n")
    return ids[:count]


@torch.inference_mode()
def score_through_cache(model, ids: list[int]) -> tuple[float, torch.Tensor]:
    """(perplexity of ids[1:], next-token choices (N - 1,)) with every chunk after the first read from the cache."""
    tokens = torch.tensor([ids])  # (1, N)
    n, chunk = len(ids), model.prefill_chunk
    cache = model.new_cache(1, n)
    nll, choices = 0.0, []
    for start in range(0, n - 1, chunk):
        stop = min(n - 1, start + chunk)  # (the last token predicts nothing to score)
        hidden = model.hidden_states(tokens[:, start:stop], torch.arange(start, stop)[None], cache, kv_length=stop)
        logp = F.log_softmax(model.lm_head(hidden[0]).float(), dim=-1)  # (stop - start, V)
        nll -= float(logp.gather(1, tokens[0, start + 1:stop + 1, None]).sum())
        choices.append(logp.argmax(-1))
    return math.exp(nll / (n - 1)), torch.cat(choices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16", "int8"],
                        choices=["float32", "float16", "bfloat16", "int8"])
    parser.add_argument("--model", default="gpt4")
    parser.add_argument("--quant", default="auto")
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error("--tokens: at least 2")
    model = GPT4LMHeadModel.from_pretrained(args.model, dtype="float32", quant=args.quant)
    ids = long_text_ids(model.tokenizer, args.tokens)
    print(f"{len(ids)} tokens of pydoc's topics through the cache in chunks of {model.prefill_chunk} "
          f"({args.model}, float32, --quant {model.quant})")
    print(f"| KV cache | perplexity | next token = {args.dtypes[0]}'s |")
    print("|---|---:|---:|")
    first = None
    for name in args.dtypes:
        model.kv_cache_dtype = getattr(torch, name)
        perplexity, choices = score_through_cache(model, ids)
        first = choices if first is None else first
        print(f"| {name} | {perplexity:.4f} | {float((choices == first).float().mean()):.2%} |", flush=True)


if __name__ == "__main__":
    main()
