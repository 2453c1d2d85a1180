"""Training throughput: gpt4's GPT4LMHeadModel against transformers' GPT2LMHeadModel, same config, same weights,
same batch, one full step each (forward with labels, backward, AdamW step), interleaved so both see the same
machine load. Prints tokens/s, model FLOPs utilisation against a measured matmul peak, the ratio, and where the
time of our step goes (torch profiler, top operators).

    python benchmarks/bench_training.py [--hidden 256 --layers 4 --heads 4 --vocab 8192 --batch 8 --seq 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def peak_flops(threads: int, n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of a large fp32 matmul on this machine now: the practical ceiling for training matmuls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def flops_per_token(config, seq: int) -> float:
    """6 N (forward + backward matmuls over all weights, the tied head included) + attention scores/values."""
    n = config.num_parameters() - config.max_position_embeddings * config.hidden_size  # position table: a lookup
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq


def step_fn(model, x, autocast_dtype, opt):

    def step():
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per model (after 2 warm-up steps)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2LMHeadModel

    from gpt4 import GPT4Config, GPT4LMHeadModel

    torch.manual_seed(0)
    config = GPT4Config(model_type="gpt2", vocab_size=args.vocab, hidden_size=args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        max_position_embeddings=max(args.seq, 256))
    ours = GPT4LMHeadModel(config).train()
    with tempfile.TemporaryDirectory() as tmp:  # the same weights in transformers' class
        ours.save_pretrained(tmp)
        theirs = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa").train()
    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    amp = torch.bfloat16 if args.precision == "bf16" else None
    with torch.no_grad():
        diff = (ours(x, labels=x).loss - theirs(input_ids=x, labels=x).loss).abs().item()
    # Each side with its own training optimizer: gpt4's (AdamW with decay groups) and torch's default AdamW,
    # which transformers' Trainer uses ("adamw_torch").
    from gpt4.training.loop import TrainConfig, make_optimizer

    steps = {"gpt4": step_fn(ours, x, amp, make_optimizer(ours, TrainConfig(lr=1e-4), torch.device("cpu"))),
             "transformers": step_fn(theirs, x, amp, torch.optim.AdamW(theirs.parameters(), lr=1e-4))}
    times = {k: [] for k in steps}
    for _ in range(2):
        for s in steps.values():
            s()
    for _ in range(args.steps):  # interleaved: load changes on a shared machine hit both alike
        for name, s in steps.items():
            t = time.perf_counter()
            s()
            times[name].append(time.perf_counter() - t)
    peak = peak_flops(torch.get_num_threads())
    tokens = args.batch * args.seq
    fpt = flops_per_token(config, args.seq)
    result = {"config": vars(args), "threads": torch.get_num_threads(), "params": ours.num_parameters(),
              "initial_loss_abs_diff": diff, "matmul_peak_gflops": round(peak / 1e9, 1)}
    print(f"model: GPT-2 family, {ours.num_parameters() / 1e6:.2f}M params, batch {args.batch} x {args.seq}, "
          f"{args.precision}, {torch.get_num_threads()} threads; matmul peak now {peak / 1e9:.1f} GFLOP/s; "
          f"same initial loss (|diff| {diff:.1e})")
    print(f"{'model':>14} {'median step s':>14} {'tokens/s':>10} {'MFU':>7}")
    for name, ts in times.items():
        med = statistics.median(ts)
        tps = tokens / med
        mfu = tps * fpt / peak
        result[name] = {"median_step_s": round(med, 4), "tokens_per_s": round(tps, 1), "mfu": round(mfu, 4)}
        print(f"{name:>14} {med:>14.3f} {tps:>10.0f} {mfu:>7.1%}")
    ratio = result["gpt4"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    result["ratio_gpt4_over_transformers"] = round(ratio, 3)
    print(f"ratio gpt4 / transformers: {ratio:.2f}x")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps["gpt4"]()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [(e.key, e.self_cpu_time_total / total) for e in events[:10]]
    result["gpt4_time_by_op"] = {k: round(v, 3) for k, v in top}
    print("where the time of a gpt4 step goes (self CPU time):")
    for k, v in top:
        print(f"  {v:6.1%}  {k}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
