"""`gpt4 translate | summarize | ask | code`: stream to the terminal; text from arguments, files or stdin."""

from __future__ import annotations

import sys
from pathlib import Path

from ..cli import add_model_flags, add_sampling_flags, load, read_text_argument, read_text_file, sampling_kwargs




def _input(args, what: str) -> str:
    if getattr(args, "file", None):
        return read_text_file(args.file)
    value = args.text
    if value is not None and value != "-" and Path(value).is_file() and "\n" not in value:
        return read_text_file(value)  # a path given as the argument
    return read_text_argument(value, what)


def _gen(args) -> dict:
    kw = sampling_kwargs(args)
    if args.max_new_tokens is None:
        kw.pop("max_new_tokens")  # each task sizes its own output
    return kw


def _print(pieces) -> str:
    out = []
    for piece in pieces:
        out.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(out)


def cmd_translate(args) -> None:
    from . import language, tokens_per_char, translate

    from . import _check_text

    text = _check_text(_input(args, "text to translate"), "text to translate")  # before the model loads
    code, name = language(args.to)
    model = load(args)
    if tokens_per_char(model, code) > 1.0:
        print(f"warning: {args.model}'s vocabulary has no {name} words; it probably does not know {name} "
              "(try --model qwen2.5-coder-0.5b-instruct).", file=sys.stderr)
    _print(translate(model, text, args.to, source=args.source, **_gen(args)))


def cmd_summarize(args) -> None:
    from . import summarize

    from . import _check_text

    text = _check_text(_input(args, "text to summarize"), "text to summarize")
    _print(summarize(load(args), text, length=args.length, bullets=args.bullets, **_gen(args)))


def cmd_ask(args) -> None:
    from . import _check_text, ask

    question = _check_text(read_text_argument(args.question, "question"), "question")  # before the model loads
    documents = [(f, _check_text(read_text_file(f), f"document {f}")) for f in args.context or []]
    found, answer = ask(load(args), question, documents, n_passages=args.passages, **_gen(args))
    _print(answer)
    if found:
        print("\nSources:")
        for i, p in enumerate(found):
            print(f"[{i + 1}] {p.source}:{p.line}: \"{p.text}\"")


def cmd_code(args) -> None:
    from . import _check_text, check_syntax, code, extract_code, run_code

    task = _check_text(read_text_argument(args.task, "task"), "task")  # before the model loads
    tests = read_text_file(args.tests) if args.tests else ""
    reply = _print(code(load(args), task, lang=args.lang, with_tests=args.test, **_gen(args)))
    source = extract_code(reply, args.lang)
    if args.lang == "python":
        error = check_syntax(source)
        if error:
            print(f"warning: the code does not parse ({error})", file=sys.stderr)
    if args.test:
        result = run_code(source, tests, args.lang)
        print(f"\n[sandbox] {result.summary()}")
        if result.stdout.strip():
            print("[stdout]\n" + result.stdout.rstrip())
        if not result.passed and result.stderr.strip():
            print("[stderr]\n" + result.stderr.rstrip())
        if not result.passed:
            sys.exit(1)


def register(sub) -> None:
    p = sub.add_parser("translate", help="translate text, a file or stdin into another language")
    p.add_argument("text", nargs="?", default=None, help="text or a file path ('-' or omitted: stdin)")
    p.add_argument("--to", required=True, help="target language (code or name, e.g. zh, French)")
    p.add_argument("--from", dest="source", default=None, help="source language (default: detected by the model)")
    p.add_argument("--file", "-f", default=None, help="read the text from this file (paragraphs are kept)")
    add_model_flags(p)
    add_sampling_flags(p, max_new_tokens=None)
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("summarize", help="summarize a document (long ones in parts)")
    p.add_argument("text", nargs="?", default=None, help="a file path or text ('-' or omitted: stdin)")
    p.add_argument("--file", "-f", default=None, help="read the document from this file")
    p.add_argument("--length", default="medium", choices=["short", "medium", "long"])
    p.add_argument("--bullets", action="store_true", help="bullet points instead of prose")
    add_model_flags(p)
    add_sampling_flags(p, max_new_tokens=None)
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("ask", help="answer a question, grounded in documents given with --context")
    p.add_argument("question", nargs="?", default=None, help="the question ('-' or omitted: stdin)")
    p.add_argument("--context", "-c", action="append", help="a text file to answer from (repeatable)")
    p.add_argument("--passages", type=int, default=3, help="passages retrieved and quoted")
    add_model_flags(p)
    add_sampling_flags(p, max_new_tokens=None)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("code", help="write code for a task; --test runs it in a sandbox")
    p.add_argument("task", nargs="?", default=None, help="what the code should do ('-' or omitted: stdin)")
    p.add_argument("--lang", default="python", help="programming language (default: python)")
    p.add_argument("--test", action="store_true",
                   help="run the code (and --tests) in a sandboxed subprocess with time and memory limits")
    p.add_argument("--tests", default=None, help="a Python file of asserts run after the code (with --test)")
    add_model_flags(p)
    add_sampling_flags(p, max_new_tokens=None)
    p.set_defaults(func=cmd_code)
