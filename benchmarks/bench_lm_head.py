"""The default model's LM head (49152 x 576, tied to the embedding; Q8_0 in its file) through each 8-bit kernel.

    q8 (w4a8's head): the file's Q8_0 groups of 32 times activations quantized to int8 in groups of 32, our kernel
        (gpt4_kernels.q8_matmul, AVX-512 VNNI or AVX2);
    int8, weight-only: per-row int8 weights, bf16 activations (aten._weight_int8pack_mm; int4's eager head);
    int8, integer: the same weights packed for oneDNN, activations as two int8 rows (~16 bits; int4's head under
        --compile, where the CPU has VNNI).

Each gets the final hidden states of a real prompt's last positions (bf16), one to 16 rows; times are medians of
many calls (the 28-30 MB of weights stay in a large last-level cache), errors are against an fp32 matmul with the
file's own table.

    python benchmarks/bench_lm_head.py [--rows 1 4 8 16] [--calls 300] [--out results/lm-head.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from gpt4 import GPT4LMHeadModel
from gpt4.quant import Int8Linear, Q8Linear

PROMPT = ("The history of the Roman Empire spans more than a thousand years, from the founding of the city to the "
          "fall of Constantinople in 1453, and its")


def median_ms(fn, calls: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()

    model = GPT4LMHeadModel.from_pretrained("gpt4", dtype="bfloat16", quant="w4a8")
    q8 = model.lm_head
    assert isinstance(q8, Q8Linear), "the w4a8 head needs our kernel (AVX-512 VNNI or AVX2)"
    table = q8.dequantized().float()  # (vocab, hidden): the file's Q8_0 values, exactly
    weight_only = Int8Linear(table, None)
    integer = Int8Linear(table, None)
    integer.use_integer_matmul(keep_rows=False)
    heads = {"q8 (w4a8)": q8, "int8 weight-only": weight_only, "int8 integer (16-bit activations)": integer}

    ids = torch.tensor([model.tokenizer.encode(PROMPT)])
    with torch.no_grad():
        hidden = model.hidden_states(ids)[0]  # (S, hidden), bf16
    results = []
    for rows in args.rows:
        x = hidden[-rows:].contiguous()
        exact = x.float() @ table.t()
        row = {"rows": rows}
        with torch.no_grad():
            for name, head in heads.items():
                ms = median_ms(lambda: head(x), args.calls)
                error = ((head(x).float() - exact).norm() / exact.norm()).item()
                row[name] = {"ms": round(ms, 3), "relative_error": round(error, 5)}
        results.append(row)
        print(f"{rows:2d} row(s): " + "; ".join(f"{name} {r['ms']:.3f} ms (error {r['relative_error']:.4f})"
                                                for name, r in row.items() if name != "rows"))
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
