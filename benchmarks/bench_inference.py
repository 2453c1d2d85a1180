r"""CPU inference benchmark: this engine against llama.cpp and transformers on the same model and prompts.

Each engine runs in its own process (clean peak-RSS and load-time figures) and reports, for the same token ids:
prefill of a 512-token prompt (ours in the chunks generation cuts it into, `prefill_chunk`), decode speed at context
16 and 512, total throughput of 8 concurrent sequences x 64 tokens, peak RSS, and its greedy tokens (to check
agreement with our fp32 path). A copy-heavy task (an instruct request to rename a variable in a 40-line function,
128 tokens) is decoded twice: one token a step, and with prompt lookup (`--prompt-lookup`; each engine checks the
same drafts, up to --lookup tokens copied from the text, in one batch: llama.cpp through its batch API and
memory_seq_rm of refused drafts). Its quality is measured apart, in a fresh process (whose peak memory is not
counted): the perplexity of the same real text (pydoc's topics, the first --perplexity-tokens tokens, in windows of
512). Cold start is measured apart too, in `--cold-repeats` fresh processes per engine, the engines taking turns:
seconds from the start of loading the model (its Python modules already imported) to the first token of the 16-token
prompt, the load alone, and the first token counted from the worker's start (with `import torch` / `import
llama_cpp`). `--rounds N` runs the speed workers N times, the engines taking turns, and pools their timings (this
VM's speed drifts by up to 2x within an hour: llama.cpp once decoded at 201 tokens/s where it had made 107-110 in
the two runs before). `--long-context N` adds a long prompt, in fresh processes of its own (--repeats of them per
engine, the engines taking turns; their peak memory apart too): the first N tokens of pydoc's topics prefilled in
chunks (llama.cpp's batches of 512 tokens, ours generation's), then 64 tokens decoded after them.

    python benchmarks/bench_inference.py                  # all engines found, 3 repeats
    python benchmarks/bench_inference.py --engines ours:float32:none ours:bfloat16:int8 llama.cpp
    python benchmarks/bench_inference.py --engines llama.cpp ours:bfloat16:w4a8 --rounds 3   # in turns, pooled
    python benchmarks/bench_inference.py --engines llama.cpp ours:bfloat16:int4:compile   # torch.compile'd decode
    python benchmarks/bench_inference.py --engines llama.cpp ours:bfloat16:int4:max-autotune  # in max-autotune mode
    python benchmarks/bench_inference.py --engines llama.cpp ours:bfloat16:int4:aot  # compiled ahead of time
    python benchmarks/bench_inference.py --engines llama.cpp ours:bfloat16:int4:aot --lookup 6  # longer drafts
    python benchmarks/bench_inference.py --model qwen --engines llama.cpp ours:float32:none ours:float32:int8
    python benchmarks/bench_inference.py --engines llama.cpp ours:float32:w4a8 ours:float32:w4a8:kv-float32 \
        --long-context 4096   # and a 4096-token prompt; the last engine with an fp32 KV cache (fp16 by default)

llama.cpp comes from llama-cpp-python built from source for this CPU in its own venv (--llama-python, default
/work/llamacpp-venv/bin/python); `--build-llama-cpp` builds it there first where it is missing
(benchmarks/references.py; about 10 minutes on 2 cores). transformers comes with this environment's test extra
(`bash scripts/install.sh --test`).
Writes benchmarks/results/inference.json and inference.png. The JSON also records the machine (CPU model, caches,
the ISA extensions the engines use, library versions): the ratios depend on it. On a CPU whose last-level cache holds
the whole model, llama.cpp decodes about twice as fast as on one whose cache does not (see the README).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROCESS_START = time.perf_counter()  # a cold worker's imports (torch, llama_cpp) count from here

HERE = Path(__file__).resolve().parent
TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring panels; "
    "then came stored programs, assemblers, compilers and operating systems, each hiding the layer below. "
    "Princess Peach is a character in the Super Mario video game series. She rules the Mushroom Kingdom, and "
    "in most games she is kidnapped by Bowser, the king of the Koopas, so that Mario must rescue her. "
)
STREAM_PROMPTS = [
    "Write a short poem about the sea.", "Explain photosynthesis to a child.", "List three uses of copper.",
    "What is the capital of Japan?", "Describe a cat in one sentence.", "Why is the sky blue?",
    "Give a recipe for pancakes.", "Summarize the plot of Hamlet.",
]
NEW_TOKENS = 64
COPY_TOKENS = 128  # the copy-heavy task's output: the renamed function's first ~12 lines
COPY_REQUEST = "Rename the variable `margin` to `common_prefix` in this function and return the full code:\n\n"
PERPLEXITY_WINDOW = 512  # tokens per window: every engine scores the same non-overlapping windows


# The CPU features the engines' kernels choose between (flag names as /proc/cpuinfo spells them).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def machine(cpuinfo: Path = Path("/proc/cpuinfo"), caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> dict:
    """What the ratios depend on: the CPU's model, logical CPUs, data caches (KiB, per instance as the kernel
    reports them), the ISA extensions of ISA_FLAGS it has, and the libraries' versions. Fields Linux does not
    expose here stay None / empty."""
    info = {"cpu": None, "logical_cpus": len(os.sched_getaffinity(0)), "caches_kib": {}, "isa": [],
            "torch": _version("torch")}
    if cpuinfo.is_file():
        first = cpuinfo.read_text().split("\n\n")[0]  # the first logical CPU's block
        fields = {key.strip(): value.strip() for key, _, value in
                  (line.partition(":") for line in first.splitlines())}
        info["cpu"] = fields.get("model name")
        flags = set(fields.get("flags", "").split())
        info["isa"] = [flag for flag in ISA_FLAGS if flag in flags]
    for index in sorted(caches.glob("index*")):
        if (index / "type").read_text().strip() == "Instruction":
            continue
        size = (index / "size").read_text().strip()  # e.g. "2048K"
        assert size.endswith("K"), f"unexpected cache size {size!r} in {index}"
        info["caches_kib"][f"L{(index / 'level').read_text().strip()}"] = int(size[:-1])
    return info


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(info: dict) -> str:
    caches = ", ".join(f"{level} {kib // 1024} MiB" if kib % 1024 == 0 else f"{level} {kib} KiB"
                       for level, kib in info["caches_kib"].items())
    versions = ", ".join(f"{name} {info[key]}" for name, key in (("torch", "torch"),
                                                                  ("llama-cpp-python", "llama_cpp_python"))
                         if info.get(key))
    return (f"machine: {info['cpu'] or 'unknown CPU'}, {info['logical_cpus']} logical CPUs"
            + (f", {caches}" if caches else "") + f"; {' '.join(info['isa']) or 'no AVX2'}; {versions}")


def workload(perplexity_tokens: int, long_context: int = 0):
    """Token ids shared by every engine (from our tokenizer of the same GGUF)."""
    from pydoc_data.topics import topics

    from gpt4 import GPT4LMHeadModel
    from kv_cache_quality import long_text_ids  # (this folder: the script's own, on sys.path)

    tok = GPT4LMHeadModel.from_pretrained(os.environ["GPT4_BENCH_MODEL"], load_tokenizer=True).tokenizer
    import inspect
    import textwrap

    long_ids = (tok.encode(TEXT * 40))[:512]
    request = COPY_REQUEST + inspect.getsource(textwrap.dedent)
    copy_ids = tok.apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True)
    streams = [(tok.encode(p) * 4)[:16] for p in STREAM_PROMPTS]
    # The README's perplexity text (`gpt4 perplexity`): the first 8 pydoc topics, cut into whole windows.
    scored = tok.encode("\n\n".join(topics[k] for k in sorted(topics)[:8]))[:perplexity_tokens]
    starts = range(0, len(scored) - PERPLEXITY_WINDOW + 1, PERPLEXITY_WINDOW)
    windows = [scored[i:i + PERPLEXITY_WINDOW] for i in starts]
    return {"ctx512": long_ids, "ctx16": long_ids[:16], "streams": streams, "windows": windows, "copy": copy_ids,
            "long": long_text_ids(tok, long_context)}  # the topics from the 9th on, as many as it takes


def prompt_lookup_module():
    """gpt4.generation.lookup (PromptLookup, MAX_NGRAM), loaded from its file: llama.cpp's worker has no torch to
    import gpt4 with, and both engines must check the same drafts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("prompt_lookup", HERE.parent / "gpt4" / "generation" / "lookup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _perplexity(window_logits, windows) -> dict:
    """Perplexity of the windows from each window's logits (S, V) as numpy arrays, each row predicting the next
    token. (numpy: llama.cpp's environment has no torch.)"""
    import numpy as np

    nll, count = 0.0, 0
    for logits, ids in zip(window_logits, windows):
        rows = np.asarray(logits, dtype=np.float64)[:-1]  # (S - 1, V)
        top = rows.max(axis=1)
        log_z = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))  # (S - 1,)
        nll += float((log_z - rows[np.arange(len(rows)), ids[1:]]).sum())
        count += len(rows)
    return {"perplexity": float(np.exp(nll / count)), "perplexity_tokens": count}


def _torch_perplexity(model, windows) -> dict:
    """_perplexity of a torch model whose forward returns .logits (B, S, V): ours and transformers'."""
    import torch

    with torch.inference_mode():
        return _perplexity((model(torch.tensor([w])).logits[0].float().numpy() for w in windows), windows)


# ------------------------------------------------------------------------------------------------------
# Engine workers (run in a child process): each returns a dict of timings.
def _timed(fn, repeats):
    """Seconds of each of `repeats` calls, after one untimed warm-up call (every engine gets one)."""
    times, result = [], fn()
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def worker_ours(work, repeats, dtype, quant, compile=False, kv_dtype=None, cold=False, perplexity=False, lookup=0,
                long=False):
    import torch

    from gpt4 import GPT4LMHeadModel
    from gpt4.generation import GenerationConfig, generate_tokens, warm_up_decode

    config = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_id=None)
    if perplexity:  # the whole-window forward: a compiled decode step plays no part in it
        model = GPT4LMHeadModel.from_pretrained(os.environ["GPT4_BENCH_MODEL"], dtype=dtype, quant=quant)
        return _torch_perplexity(model, work["windows"])
    # A step compiled ahead of time is loaded with the model in a cold start (the main run built its packages);
    # in the main run, building (or loading) it is timed apart, as compiling is.
    ahead = compile == "aot" and not cold
    start = time.perf_counter()
    model = GPT4LMHeadModel.from_pretrained(os.environ["GPT4_BENCH_MODEL"], dtype=dtype, quant=quant,
                                            compile=False if ahead else compile)
    load = time.perf_counter() - start
    if kv_dtype:
        model.kv_cache_dtype = getattr(torch, kv_dtype)
    if cold:  # the first token comes from the eager prefill: a compiled decode step compiles on the second
        tokens = generate_tokens(model, [work["ctx16"]], config)
        next(tokens)
        tokens.close()
        return _cold(start, load)
    compile_s = None
    if compile:  # the graphs (one sequence, a batch, a draft check) compiled before timing; reported apart
        start = time.perf_counter()
        if ahead:
            model.compile_decode("aot")
        else:
            warm_up_decode(model, lookup=lookup)
        compile_s = time.perf_counter() - start

    def decode(prompts, new_tokens=NEW_TOKENS, lookup=0):
        """Tokens of each row, and the seconds spent after the first token (prefill excluded)."""
        out, start = [[] for _ in prompts], None
        settings = config.update(max_new_tokens=new_tokens, prompt_lookup_num_tokens=lookup or None)
        for step in generate_tokens(model, prompts, settings):
            start = start or time.perf_counter()
            for row, t in zip(out, step):
                row.append(t)
        return out, time.perf_counter() - start

    if long:
        return _measure_long(decode, work, repeats)

    def prefill():  # in the chunks generation cuts a prompt into
        with torch.inference_mode():
            cache = model.new_cache(1, 513)
            ids, chunk = torch.tensor([work["ctx512"]]), model.prefill_chunk
            for start in range(0, 512, chunk):
                stop = min(start + chunk, 512)
                h = model.hidden_states(ids[:, start:stop], torch.arange(start, stop)[None], cache, kv_length=stop)
            return model.lm_head(h[:, -1]).argmax()

    return {**_measure(load, prefill, decode, work, repeats, lookup), "compile_s": compile_s}


def worker_transformers(work, repeats, dtype, cold=False, perplexity=False, lookup=0, long=False):
    import torch
    import transformers

    from gpt4.models import resolve

    path = resolve(os.environ["GPT4_BENCH_MODEL"])
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=getattr(torch, dtype)).eval()
    load = time.perf_counter() - start
    if perplexity:
        return _torch_perplexity(model, work["windows"])

    def generate(ids, n, lookup=0):  # its own prompt lookup (its drafts, not PromptLookup's)
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=lookup or None)

    if cold:
        generate(torch.tensor([work["ctx16"]]), 1)
        return _cold(start, load)

    def decode(prompts, new_tokens=NEW_TOKENS, lookup=0):
        """transformers' generate does not split prefill from decode: time it with 1 and with all new tokens."""
        ids = torch.tensor(prompts)
        start = time.perf_counter()
        generate(ids, 1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = generate(ids, new_tokens, lookup)
        return out[:, ids.shape[1]:].tolist(), time.perf_counter() - start - first

    if long:
        return _measure_long(decode, work, repeats)

    def prefill():
        with torch.inference_mode():
            return model(torch.tensor([work["ctx512"]])).logits[0, -1].argmax()

    return _measure(load, prefill, decode, work, repeats, lookup)


def worker_llamacpp(work, repeats, cold=False, perplexity=False, lookup=0, long=False):
    import llama_cpp
    import numpy as np

    from_path = os.environ["GPT4_BENCH_GGUF"]
    start = time.perf_counter()
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    if hasattr(params, "use_extra_bufts"):
        params.use_extra_bufts = False  # AMX extra buffers segfault at load on this CPU (0.3.36)
    model = llama_cpp.llama_model_load_from_file(from_path.encode(), params)

    def context(n_seq, n_ctx=1024):
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch, cparams.n_seq_max = n_ctx, 512, 512, n_seq
        cparams.n_threads = cparams.n_threads_batch = 2
        cparams.flash_attn_type = 0  # as llama-cpp-python's Llama class sets it: "auto" is far slower here
        cparams.kv_unified = True  # one KV pool shared by the sequences (else each gets n_ctx / n_seq_max)
        return llama_cpp.llama_init_from_model(model, cparams)

    single = context(1)
    load = time.perf_counter() - start
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    def run_batch(ctx, entries, whole_logits=False):
        """entries: (token, position, sequence, want_logits); returns the argmax for the wanted entries, or with
        whole_logits their logits (wanted entries, V). More entries than a batch holds (512) go in several."""
        if len(entries) > 512:
            return [row for start in range(0, len(entries), 512)
                    for row in run_batch(ctx, entries[start:start + 512], whole_logits)]
        batch = llama_cpp.llama_batch_init(len(entries), 0, 1)
        for i, (token, pos, seq, want) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, want
        batch.n_tokens = len(entries)
        assert llama_cpp.llama_decode(ctx, batch) == 0
        rows = []
        for i, (_, _, _, want) in enumerate(entries):
            if want:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
                rows.append(logits.copy() if whole_logits else int(logits.argmax()))
        llama_cpp.llama_batch_free(batch)
        return np.stack(rows) if whole_logits else rows

    if perplexity:
        def window_logits(ids):  # every position's logits, from a cleared cache
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(single), True)
            return run_batch(single, [(t, p, 0, True) for p, t in enumerate(ids)], whole_logits=True)

        return _perplexity((window_logits(w) for w in work["windows"]), work["windows"])

    if cold:  # its weights are memory-mapped: the first batch also reads them in
        ids = work["ctx16"]
        run_batch(single, [(t, p, 0, p == len(ids) - 1) for p, t in enumerate(ids)])
        return _cold(start, load)
    if long:  # a context of its own, long enough (the others hold 1024 slots)
        single = context(1, len(work["long"]) + NEW_TOKENS)
    multi = context(8)  # a second context for the 8-stream test, as llama.cpp's server would configure it
    lookup_module = prompt_lookup_module()  # loaded once, outside the timed runs

    def decode(prompts, new_tokens=NEW_TOKENS, lookup=0):
        ctx = single if len(prompts) == 1 else multi
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        entries = [(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)]
        nxt = run_batch(ctx, entries)
        out, start = [[t] for t in nxt], time.perf_counter()
        if lookup:
            return [decode_with_lookup(prompts[0], out[0], new_tokens, lookup)], time.perf_counter() - start
        for step in range(1, new_tokens):
            nxt = run_batch(ctx, [(out[s][-1], len(ids) + step - 1, s, True) for s, ids in enumerate(prompts)])
            for row, t in zip(out, nxt):
                row.append(t)
        return out, time.perf_counter() - start

    def decode_with_lookup(prompt, out, new_tokens, lookup):
        """Greedy decoding of one sequence from its first token `out`, checking drafts as ours does."""
        drafts = lookup_module.PromptLookup(prompt + out, lookup_module.MAX_NGRAM)  # GenerationConfig's default
        position = len(prompt)  # of out[-1], the one token not in the cache yet
        while len(out) < new_tokens:
            draft = drafts.draft(min(lookup, new_tokens - len(out) - 1))  # as ours: with the next token, the budget
            best = run_batch(single, [(t, position + i, 0, True) for i, t in enumerate([out[-1], *draft])])
            kept = next((j for j, t in enumerate(draft) if best[j] != t), len(draft))
            # Refused drafts' keys leave the cache: llama.cpp would otherwise attend to them later.
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(single), 0, position + 1 + kept, -1)
            for t in draft[:kept] + [best[kept]]:
                out.append(t)
                drafts.append(t)
            position += 1 + kept
        return out[:new_tokens]

    if long:
        return _measure_long(decode, work, repeats)

    def prefill():
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(single), True)
        ids = work["ctx512"]
        return run_batch(single, [(t, p, 0, p == len(ids) - 1) for p, t in enumerate(ids)])

    return {**_measure(load, prefill, decode, work, repeats, lookup), "version": llama_cpp.__version__}


def _cold(load_start, load_s):
    now = time.perf_counter()
    return {"load_s": load_s, "first_token_s": now - load_start, "process_first_token_s": now - PROCESS_START}


def _measure(load, prefill, decode, work, repeats, lookup=0):
    """decode(prompts, new_tokens, lookup) -> (tokens per row, seconds for the tokens after the first)."""
    prefill_s, _ = _timed(prefill, repeats)
    runs = {}
    tasks = [("decode16", [work["ctx16"]], NEW_TOKENS, 0), ("decode512", [work["ctx512"]], NEW_TOKENS, 0),
             ("streams", work["streams"], NEW_TOKENS, 0), ("copy", [work["copy"]], COPY_TOKENS, 0)]
    if lookup:
        tasks.append(("copy_lookup", [work["copy"]], COPY_TOKENS, lookup))
    for key, prompts, new_tokens, drafts in tasks:
        results = [decode(prompts, new_tokens, drafts) for _ in range(repeats)]
        runs[key + "_s"] = [seconds for _, seconds in results]
        runs[key + "_tokens"] = results[-1][0]
    return {"load_s": load, "prefill512_s": prefill_s, **runs, "greedy16": runs["decode16_tokens"][0],
            "peak_rss_mb": _peak_rss_mb()}


def _measure_long(decode, work, repeats):
    """The long prompt, `repeats` times: seconds to its first token (prefill), seconds of the 63 tokens after it."""
    prefill_s, decode_s = [], []
    for _ in range(repeats):  # (no warm-up run: each takes a while)
        start = time.perf_counter()
        out, seconds = decode([work["long"]])
        prefill_s.append(time.perf_counter() - start - seconds)
        decode_s.append(seconds)
    return {"long_context": len(work["long"]), "long_prefill_s": prefill_s, "long_decode_s": decode_s,
            "long_tokens": out[0], "long_peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM); getrusage's maxrss would include the parent's across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ------------------------------------------------------------------------------------------------------
def run_engine(spec: str, repeats: int, llama_python: str, cold: bool = False, perplexity: bool = False,
               lookup: int = 0, long: bool = False) -> dict | None:
    python = llama_python if spec == "llama.cpp" else sys.executable
    from gpt4.models import resolve

    env = dict(os.environ, GPT4_BENCH_GGUF=str(resolve(os.environ["GPT4_BENCH_MODEL"])), TQDM_DISABLE="1",
               PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [python, str(Path(__file__).resolve()), "--worker", spec, "--repeats", str(repeats),
           "--lookup", str(lookup)] + ["--cold"] * cold + ["--perplexity-worker"] * perplexity \
        + ["--long-worker"] * long
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        print(f"{spec} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def summarize(name: str, r: dict, reference_tokens: list[int] | None) -> dict:
    best = lambda xs: min(xs)  # noqa: E731
    med = statistics.median
    row = {"engine": name, "compile_s": r.get("compile_s"), "peak_rss_mb": r["peak_rss_mb"]}
    for key in ("load", "first_token", "process_first_token"):  # from the fresh processes
        seconds = [c[f"{key}_s"] for c in r["cold"]]
        if key == "load" and not seconds:  # --cold-repeats 0: the benchmark worker's own load
            seconds = [r["load_s"]]
        if seconds:
            row[f"{key}_best"], row[f"{key}_median"] = best(seconds), med(seconds)
    for key, n in (("prefill512", 512), ("decode16", NEW_TOKENS - 1), ("decode512", NEW_TOKENS - 1),
                   ("streams", 8 * (NEW_TOKENS - 1)), ("copy", COPY_TOKENS - 1), ("copy_lookup", COPY_TOKENS - 1)):
        if f"{key}_s" in r:
            row[f"{key}_best"] = n / best(r[f"{key}_s"])
            row[f"{key}_median"] = n / med(r[f"{key}_s"])
    if "copy_lookup_tokens" in r:  # greedy with drafts against greedy one token a step, in the same engine
        plain, drafted = r["copy_tokens"][0], r["copy_lookup_tokens"][0]
        same = next((i for i, (a, b) in enumerate(zip(plain, drafted)) if a != b), len(plain))
        row["lookup_agree"] = f"{same}/{len(plain)}"
    if "perplexity" in r:
        row["perplexity"] = r["perplexity"]
    if "long_decode_s" in r:
        n = len(r["long_tokens"])
        for key, s, tokens in (("long_prefill", r["long_prefill_s"], r["long_context"]),
                               ("long_decode", r["long_decode_s"], n - 1)):
            row[f"{key}_best"], row[f"{key}_median"] = tokens / best(s), tokens / med(s)
        row["long_context"], row["long_peak_rss_mb"] = r["long_context"], r["long_peak_rss_mb"]
        row["long_tokens"] = r["long_tokens"]
    if reference_tokens is not None:
        same = next((i for i, (a, b) in enumerate(zip(reference_tokens, r["greedy16"])) if a != b),
                    len(reference_tokens))
        row["greedy_agree"] = f"{same}/{len(reference_tokens)}"
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=[
        "llama.cpp", "transformers:float32", "transformers:bfloat16", "ours:float32:none", "ours:bfloat16:none",
        "ours:bfloat16:int8", "ours:bfloat16:int4", "ours:bfloat16:w8a8", "ours:bfloat16:int4:compile",
        "ours:bfloat16:int4:max-autotune", "ours:bfloat16:int8:max-autotune"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="speed runs per engine, the engines taking turns; their timings are pooled")
    parser.add_argument("--lookup", type=int, default=3,
                        help="draft tokens checked a step in the copy task's prompt lookup run (0: no such run)")
    parser.add_argument("--model", default="gpt4", help="a named GGUF model (see `gpt4 models`; default: gpt4)")
    parser.add_argument("--cold-repeats", type=int, default=5, help="fresh processes per engine timing cold start")
    parser.add_argument("--perplexity-tokens", type=int, default=4096,
                        help="tokens of pydoc's topics each engine scores for its perplexity (0: none)")
    parser.add_argument("--long-context", type=int, default=0,
                        help="also a prompt of this many tokens, decoded after (0: none), in fresh processes")
    parser.add_argument("--llama-python", default="/work/llamacpp-venv/bin/python",
                        help="the interpreter of the venv holding llama-cpp-python")
    parser.add_argument("--build-llama-cpp", action="store_true",
                        help="where --llama-python lacks llama-cpp-python, build it there first (~10 minutes)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)  # a worker that only times cold start
    parser.add_argument("--perplexity-worker", action="store_true", help=argparse.SUPPRESS)  # ... only scores the text
    parser.add_argument("--long-worker", action="store_true", help=argparse.SUPPRESS)  # ... only the long prompt
    args = parser.parse_args()

    if args.worker:
        work = json.loads(os.environ["GPT4_BENCH_WORK"])
        kind, *rest = args.worker.split(":")
        modes = {"cold": args.cold, "perplexity": args.perplexity_worker, "lookup": args.lookup,
                 "long": args.long_worker}
        if kind == "ours":  # ours:dtype:quant[:compile | max-autotune | aot][:kv-<the KV cache's dtype>]
            options = rest[2:]
            kv = next((o.removeprefix("kv-") for o in options if o.startswith("kv-")), None)
            mode = next((o for o in options if not o.startswith("kv-")), None)
            result = worker_ours(work, args.repeats, rest[0], rest[1],
                                 compile={None: False, "compile": True}.get(mode, mode), kv_dtype=kv, **modes)
        elif kind == "transformers":
            result = worker_transformers(work, args.repeats, rest[0], **modes)
        else:
            result = worker_llamacpp(work, args.repeats, **modes)
        print(json.dumps(result))
        return

    if "llama.cpp" in args.engines:
        from references import BUILD_HINT, ensure_llama_cpp

        if not ensure_llama_cpp(args.llama_python, args.build_llama_cpp):
            print(f"llama.cpp: not found at {args.llama_python}; {BUILD_HINT}. Measuring the others.", file=sys.stderr)
            args.engines = [e for e in args.engines if e != "llama.cpp"]
    if any(e.startswith("transformers") for e in args.engines) and importlib.util.find_spec("transformers") is None:
        print("transformers: not installed here (`bash scripts/install.sh --test` installs it). Measuring the others.",
              file=sys.stderr)
        args.engines = [e for e in args.engines if not e.startswith("transformers")]
    if not args.engines:
        sys.exit("no engine left to measure (--engines)")
    os.environ["GPT4_BENCH_MODEL"] = args.model  # the workers inherit it
    os.environ["GPT4_BENCH_WORK"] = json.dumps(workload(args.perplexity_tokens, args.long_context))
    results = {}
    for round_index in range(args.rounds):  # in turns, as the cold starts below
        for spec in args.engines if round_index == 0 else list(results):
            print(f"running {spec} (round {round_index + 1} of {args.rounds}) ...", file=sys.stderr, flush=True)
            r = run_engine(spec, args.repeats, args.llama_python, lookup=args.lookup)
            if r is None:
                if round_index:
                    sys.exit(f"round {round_index + 1} of {spec} failed (above)")
                continue
            if spec not in results:
                results[spec] = {**r, "cold": []}
                continue
            pooled = results[spec]
            for key, value in r.items():  # the timings pooled; the peak the highest of any round
                if key.endswith("_s") and isinstance(value, list):
                    pooled[key] = pooled[key] + value
            pooled["peak_rss_mb"] = max(pooled["peak_rss_mb"], r["peak_rss_mb"])
    for spec in results:
        if args.perplexity_tokens >= PERPLEXITY_WINDOW:  # (fewer tokens: no whole window to score)
            print(f"perplexity of {spec} ...", file=sys.stderr, flush=True)
            quality = run_engine(spec, args.repeats, args.llama_python, perplexity=True)
            if quality is None:
                sys.exit(f"the perplexity run of {spec} failed (above)")
            results[spec].update(quality)
    for _ in range(args.repeats if args.long_context else 0):  # a process each, in turns as the cold starts below
        for spec in results:
            print(f"{args.long_context}-token prompt of {spec} ...", file=sys.stderr, flush=True)
            long = run_engine(spec, 1, args.llama_python, long=True)
            if long is None:
                sys.exit(f"the long prompt of {spec} failed (above)")
            pooled = results[spec]
            for key in ("long_prefill_s", "long_decode_s"):
                long[key] = pooled.get(key, []) + long[key]
            long["long_peak_rss_mb"] = max(pooled.get("long_peak_rss_mb", 0), long["long_peak_rss_mb"])
            pooled.update(long)
    # Cold starts taken in turns, engine after engine, so that the machine's drift reaches every engine alike.
    for _ in range(args.cold_repeats):
        for spec in results:
            print(f"cold start of {spec} ...", file=sys.stderr, flush=True)
            cold = run_engine(spec, args.repeats, args.llama_python, cold=True)
            if cold is None:
                sys.exit(f"the cold start of {spec} failed (above)")
            results[spec]["cold"].append(cold)
    reference = results.get("ours:float32:none", {}).get("greedy16")
    rows = [summarize(name, r, reference) for name, r in results.items()]
    base = next((r for r in rows if r["engine"] == "llama.cpp"), None)
    info = {**machine(), "llama_cpp_python": results.get("llama.cpp", {}).get("version")}
    print(describe(info))
    print_table(rows, base)
    print_long_table(rows, base)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.json").write_text(json.dumps({"machine": info, "rows": rows, "raw": results}, indent=2) + "\n")
    plot(rows, out / "inference.png")


def print_table(rows, base):
    cols = [("prefill512", "prefill 512 tok/s"), ("decode16", "decode ctx16 tok/s"),
            ("decode512", "decode ctx512 tok/s"), ("streams", "8x64 streams tok/s"), ("copy", "copy task tok/s")]
    lookup = all("copy_lookup_median" in r for r in rows)
    if lookup:
        cols.append(("copy_lookup", "copy task, prompt lookup tok/s"))
    header = "| engine | " + " | ".join(c[1] + " (best / median)" for c in cols) + \
        " | peak RSS MB | load s | first token s | with imports s | greedy = fp32 |" + \
        " lookup = plain |" * lookup + " perplexity |"
    print(header)
    print("|" + "---|" * (len(cols) + 7 + lookup))
    for r in rows:
        cells = []
        for key, _ in cols:
            cell = f"{r[key + '_best']:.0f} / {r[key + '_median']:.0f}"
            if base and r is not base:
                cell += f" ({r[key + '_median'] / base[key + '_median']:.2f}x)"
            cells.append(cell)
        mem = f"{r['peak_rss_mb']:.0f}" + (f" ({r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x)" if base and r is not base
                                           else "")
        cold = []
        for key in ("load", "first_token", "process_first_token"):
            if key + "_median" not in r:
                cold.append("-")
                continue
            cell = f"{r[key + '_median']:.2f}"
            if base and r is not base and key + "_median" in base:
                cell += f" ({r[key + '_median'] / base[key + '_median']:.1f}x)"
            cold.append(cell)
        if r.get("compile_s"):
            cold[0] += f" + {r['compile_s']:.0f} compile"
        quality = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
        agree = [r.get("greedy_agree", "-")] + [r.get("lookup_agree", "-")] * lookup
        print(f"| {r['engine']} | " + " | ".join(cells + [mem] + cold + agree + [quality]) + " |")
    if base:
        print("(ratios: engine / llama.cpp, medians; load and first token in fresh processes, timed from the start of "
              "loading the model, and with imports from the worker's start, before it imports torch / llama_cpp; "
              f"perplexity of pydoc's topics in windows of {PERPLEXITY_WINDOW} tokens, in a fresh process; "
              "lookup = plain: the copy task's greedy tokens with and without prompt lookup agree up to this token)")


def print_long_table(rows, base):
    """The long prompt's table, where it was run: prefill and decoding speed, the process's peak, greedy agreement."""
    rows = [r for r in rows if "long_decode_median" in r]
    if not rows:
        return
    n = rows[0]["long_context"]
    print(f"\n| engine | prefill {n} tok/s (best / median) | decode ctx {n} tok/s (best / median) | peak RSS MB |"
          " greedy = llama.cpp |")
    print("|---|---|---|---|---|")
    base = base if base in rows else None
    for r in rows:
        cells = []
        for key in ("long_prefill", "long_decode"):
            cell = f"{r[key + '_best']:.0f} / {r[key + '_median']:.0f}"
            if base and r is not base:
                cell += f" ({r[key + '_median'] / base[key + '_median']:.2f}x)"
            cells.append(cell)
        mem = f"{r['long_peak_rss_mb']:.0f}"
        if base and r is not base:
            mem += f" ({r['long_peak_rss_mb'] / base['long_peak_rss_mb']:.2f}x)"
        agree = "-"
        if base and r is not base:
            same = next((i for i, (a, b) in enumerate(zip(base["long_tokens"], r["long_tokens"])) if a != b),
                        len(base["long_tokens"]))
            agree = f"{same}/{len(base['long_tokens'])}"
        print(f"| {r['engine']} | " + " | ".join(cells + [mem, agree]) + " |")


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
        return
    keys = [("prefill512", "prefill 512"), ("decode16", "decode ctx16"), ("decode512", "decode ctx512"),
            ("streams", "8 streams"), ("copy", "copy task")]
    if all("copy_lookup_median" in r for r in rows):
        keys.append(("copy_lookup", "copy task, lookup"))
    if all("first_token_median" in r for r in rows):
        keys.append(("first_token", "cold start to first token"))
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4))
    for ax, (key, title) in zip(axes, keys):
        ax.barh([r["engine"] for r in rows], [r[key + "_median"] for r in rows],
                color="tab:orange" if key == "first_token" else "tab:blue")
        ax.set_title(f"{title} ({'s' if key == 'first_token' else 'tok/s'}, median)")
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
