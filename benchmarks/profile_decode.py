r"""Where one decode step's time goes: matmuls, attention, norms, sampling, and the Python around them.

Runs the package's own decode loop (generate_tokens) on the default model under torch.profiler and groups the
operators' self CPU time into categories; "outside operators" is wall time no operator accounts for (Python,
dispatch, the loop itself).

    python benchmarks/profile_decode.py --dtype bfloat16 --quant int4 [--tokens 32] [--context 16] [--compile]
                                        [--max-autotune] [--batch 8]

torch.profiler sees a fused w4a8 step as one operator (decode_layers). To look inside it, and at each thread, run the
steps without it under a sampling profiler (Linux perf), starting after the load and the warm-up:

    perf record -F 1999 -k CLOCK_MONOTONIC python benchmarks/profile_decode.py --dtype float32 --quant w4a8 \
        --batch 8 --tokens 400 --no-torch-profiler
    perf report --no-children --sort pid,symbol --time START,END  # as printed: time by thread and function
"""

from __future__ import annotations

import argparse
import os
import time

from torch.profiler import ProfilerActivity, profile

from gpt4 import GPT4LMHeadModel
from gpt4.generation import GenerationConfig, generate_tokens

CATEGORIES = [  # first match wins; operator names as the profiler reports them
    # w4a8 models' eager step: every layer in one call (its matmuls, attention, norms, rotations inside).
    ("fused layers (gpt4_kernels::decode_layers)", ("decode_layers",)),
    ("weight matmuls", ("w4a8_matmul", "q8_matmul", "_weight_int4pack_mm", "_weight_int8pack_mm", "int4mm_packed_weight",
                        "aten::_int_mm", "qlinear_pointwise", "packed_int8_matmul",
                        "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention (SDPA)", ("scaled_dot_product", "_scaled_dot_product", "flash_attention")),
    ("KV cache writes", ("index_copy", "index_put", "scatter")),
    ("norms", ("rms_norm", "rsqrt", "aten::pow", "aten::mean", "aten::sum", "aten::div", "layer_norm")),
    ("activation + rope", ("silu", "gelu", "aten::mul", "aten::add", "aten::neg", "aten::cat", "aten::sin",
                           "aten::cos")),
    ("sampling + logits", ("argmax", "topk", "softmax", "multinomial", "aten::sort")),
    # Compiled: inductor's fused kernels, and under --max-autotune its GEMM templates, run inside this call.
    ("compiled graph (fused kernels, GEMM templates)", ("CompiledFxGraph",)),
    ("graph entry (guards, wrappers)", ("TorchDynamo Cache Lookup", "Torch-Compiled Region", "AOTDispatcher",
                                        "Pregraph bytecode")),
    ("dtype copies", ("aten::to", "aten::_to_copy", "aten::copy_")),
    ("views + allocations", ("as_strided", "aten::view", "reshape", "transpose", "aten::slice", "aten::select",
                             "narrow", "permute", "unsqueeze", "split", "chunk", "aten::empty", "expand",
                             "aten::arange", "aten::fill_", "resize_", "result_type", "type_as", "aten::dropout")),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt4")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quant", default="int4", choices=["none", "int8", "int4", "w8a8", "w4a8"])
    parser.add_argument("--tokens", type=int, default=32, help="decode steps profiled")
    parser.add_argument("--context", type=int, default=16, help="prompt tokens before decoding")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="profile the torch.compile'd decode step")
    parser.add_argument("--max-autotune", action="store_true", help="... compiled in max-autotune mode")
    parser.add_argument("--no-torch-profiler", action="store_true",
                        help="time the steps only (for an external sampler such as perf: see above)")
    args = parser.parse_args()

    model = GPT4LMHeadModel.from_pretrained(args.model, dtype=args.dtype, quant=args.quant,
                                             compile="max-autotune" if args.max_autotune else args.compile)
    prompts = [[(i * 7919 + row) % 10000 + 100 for i in range(args.context)] for row in range(args.batch)]
    config = GenerationConfig(max_new_tokens=args.tokens + 1, eos_token_id=None)
    for _ in generate_tokens(model, prompts, config):  # warm-up: kernels, allocator
        pass

    steps = generate_tokens(model, prompts, config)
    next(steps)  # the prefill and first token are not decode steps
    def headline(per_step_ms: float, n: int) -> str:
        return (f"{args.model} {args.dtype} quant={args.quant} batch={args.batch} context={args.context}: "
                f"{per_step_ms:.2f} ms per decode step ({args.batch * 1e3 / per_step_ms:.1f} tok/s), {n} steps")

    if args.no_torch_profiler:
        start, monotonic_start = time.perf_counter(), time.monotonic()
        n = sum(1 for _ in steps)
        print(f"{headline((time.perf_counter() - start) / n * 1e3, n)}, pid {os.getpid()}; "
              f"perf report --time {monotonic_start:.6f},{time.monotonic():.6f}")
        return
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        n = sum(1 for _ in steps)
        wall = time.perf_counter() - start
    per_step_ms = wall / n * 1e3

    totals = {name: 0.0 for name, _ in CATEGORIES}
    other: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("ProfilerStep"):
            continue
        ms = event.self_cpu_time_total / 1e3 / n
        category = next((name for name, keys in CATEGORIES if any(k in event.key for k in keys)), None)
        if category:
            totals[category] += ms
        else:
            other[event.key] = other.get(event.key, 0.0) + ms
    accounted = sum(totals.values()) + sum(other.values())
    print(headline(per_step_ms, n))
    print("| where | ms per step | share |")
    print("|---|---:|---:|")
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    rows.append(("other operators", sum(other.values())))
    rows.append(("outside operators (Python, dispatch, loop)", max(per_step_ms - accounted, 0.0)))
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {ms / per_step_ms:.0%} |")
    top_other = sorted(other.items(), key=lambda kv: -kv[1])[:6]
    print("other operators, largest: " + ", ".join(f"{k} {v:.2f} ms" for k, v in top_other))


if __name__ == "__main__":
    main()
