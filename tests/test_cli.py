"""The command line: help texts, models, generate, chat (history, /reset, Ctrl-C), clear errors."""

import os
import signal
import subprocess
import sys
import time

import pytest

GPT4 = [sys.executable, "-m", "gpt4"]


def run(*args, input=None, timeout=180):
    return subprocess.run([*GPT4, *args], capture_output=True, text=True, input=input, timeout=timeout)


def test_help_of_every_verb():
    out = run("--help")
    assert out.returncode == 0
    verbs = [v for v in ("generate", "chat", "models", "pull") if v in out.stdout]
    assert verbs == ["generate", "chat", "models", "pull"]
    for verb in verbs:
        sub = run(verb, "--help")
        assert sub.returncode == 0 and "usage: gpt4 " + verb in sub.stdout


def test_models_lists_names_and_files():
    out = run("models")
    assert out.returncode == 0
    assert "gpt4" in out.stdout and "SmolLM2-135M-Instruct.Q4_1.gguf" in out.stdout
    assert "qwen2.5-coder-0.5b-instruct" in out.stdout


def test_generate_streams_a_continuation():
    out = run("generate", "The capital of France is", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The capital of France is") and len(out.stdout) > len("The capital of France is")


def test_generate_reads_stdin_and_chat_flag():
    out = run("generate", "--chat", "--max-new-tokens", "20", input="What is the capital of France?\n")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


@pytest.mark.parametrize("args,fragment", [
    (["generate", "hi", "--model", "no-such-model"], "neither a known model name"),
    (["generate", "hi", "--model", "/nonexistent/model.gguf"], "neither a known model name"),
    (["pull", "nope"], "Unknown model name 'nope'"),
    (["generate", "hi", "--top-p", "0"], "GenerationConfig.top_p=0.0 must be in (0, 1]"),
    (["generate", "hi", "--prompt-lookup", "-1"], "GenerationConfig.prompt_lookup_num_tokens=-1 must be >= 0"),
    (["serve", "--prompt-lookup", "-1"], "--prompt-lookup must be at least 0, got -1."),
    (["serve", "--port", "70000"], "--port must be in 0..65535, got 70000."),
    (["serve", "--max-body-mb", "0"], "--max-body-mb must be above 0, got 0.0."),
    (["serve", "--drain-timeout", "-5"], "--drain-timeout must be at least 0, got -5.0."),
    (["serve", "--threads", "0"], "--threads must be at least 1, got 0."),
    (["pretrain", "--data", "nowhere", "--threads", "0"], "--threads must be at least 1, got 0."),
])
def test_user_errors_are_one_clear_line_without_traceback(args, fragment):
    out = run(*args)
    assert out.returncode == 1
    assert fragment in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args,fragment", [
    (["generate", "hi", "--temperature", "-1"], "GenerationConfig.temperature=-1.0 must be >= 0"),
    (["generate", "hi", "--max-new-tokens", "-3"], "GenerationConfig.max_new_tokens=-3 must be >= 0"),
    (["generate", "hi", "--stop", ""], "GenerationConfig.stop_strings=[''] must not contain an empty string."),
    (["chat", "--top-p", "1.5"], "GenerationConfig.top_p=1.5 must be in (0, 1]"),
    (["translate", "hi", "--to", "fr", "--temperature", "-0.5"], "GenerationConfig.temperature=-0.5 must be >= 0"),
])
def test_bad_sampling_settings_are_refused_before_the_model_loads(args, fragment):
    out = run(*args)
    assert out.returncode == 1
    assert fragment in out.stderr and "Traceback" not in out.stderr
    assert "loading" not in out.stderr and out.stdout == ""


def test_a_prompt_longer_than_the_context_is_refused_without_being_echoed():
    out = run("generate", "--max-new-tokens", "3", input="word " * 9000)
    assert out.returncode == 1
    assert "this model's context is 8192 tokens" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""


def test_chat_keeps_history_resets_and_exits():
    script = "Hello!\nWhat is the capital of France?\n/reset\n/exit\n"
    out = run("chat", "--max-new-tokens", "24", input=script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("assistant>") == 2
    assert "Paris" in out.stdout.split("assistant>")[2]
    assert "(history cleared)" in out.stderr


def test_chat_session_sends_history_and_resets(default_model):
    from gpt4.chat import ChatSession

    session = ChatSession(default_model, system="Be brief.", max_new_tokens=6)
    first = "".join(session.send("My name is Ada."))
    prompt = default_model.tokenizer.decode(session.prompt_ids())
    assert "Be brief." in prompt and "My name is Ada." in prompt and first.strip() in prompt
    session.send("And yours?").__next__()
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    session.reset()
    assert "Ada" not in default_model.tokenizer.decode(session.prompt_ids())


def test_chat_session_forgets_oldest_turns_when_context_is_full(default_model):
    from gpt4.chat import ChatSession

    session = ChatSession(default_model, max_new_tokens=8000)  # leaves ~190 tokens of the 8192 context
    session.history = [{"role": "user", "content": f"turn {i} " + "word " * 40} for i in range(20)]
    ids = session.prompt_ids()
    assert len(ids) <= 192 and 0 < len(session.history) < 20
    assert "turn 19" in default_model.tokenizer.decode(ids)


def test_ctrl_c_stops_a_reply_but_not_the_session():
    # Greedy: the reply runs ~400 tokens, long past the signal.
    # The child gets SIGINT's default action: a suite started as a background job (`cmd &` in a script) runs with
    # SIGINT ignored, which children inherit, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen([*GPT4, "chat", "--max-new-tokens", "400", "--temperature", "0"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=0,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write("Write a very long story about a dragon.\n")
        proc.stdin.flush()
        seen = ""
        deadline = time.time() + 120
        while "assistant>" not in seen and time.time() < deadline:
            seen += os.read(proc.stdout.fileno(), 256).decode(errors="replace")
        time.sleep(1.0)  # let the reply stream for a moment
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "[stopped]" in seen + rest


def test_inference_verbs_default_to_auto_quantization_and_dtype_and_measuring_verbs_to_none_and_float32():
    from gpt4.cli import build_parser

    parser = build_parser()
    for verb in (["generate", "hi"], ["chat"], ["serve"], ["translate", "hi", "--to", "French"]):
        args = parser.parse_args(verb)
        assert (args.quant, args.dtype) == ("auto", "auto"), verb
    for verb in (["eval", "--task", "arc_easy"], ["perplexity", "file.txt"]):
        args = parser.parse_args(verb)
        assert (args.quant, args.dtype) == ("none", "float32"), verb


def test_kv_dtype_chooses_the_caches_dtype_and_auto_says_what_it_chose(capsys):
    """--kv-dtype auto reports its choice with --dtype and --quant's (float16 for the defaults where our kernel runs,
    see GPT4LMHeadModel._cache_dtype); another dtype is the caches'; a float16 cache for a bf16 model is refused."""
    from gpt4.cli import main
    from gpt4.kernels import w4a8_flags

    assert main(["generate", "The capital of France is", "--max-new-tokens", "2"]) == 0
    auto = "float16" if w4a8_flags() else "float32"  # (fp32 elsewhere: the defaults' attention is SDPA's there)
    assert f"--kv-dtype auto: {auto}" in capsys.readouterr().err
    assert main(["generate", "The capital of France is", "--max-new-tokens", "2", "--kv-dtype", "bfloat16"]) == 0
    assert "--kv-dtype" not in capsys.readouterr().err
    assert main(["generate", "hi", "--max-new-tokens", "2", "--dtype", "bfloat16", "--kv-dtype", "float16"]) == 1
    assert "--kv-dtype float16 is for float32 models" in capsys.readouterr().err


def test_kv_dtype_int8_generates_and_is_refused_where_it_cannot_be_read(capsys):
    """--kv-dtype int8 (rows of int8 values with a scale per 32): the defaults generate with it; a bf16 model and a
    compiled step (checked before loading or compiling anything) are refused, saying what to do."""
    from gpt4.cli import main

    assert main(["generate", "The capital of France is", "--max-new-tokens", "4", "--kv-dtype", "int8"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", "hi", "--max-new-tokens", "2", "--dtype", "bfloat16", "--kv-dtype", "int8"]) == 1
    assert "--kv-dtype int8 is for float32 models" in capsys.readouterr().err
    assert main(["generate", "hi", "--kv-dtype", "int8", "--compile"]) == 1
    assert "drop --compile" in capsys.readouterr().err
