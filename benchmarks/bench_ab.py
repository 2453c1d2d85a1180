"""Two or more quantization modes of the default model in one process, generations interleaved: A/B on a noisy VM.

Engines run one after another (bench_inference.py) meet the machine in different moods: on the 2-core VM the same
compiled step measured 92 to 167 tokens/s in fresh processes minutes apart. Here every mode is loaded (and compiled)
once, then they take turns, generation after generation, so drift reaches all alike; medians and bests are printed.

    python benchmarks/bench_ab.py --quant int4 w4a8 [--compile default|max-autotune|aot] [--rows 1 8]
                                  [--tokens 48] [--rounds 8]
    python benchmarks/bench_ab.py --quant w4a8 w4a8:layers w4a8:aot    # a decode mode per model
    python benchmarks/bench_ab.py --dtype float32 --quant w4a8 w4a8:layers --prompt 512 --rounds 12  # prompts

A mode after the quantization overrides --compile for that model: default, max-autotune or aot (compile_decode), or
"layers": eager decoding and prompts through the model's layers, without the fused calls (use_fused_decode(False)).
--prompt N times a prompt of N tokens of pydoc's topics instead (in the model's chunks, as generation prefills it).
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
    parser.add_argument("--dtype", default="bfloat16", help="the models' dtype (float32 is the default where bf16 "
                                                          "is not native)")
    parser.add_argument("--prompt", type=int, default=0, help="time prompts of this many tokens, not generation")
    args = parser.parse_args()
    models, labels = {}, {}
    for spec in args.quant:
        quant, _, mode = spec.partition(":")
        mode = mode or args.compile
        labels[spec] = f"{quant} {mode or 'eager'}"
        models[spec] = model = GPT4LMHeadModel.from_pretrained("gpt4", dtype=args.dtype, quant=quant)
        if mode == "layers":
            model.use_fused_decode(enabled=False)
        elif mode:
            model.compile_decode(mode)
    if args.prompt:
        compare_prompts(models, labels, args.quant[0], args.prompt, args.rounds)
        return
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
        report(f"{rows} sequence(s)", speeds, labels, args.quant[0])


def compare_prompts(models: dict, labels: dict, first: str, length: int, rounds: int) -> None:
    """Prompts of `length` tokens of real text through each model in turns, in its chunks, into a fresh cache."""
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics))
    ids = torch.tensor([models[first].tokenizer.encode(text[:12 * length])[:length]])
    if ids.shape[1] < length:
        raise SystemExit(f"--prompt {length}: pydoc's topics gave only {ids.shape[1]} tokens here")
    positions = torch.arange(length)[None]

    def prefill(model) -> float:
        cache, chunk = model.new_cache(1, length), model.prefill_chunk
        start = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, length, chunk):
                model.hidden_states(ids[:, s:s + chunk], positions[:, s:s + chunk], cache)
        return time.perf_counter() - start

    for model in models.values():  # warm-up: the allocator, the kernels' buffers
        prefill(model)
    speeds = {spec: [] for spec in models}
    for _ in range(rounds):
        for spec, model in models.items():
            speeds[spec].append(length / prefill(model))
    report(f"a {length}-token prompt", speeds, labels, first)


def report(what: str, speeds: dict, labels: dict, first: str) -> None:
    base = statistics.median(speeds[first])
    for spec, values in speeds.items():
        median = statistics.median(values)
        print(f"{what}, {labels[spec]}: median {median:.1f} tokens/s, best {max(values):.1f} "
              f"({median / base:.2f}x {labels[first]})")


if __name__ == "__main__":
    main()
