"""Our w4a8 kernel against PyTorch's int4 kernel, on the default model's real layers and activations.

`--quant int4` multiplies the file's 4-bit groups with PyTorch's `_weight_int4pack_mm_for_cpu`, which unpacks
nibbles to bf16 and multiplies in floating point. `--quant w4a8` runs the same groups through gpt4/kernels/w4a8.cpp:
activations quantized to int8 in groups of 32 and multiplied by the 4-bit weights in integers (AVX-512 VNNI), as
llama.cpp multiplies its Q4 blocks by Q8 activations. Both kernels get every int4 layer of the default model, fed
the input the model gives it at a decode step of a real prompt.

    python benchmarks/bench_int4_vnni_kernel.py [--rows 1 4 8 16] [--calls 2000] [--perplexity-tokens 4096]
                                                [--out results/int4-vnni-kernel.json]

Prints: per layer shape and row count, each kernel's time a call with the same weights again and again (in cache),
and its error against float32 matmuls with the layer's weights; a decode step's 120 calls in the model's order
(the weights streaming from the last-level cache, and after 200 MB were written over it: from memory); the
model's perplexity on real text (the first pydoc topics, windows of 512) with every layer run by either kernel.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gpt4 import GPT4LMHeadModel
from gpt4.evaluation.perplexity import perplexity
from gpt4.quant import Int4Linear, W4A8Linear


def layer_inputs(model, prompt: str) -> dict[str, torch.Tensor]:
    """Each int4 layer's input at the last position of `prompt` (one row, the compute dtype)."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: seen.__setitem__(name, args[0].reshape(-1, mod.in_features)[-1:])))
    with torch.no_grad():
        model(torch.tensor([model.tokenizer.encode(prompt, add_special_tokens=False)]))
    for hook in hooks:
        hook.remove()
    return seen


def kernels(int4: Int4Linear, w4a8: W4A8Linear):
    """The two kernels as decode calls them, x (rows, in) in the compute dtype -> (rows, out)."""
    return {"pytorch": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4.packed, 32, int4.scales_and_zeros),
            "w4a8": lambda x: torch.ops.gpt4_kernels.w4a8_matmul(x, w4a8.blocks)}


def time_call(fn, calls: int) -> float:
    for _ in range(min(100, calls)):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6  # microseconds


def perplexity_with(model, w4a8_layers: dict[str, W4A8Linear] | None, tokens: int) -> float:
    """The int4 model's perplexity on the first pydoc topics, its layers swapped for w4a8_layers if given and
    forced through the kernel at every row count (prefill otherwise dequantizes: the kernel would not be seen)."""
    from pydoc_data.topics import topics

    import gpt4.quant as quant

    ids = model.tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics)[:8]))[:tokens]
    swapped, rows = {}, quant.DEQUANTIZE_ROWS
    try:
        if w4a8_layers:
            quant.DEQUANTIZE_ROWS = 1 << 30
            for name, layer in w4a8_layers.items():
                parent, _, child = name.rpartition(".")
                swapped[name] = getattr(model.get_submodule(parent), child)
                setattr(model.get_submodule(parent), child, layer)
        return perplexity(model, model.tokenizer.decode(ids), window=512, stride=512, progress=False)["ppl"]
    finally:
        quant.DEQUANTIZE_ROWS = rows
        for name, layer in swapped.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--perplexity-tokens", type=int, default=4096, help="0: skip the perplexity comparison")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    model = GPT4LMHeadModel.from_pretrained("gpt4", dtype="bfloat16", quant="int4")
    int4 = {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear)}
    w4a8 = {name: W4A8Linear.from_int4(m) for name, m in int4.items()}  # builds the kernel on first use
    inputs = layer_inputs(model, "The history of the Roman Empire spans more than a thousand years, from")
    generator = torch.Generator().manual_seed(0)

    by_shape, errors = {}, {}
    for name, layer in int4.items():
        run = kernels(layer, w4a8[name])
        weight = layer.dequantized_t().float()  # (in, out): the 4-bit weights both kernels multiply
        for rows in args.rows:
            x = inputs[name].float().repeat(rows, 1)
            if rows > 1:  # the layer's real input, perturbed for the other rows of a batch
                x[1:] += 0.05 * x[0].std() * torch.randn(x[1:].shape, generator=generator)
            x = x.to(layer.scales_and_zeros.dtype)
            reference = x.float() @ weight
            shape = (layer.out_features, layer.in_features, rows)
            for kernel, fn in run.items():
                error = float((fn(x).float() - reference).norm() / reference.norm())
                errors.setdefault((*shape, kernel), []).append(error)
                if (*shape, kernel) not in by_shape:  # the 30 layers of a shape cost the same
                    by_shape[(*shape, kernel)] = time_call(lambda: fn(x), args.calls)
    print(f"{'out x in':>12} {'rows':>5} {'w4a8 us':>8} {'PyTorch us':>11} {'ratio':>6} {'error w4a8':>11} "
          f"{'error PyTorch':>14}   (same weights again and again: in cache)")
    for n, k, rows, kernel in by_shape:
        if kernel == "w4a8":
            ours, theirs = by_shape[(n, k, rows, "w4a8")], by_shape[(n, k, rows, "pytorch")]
            e_ours, e_theirs = (sum(errors[(n, k, rows, kd)]) / len(errors[(n, k, rows, kd)])
                                for kd in ("w4a8", "pytorch"))
            print(f"{f'{n} x {k}':>12} {rows:>5} {ours:>8.1f} {theirs:>11.1f} {theirs / ours:>6.2f} {e_ours:>11.4f} "
                  f"{e_theirs:>14.4f}")

    evict = torch.empty(200_000_000, dtype=torch.uint8)
    step = {}
    for rows in args.rows:
        xs = {k: torch.randn(rows, k, generator=generator).bfloat16() for k in {m.in_features for m in int4.values()}}
        for kernel in ("pytorch", "w4a8"):
            calls = [(kernels(layer, w4a8[name])[kernel], xs[layer.in_features]) for name, layer in int4.items()]
            for where in ("cache", "memory"):
                total = 0.0
                for _ in range(30):
                    if where == "memory":
                        evict.add_(1)
                    start = time.perf_counter()
                    for fn, x in calls:
                        fn(x)
                    total += time.perf_counter() - start
                step[f"{kernel}/{rows}/{where}"] = total / 30 * 1000
        print(f"a decode step's {len(int4)} calls in model order, {rows} row(s): w4a8 {step[f'w4a8/{rows}/cache']:.2f} "
              f"ms, PyTorch {step[f'pytorch/{rows}/cache']:.2f} ms (weights in the last-level cache); "
              f"{step[f'w4a8/{rows}/memory']:.2f} vs {step[f'pytorch/{rows}/memory']:.2f} ms from memory")

    ppl = {}
    if args.perplexity_tokens:
        ppl = {"pytorch": perplexity_with(model, None, args.perplexity_tokens),
               "w4a8": perplexity_with(model, w4a8, args.perplexity_tokens)}
        print(f"perplexity, {args.perplexity_tokens} tokens of pydoc topics in windows of 512: PyTorch's int4 kernel "
              f"{ppl['pytorch']:.3f}, w4a8 {ppl['w4a8']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        calls = [{"out": n, "in": k, "rows": rows, "kernel": kernel, "us": round(us, 2),
                  "rel_error": sum(errors[(n, k, rows, kernel)]) / len(errors[(n, k, rows, kernel)])}
                 for (n, k, rows, kernel), us in by_shape.items()]
        args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                        "calls": calls, "step_ms": step, "perplexity": ppl}, indent=1) + "\n")


if __name__ == "__main__":
    main()
