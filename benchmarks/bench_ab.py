"""Two or more quantization modes of the default model in one process, generations interleaved: A/B on a noisy VM.

Engines run one after another (bench_inference.py) meet the machine in different moods: on the 2-core VM the same
compiled step measured 92 to 167 tokens/s in fresh processes minutes apart. Here every mode is loaded (and compiled)
once, then they take turns, generation after generation, so drift reaches all alike; medians and bests are printed.

    python benchmarks/bench_ab.py --quant int4 w4a8 [--compile default|max-autotune|aot] [--rows 1 8]
                                  [--tokens 48] [--rounds 8]
    python benchmarks/bench_ab.py --quant w4a8 w4a8:layers w4a8:aot    # a decode mode per model

A mode after the quantization overrides --compile for that model: default, max-autotune or aot (compile_decode), or
"layers": eager decoding through the model's layers, without the fused step (use_fused_decode(False)).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpt4 import GPT4LMHeadModel

PROMPT = "The history of the Roman Empire spans"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant", nargs="+", default=["int4", "w4a8"])
    parser.add_argument("--compile", default=None, help="compile_decode mode for every model (default: eager)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="sequences generated together")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    models, labels = {}, {}
    for spec in args.quant:
        quant, _, mode = spec.partition(":")
        mode = mode or args.compile
        labels[spec] = f"{quant} {mode or 'eager'}"
        models[spec] = model = GPT4LMHeadModel.from_pretrained("gpt4", dtype="bfloat16", quant=quant)
        if mode == "layers":
            model.use_fused_decode(enabled=False)
        elif mode:
            model.compile_decode(mode)
    prompt = models[args.quant[0]].tokenizer.encode(PROMPT)
    for rows in args.rows:
        ids = torch.tensor([prompt] * rows)
        for model in models.values():  # warm-up: graphs for this batch size, the allocator
            model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
        speeds = {quant: [] for quant in models}
        for _ in range(args.rounds):
            for quant, model in models.items():
                start = time.perf_counter()
                out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False, eos_token_id=None)
                speeds[quant].append(rows * (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
        base = statistics.median(speeds[args.quant[0]])
        for quant, values in speeds.items():
            median = statistics.median(values)
            print(f"{rows} sequence(s), {labels[quant]}: median {median:.1f} tokens/s, best {max(values):.1f} "
                  f"({median / base:.2f}x {labels[args.quant[0]]})")


if __name__ == "__main__":
    main()
