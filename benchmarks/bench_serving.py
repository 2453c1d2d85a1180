r"""Serving load benchmark: `gpt4 serve` vs llama.cpp's server (llama-cpp-python[server]) on the same GGUF model.

For 1, 4 and 16 concurrent streaming clients, each sending chat requests one after another, it measures the
aggregate generated tokens per second and the p50/p95 time to first token (TTFT), then prints the ratios. The two
servers run one after the other (never at once) with the same thread count, prompts, max_tokens and greedy
decoding, and EOS banned through logit_bias so that every request generates exactly max_tokens.

    python benchmarks/bench_serving.py                      # both servers (llama.cpp if it is installed)
    python benchmarks/bench_serving.py --engines ours       # only ours
    python benchmarks/bench_serving.py --build-llama-cpp    # building llama.cpp's first where it is missing

llama.cpp's server comes from llama-cpp-python[server] built from source for this CPU in its own venv (--llama-python,
default /work/llamacpp-venv/bin/python); --build-llama-cpp builds it there (benchmarks/references.py; about 10 minutes
on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from references import BUILD_HINT, ensure_llama_cpp

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Write a short poem about the sea.", "Explain what a CPU does.", "Give me three tips for sleeping well.",
           "Describe a cat to someone who has never seen one.", "What is the capital of Japan and why is it famous?",
           "Write a haiku about autumn.", "How do airplanes fly?", "Tell me a story about a brave mouse."]
# llama-cpp-python 0.3.36 segfaults at model load on this CPU unless the AMX "extra buffer types" are off.
LLAMA_LAUNCHER = """
import sys
import llama_cpp.llama_cpp as L
default = L.llama_model_default_params
def params():
    p = default()
    p.use_extra_bufts = False
    return p
L.llama_model_default_params = params
from llama_cpp.server.__main__ import main
sys.argv = ["llama_cpp.server"] + sys.argv[1:]
main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gguf_of(model: str) -> Path:
    from gpt4 import models

    for m in models.NAMED_MODELS:
        if model in (m.name, *m.aliases):
            path = models.model_file(m)
            if path is None:
                sys.exit(f"{model} is not installed (see `gpt4 models`).")
            return Path(path)
    return Path(model)


def start_server(engine: str, args, port: int) -> subprocess.Popen:
    log_path = Path(tempfile.gettempdir()) / f"bench_serving_{engine}.log"
    log = open(log_path, "w")
    if engine == "ours":
        cmd = [sys.executable, "-m", "gpt4", "serve", "--model", args.model, "--port", str(port),
               "--threads", str(args.threads), "--max-batch", "16", "--max-queue", "256"] + shlex.split(args.ours_flags)
    else:
        cmd = [args.llama_python, "-c", LLAMA_LAUNCHER, "--model", str(gguf_of(args.model)), "--port", str(port),
               "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", "2048",
               "--model_alias", args.model, "--interrupt_requests", "False"]  # queue, do not abort, concurrent requests
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # a --compile server compiles its decode graphs before it is ready
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the {engine} server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"the {engine} server did not become ready; see {log_path}")


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      eos_bias: dict) -> tuple[float, int, float]:
    """(time to first token, tokens, total seconds) of one streamed chat request."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "logit_bias": eos_bias}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                tokens += 1  # one streamed piece per token on both servers
                first = first or time.perf_counter()
    return (first or time.perf_counter()) - start, tokens, time.perf_counter() - start


async def load(url: str, model: str, clients: int, per_client: int, max_tokens: int, eos_bias: dict) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        await one_request(client, url, model, "Hello", 4, eos_bias)  # warm-up

        async def worker(k: int):
            return [await one_request(client, url, model, PROMPTS[(k + i) % len(PROMPTS)], max_tokens, eos_bias)
                    for i in range(per_client)]

        start = time.perf_counter()
        results = [x for w in await asyncio.gather(*(worker(k) for k in range(clients))) for x in w]
        wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt4", help="named model or .gguf file (llama.cpp needs a GGUF)")
    parser.add_argument("--engines", default="ours,llamacpp", help="comma list of: ours, llamacpp")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads of each server (use 1 on a machine busy with other work: torch's "
                             "threads spin-wait and collapse when the cores are oversubscribed)")
    parser.add_argument("--ours-flags", default="", help="more `gpt4 serve` flags, e.g. '--dtype bfloat16 --quant int4'")
    parser.add_argument("--llama-python", default="/work/llamacpp-venv/bin/python",
                        help="the interpreter of the venv holding llama-cpp-python[server]")
    parser.add_argument("--build-llama-cpp", action="store_true",
                        help="where --llama-python lacks llama-cpp-python, build it there first (~10 minutes)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    args = parser.parse_args()
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)

    from gpt4 import GPT4LMHeadModel  # only for the EOS ids to ban

    eos = GPT4LMHeadModel.from_pretrained(args.model).generation_config.eos_ids
    eos_bias = {str(i): -100 for i in eos}
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if "llamacpp" in engines and not ensure_llama_cpp(args.llama_python, args.build_llama_cpp):
        print(f"llama.cpp: not found at {args.llama_python}; {BUILD_HINT}. Measuring the others.", file=sys.stderr)
        engines.remove("llamacpp")
    if not engines:
        sys.exit("no server left to measure (--engines ours,llamacpp)")
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, list[dict]] = {}
    for engine in engines:
        port = free_port()
        proc = start_server(engine, args, port)
        try:
            results[engine] = []
            for c in levels:
                r = asyncio.run(load(f"http://127.0.0.1:{port}", args.model, c, args.requests_per_client,
                                     args.max_tokens, eos_bias))
                print(f"{engine:9s} clients={c:3d}  {r['tokens_per_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50']:.3f}s "
                      f"p95 {r['ttft_p95']:.3f}s  ({r['requests']} requests, {r['tokens']} tokens, "
                      f"{r['seconds']:.1f}s)", flush=True)
                results[engine].append(r)
        finally:
            proc.terminate()
            proc.wait(60)
    print_table(results)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def print_table(results: dict[str, list[dict]]) -> None:
    print("\n| clients | engine | tokens/s | TTFT p50 (s) | TTFT p95 (s) |")
    print("|---:|---|---:|---:|---:|")
    for engine, rows in results.items():
        for r in rows:
            print(f"| {r['clients']} | {engine} | {r['tokens_per_s']:.1f} | {r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} |")
    if "ours" in results and "llamacpp" in results:
        print("\nratios ours / llama.cpp (throughput: higher is better; TTFT: lower is better)")
        print("| clients | tokens/s | TTFT p50 | TTFT p95 |")
        print("|---:|---:|---:|---:|")
        for a, b in zip(results["ours"], results["llamacpp"]):
            print(f"| {a['clients']} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x | "
                  f"{a['ttft_p50'] / b['ttft_p50']:.2f}x | {a['ttft_p95'] / b['ttft_p95']:.2f}x |")


if __name__ == "__main__":
    main()
