"""`gpt4 serve`: the OpenAI-compatible server (and the chat page at /) on uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..cli import add_aot_flag, add_dtype_and_quant_flags, compile_mode, report_auto_choices, set_kv_dtype
from ..errors import GPT4Error, check_flags


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible API server with continuous batching and a browser chat page",
        description="Serve models through OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models) and "
                    "a chat page at /. Point any OpenAI client at http://HOST:PORT/v1.")
    p.add_argument("--model", "-m", action="append", default=None,
                   help="named model, local folder or .gguf file (repeatable; default: gpt4). "
                        "Clients pass the same string as 'model'.")
    add_dtype_and_quant_flags(p)
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile before serving (faster decoding; loading "
                        "takes a minute or two longer)")
    p.add_argument("--max-autotune", action="store_true",
                   help="--compile in max-autotune mode: weights frozen into the graph, C++ GEMM kernels tuned "
                        "for a full batch (about 2x the batch throughput of --compile; starting takes a few "
                        "minutes and more memory)")
    add_aot_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("GPT4_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $GPT4_API_KEY)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default: 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a batch row before new ones get 429 (default: 64)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MiB (default: 4)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds SIGTERM waits for in-flight requests before exiting (default: 60)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="speculative decoding for a request decoding alone: each step also checks up to N tokens "
                        "copied from where its last tokens appeared before (3 suits int4; fastest with --aot). "
                        "Faster where replies repeat the prompt (edited code, quotes); default 0: off")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from .app import ServerConfig, create_app
    except ImportError as e:
        raise GPT4Error(f"Serving needs the 'serve' extra ({e.name} is missing): pip install 'gpt4[serve]'.")
    import torch

    check_flags(("--max-batch", args.max_batch, args.max_batch >= 1, "at least 1"),
                ("--max-queue", args.max_queue, args.max_queue >= 1, "at least 1"),
                ("--port", args.port, 0 <= args.port <= 65535, "in 0..65535"),
                ("--prompt-lookup", args.prompt_lookup, args.prompt_lookup >= 0, "at least 0"),
                ("--max-body-mb", args.max_body_mb, args.max_body_mb > 0, "above 0"),
                ("--drain-timeout", args.drain_timeout, args.drain_timeout >= 0, "at least 0"),
                ("--threads", args.threads, args.threads is None or args.threads >= 1, "at least 1"))
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.model or ["gpt4"]
    compile = compile_mode(args)  # (conflicting flags fail here, before the server starts)

    def load_models():
        from ..model import GPT4LMHeadModel

        loaded = {}
        for name in names:
            print(f"loading {name} ...", file=sys.stderr, flush=True)
            loaded[name] = GPT4LMHeadModel.from_pretrained(name, dtype=args.dtype, quant=args.quant,
                                                           compile=compile)
            set_kv_dtype(args, loaded[name])
            report_auto_choices(args, loaded[name])
        if args.compile or args.max_autotune:
            print(f"compiling the decode step ({'a few minutes' if args.max_autotune else 'about a minute'} per "
                  "graph) ...", file=sys.stderr, flush=True)
        return loaded

    def announce():
        print(f"ready: http://{args.host}:{args.port}/ (chat page), http://{args.host}:{args.port}/v1 (API)",
              file=sys.stderr, flush=True)

    config = ServerConfig(api_key=args.api_key or None, max_batch=args.max_batch, max_queue=args.max_queue,
                          max_body_bytes=int(args.max_body_mb * 1024 * 1024), prompt_lookup=args.prompt_lookup)
    app = create_app(load_models, config, on_ready=announce)
    state = app.state.gpt4

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: refuse new requests at once, then drain
            state.draining = True
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a finished drain is a clean exit (0), not death by the signal

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                   timeout_graceful_shutdown=args.drain_timeout))
    server.run()
