"""Our block kernels alone: each format's matmul at a few row counts, on random blocks of a layer's shape.

For kernel work: a change to gpt4/kernels/w4a8.cpp shows here before it shows, within the VM's noise, in a whole
model. Random bytes with small float16 scales (the speed of a block does not depend on its values); each call's
weights stay in cache when they fit (a 4864 x 896 layer of 5-bit blocks is 3 MB), so this measures the kernel's
arithmetic, and `--stream` the memory side: a decode step's worth of distinct layers (96 MB, the default model's
4-bit layers and its 8-bit head, as 60 layers of 3072 x 576 and one of 49152 x 576), one row, over and over.
`--attention` times the decode step's attention kernel (decode_attention) over the default model's 30 layers of
float16 KV cache (3 KV heads of 3 query rows, head size 64) at each number of slots: with the caches in cache where
they fit (30 layers of 512 slots are 12 MB) and read from memory (128 MB written between steps), as in a step.

    python benchmarks/bench_kernels.py [--formats w4a8 q5 q5k q6 q8] [--shape 4864x896] [--rows 1 8 64 512]
    python benchmarks/bench_kernels.py --stream
    python benchmarks/bench_kernels.py --attention 512 4096 [--kv-dtype int8]
    python benchmarks/bench_kernels.py --threads 1 2 --formats w4a8 q8 --shape 3072x576  # what a second thread adds

Prints per format and row count the best time a call of --repeats, the products a second (GMAC/s) and the blocks'
bytes a second; with several --threads, each row count at each thread count in turn (and the stream at each). To
compare two versions of the kernel, run this in alternating processes (the build is cached per source): the VM's
speed drifts by up to 2x within minutes.
"""

from __future__ import annotations

import argparse
import time

import torch

from gpt4.cache import quantize_slots
from gpt4.kernels import BLOCK_LAYOUTS, load_w4a8


def random_blocks(kind: str, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(n / 16, k / 32, bytes) random blocks of `kind` whose float16 values (from byte `scales` on) are small."""
    size, scales = BLOCK_LAYOUTS[kind]
    blocks = torch.randint(0, 256, (n // 16, k // 32, size), dtype=torch.uint8, generator=generator)
    halves = (torch.rand(n // 16, k // 32, (size - scales) // 2, generator=generator) * 0.02 - 0.01).half()
    blocks[..., scales:] = halves.view(torch.uint8)
    return blocks


def best_seconds(fn, repeats: int, work: float) -> float:
    """The best of `repeats` timings of enough calls of fn to take ~0.05 s (work: its products a call)."""
    calls = max(1, int(5e7 / work))
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def time_attention(slot_counts: list[int], thread_counts: list[int], repeats: int, generator,
                   kv_dtype: str = "float16") -> None:
    """decode_attention over 30 layers' caches (1, 3, slots, 64) of 3 query rows, fp16 or int8 rows (KVCache's): one
    step's 30 calls, the median of 5 steps, best of `repeats`, with the caches where the last step left them and read
    from memory."""
    evict = torch.zeros(32 * 2**20)  # 128 MB, written between steps: more than the last-level cache
    print(f"| slots | threads | warm ms a step | from memory ms a step | cache GB/s from memory |  ({kv_dtype} cache)")
    print("|---:|---:|---:|---:|---:|")
    for slots in slot_counts:
        caches = [torch.randn(2, 1, 3, slots, 64, generator=generator) for _ in range(30)]
        caches = [quantize_slots(c) if kv_dtype == "int8" else c.half() for c in caches]
        q = torch.randn(1, 3, 3, 64, generator=generator)

        def step_ms(cold: bool) -> float:
            times = []
            for _ in range(5):
                if cold:
                    evict.add_(1)
                start = time.perf_counter()
                for cache in caches:
                    torch.ops.gpt4_kernels.decode_attention(q, cache[0], cache[1], None, 0.125)
                times.append(time.perf_counter() - start)
            return sorted(times)[2] * 1e3

        for threads in thread_counts:
            torch.set_num_threads(threads)
            step_ms(False)
            warm, cold = (min(step_ms(cold) for _ in range(repeats)) for cold in (False, True))
            megabytes = sum(c.numel() * c.element_size() for c in caches) / 1e6
            print(f"| {slots} | {threads} | {warm:.3f} | {cold:.3f} | {megabytes / cold:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+", default=list(BLOCK_LAYOUTS), choices=list(BLOCK_LAYOUTS))
    parser.add_argument("--shape", default="4864x896", help="out x in features (multiples of 16 and 32)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--stream", action="store_true", help="a decode step's 96 MB of distinct layers, one row")
    parser.add_argument("--attention", type=int, nargs="+", metavar="SLOTS",
                        help="time decode attention over 30 layers' caches of these many slots instead")
    parser.add_argument("--kv-dtype", default="float16", choices=["float16", "int8"],
                        help="--attention's cache: float16, or int8 rows (--kv-dtype int8's)")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="intra-op thread counts, taken in turn (default: PyTorch's)")
    args = parser.parse_args()
    if min(args.threads) < 1:
        parser.error("--threads: counts of at least 1")
    if args.attention and min(args.attention) < 1:
        parser.error("--attention: slot counts of at least 1")
    load_w4a8()
    ops, generator = torch.ops.gpt4_kernels, torch.Generator().manual_seed(0)

    if args.attention:
        time_attention(args.attention, args.threads, args.repeats, generator, args.kv_dtype)
        return
    if args.stream:
        layers = [random_blocks("w4a8", 3072, 576, generator) for _ in range(60)]
        head = random_blocks("q8", 49152, 576, generator)
        x = torch.randn(1, 576, generator=generator)

        def step():
            for blocks in layers:
                ops.w4a8_matmul(x, blocks)
            ops.q8_matmul(x, head)

        total = sum(b.numel() for b in layers) + head.numel()
        for threads in args.threads:
            torch.set_num_threads(threads)
            seconds = best_seconds(step, args.repeats, 5e7)
            print(f"stream: {total / 1e6:.0f} MB of blocks a step, one row, {threads} threads: {seconds * 1e3:.2f} ms "
                  f"({total / seconds / 1e9:.1f} GB/s)")
        return

    n, k = (int(v) for v in args.shape.lower().split("x"))
    print(f"| format | rows | threads | ms a call | GMAC/s | blocks GB/s |  ({n} x {k})")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in args.formats:
        blocks = random_blocks(kind, n, k, generator)
        matmul = getattr(ops, f"{kind}_matmul")
        for rows in args.rows:
            x = torch.randn(rows, k, generator=generator)
            for threads in args.threads:
                torch.set_num_threads(threads)
                seconds = best_seconds(lambda: matmul(x, blocks), args.repeats, rows * n * k)
                print(f"| {kind} | {rows} | {threads} | {seconds * 1e3:.3f} | {rows * n * k / seconds / 1e9:.1f} | "
                      f"{blocks.numel() / seconds / 1e9:.1f} |")


if __name__ == "__main__":
    main()
