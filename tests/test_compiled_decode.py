"""The torch.compile'd decode step (compile_decode) against the eager one: same tokens, same logits."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt4.generation import GenerationConfig, generate_tokens
from gpt4.quant import integer_matmul_available, quantize_

from .conftest import skip_without_w4a8, tiny_model

GREEDY = GenerationConfig(max_new_tokens=12, eos_token_id=None)
ROOT = Path(__file__).resolve().parents[1]
# Inductor builds its CPU kernels with the system's C++ compiler; without one only the fallback can be tested.
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="torch.compile needs a C++ compiler (g++) on this machine")
PROMPTS = [[5, 17, 3, 60, 2, 9, 41], [7, 1]]  # different lengths: rows at different positions


def _tokens(model, prompts):
    return [step for step in generate_tokens(model, prompts, GREEDY)]


def _step_logits(model, prompts):
    """Logits of the decode step after each prompt (the cache filled by an eager prefill)."""
    with torch.inference_mode():
        cache = model.new_cache(len(prompts), 16)
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])
        model.hidden_states(ids, torch.arange(longest).expand(len(prompts), longest), cache, kv_length=longest)
        last = torch.tensor([[p[-1]] for p in prompts])
        positions = torch.tensor([[len(p) - 1] for p in prompts])
        return model.decode_logits(last, positions, cache, kv_length=longest)


@needs_compiler
@pytest.mark.parametrize("family,quant,mode", [("llama-gqa-untied", "none", "default"), ("mistral", "none", "default"),
                                               ("llama-gqa-untied", "int4", "default"),
                                               ("llama-gqa-untied", "w8a8", "default"),
                                               ("llama-gqa-untied", "w4a8", "default"),  # our C++ operator
                                               # frozen weights, inductor's own GEMM kernels for int4 and int8
                                               ("llama-gqa-untied", "int4", "max-autotune"),
                                               ("qwen2", "int8", "max-autotune")])
def test_compiled_decode_equals_eager(family, quant, mode):
    if quant == "w4a8":
        skip_without_w4a8()
    # hidden 64: the int4 kernel's smallest tile
    model = tiny_model(family, hidden_size=64, intermediate_size=128)
    if quant != "none":
        quantize_(model, quant)
    eager = (_tokens(model, PROMPTS[:1]), _tokens(model, PROMPTS), _step_logits(model, PROMPTS))
    model.compile_decode(mode)
    compiled = (_tokens(model, PROMPTS[:1]), _tokens(model, PROMPTS), _step_logits(model, PROMPTS))
    assert model._compiled_decode is not None  # still compiled: nothing fell back to eager
    if quant == "int4" and mode == "default" and integer_matmul_available():  # its 8-bit head now in integers
        assert model.lm_head.activation_bits == 16 and model.lm_head.packed is not None
    assert compiled[0] == eager[0] and compiled[1] == eager[1]
    torch.testing.assert_close(compiled[2], eager[2], atol=1e-4 if quant == "none" else 2e-2, rtol=1e-4)


@needs_compiler
def test_a_first_step_whose_length_equals_another_size_does_not_make_later_steps_recompile():
    model = tiny_model("llama-gqa-untied", hidden_size=64, intermediate_size=128)  # 2 KV heads
    eager = _tokens(model, [[5]])
    model.compile_decode()
    # The first step attends to 2 slots, as many as there are KV heads; the next steps to 3, 4, ...
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile would fall back to eager
        assert _tokens(model, [[5]]) == eager
    assert model._compiled_decode is not None


@needs_compiler
def test_prompt_lookup_checks_drafts_through_the_compiled_check(monkeypatch):
    """compile_decode's third graph checks drafts of any length, with plain greedy decoding's tokens."""
    from gpt4 import GPT4LMHeadModel
    from gpt4.generation import warm_up_decode

    from .test_prompt_lookup import _oracle_drafts

    model = tiny_model("llama-gqa-untied", hidden_size=64, intermediate_size=128)
    prompt = [4, 8, 15, 16, 23, 42, 4, 8, 15, 16, 23]
    config = GenerationConfig(max_new_tokens=20, eos_token_id=None)
    plain = [s[0] for s in generate_tokens(model, [prompt], config)]
    model.compile_decode()
    warm_up_decode(model, batch_size=2, lookup=3)  # the check compiled here, at 4 tokens
    monkeypatch.setattr(GPT4LMHeadModel, "_verify_step", lambda *args: pytest.fail("a draft was checked eagerly"))
    for lookup in (3, 7):  # 8 tokens: the same graph
        kept = []
        with monkeypatch.context() as patch, torch._dynamo.config.patch(error_on_recompile=True):
            _oracle_drafts(patch, plain, len(prompt), kept)
            drafted = [s[0] for s in generate_tokens(model, [prompt], config.update(prompt_lookup_num_tokens=lookup))]
        assert drafted == plain and max(kept) == lookup and sum(kept) > len(plain) // 3
    assert model._compiled_decode.max_draft > 7


def test_an_unknown_compile_mode_is_refused_before_loading():
    from gpt4 import GPT4LMHeadModel

    # A path that does not exist: the mode is checked first, not after minutes of loading.
    with pytest.raises(ValueError, match="Unknown compile mode 'fast'"):
        GPT4LMHeadModel.from_pretrained("/nonexistent/model", compile="fast")
    with pytest.raises(ValueError, match="max-autotune"):
        tiny_model("llama-gqa-untied").compile_decode("reduce-overhead")


BROKEN_TOOLCHAIN = """
import warnings
from tests.conftest import tiny_model
from tests.test_compiled_decode import PROMPTS, _tokens
model = tiny_model("llama-gqa-untied")
expected = _tokens(model, PROMPTS)
model.compile_decode()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert _tokens(model, PROMPTS) == expected
assert model._compiled_decode is None
print([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
"""


def test_failed_compile_warns_and_decodes_eagerly():
    # A machine without a C++ compiler (in its own process: inductor remembers the compiler it found).
    env = dict(os.environ, CXX="/nonexistent/c++", TORCHINDUCTOR_FX_GRAPH_CACHE="0")
    done = subprocess.run([sys.executable, "-c", BROKEN_TOOLCHAIN], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "decoding eagerly from now on" in done.stdout


@needs_compiler
def test_two_compiled_models_keep_their_own_graphs():
    # Same code, different structure (biases, tied head, sizes): each must run its own graph.
    first = tiny_model("llama-gqa-untied", hidden_size=64, intermediate_size=128)
    second = tiny_model("qwen2", seed=1, hidden_size=64, intermediate_size=96)
    expected = _tokens(first, PROMPTS), _tokens(second, PROMPTS)
    first.compile_decode()
    second.compile_decode()
    assert (_tokens(first, PROMPTS), _tokens(second, PROMPTS)) == expected
    assert first._compiled_decode is not None and second._compiled_decode is not None


@needs_compiler
def test_server_engine_with_a_compiled_model_equals_eager_generation():
    """Continuous batching (rows join and leave, any number of the cache's rows run) on a compiled model, with no
    graph beyond the two the engine compiles at start."""
    model = tiny_model("llama-gqa-untied", hidden_size=64, intermediate_size=128)
    expected = engine_case_eager(model)
    model.compile_decode()
    graphs = []
    assert engine_case(model, lambda: graphs.append(_graphs_compiled())) == expected
    assert _graphs_compiled() == graphs[0] and model._compiled_decode is not None


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process. (Its error_on_recompile is a context variable: it would not
    reach the server engine's thread.)"""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@needs_compiler
def test_server_engine_checks_drafts_through_the_compiled_check_it_compiled_at_start(monkeypatch):
    from gpt4 import GPT4LMHeadModel
    from gpt4.model import TorchCompiledDecode
    from gpt4.serving.engine import Engine

    from .test_serving_engine import reference, run

    model = tiny_model("llama-gqa-untied", hidden_size=64, intermediate_size=128)
    engine_case_eager(model)  # (its tokenizer and generation config)
    prompt = [5, 6, 7, 8, 9] * 3  # it repeats: drafts to check
    expected = reference(model, prompt, 16)
    model.compile_decode()
    checks = []
    verify = TorchCompiledDecode.verify
    monkeypatch.setattr(TorchCompiledDecode, "verify", lambda self, ids, *a: checks.append(ids.shape[1])
                        or verify(self, ids, *a))
    engine = Engine(model, max_batch=2, prompt_lookup=3).start()
    # Started: its graphs are compiled, the check's included. Nothing compiles again, nothing checks eagerly.
    graphs = _graphs_compiled()
    monkeypatch.setattr(GPT4LMHeadModel, "_verify_step", lambda *args: pytest.fail("a draft was checked eagerly"))
    try:
        _, collected = run(engine, prompt, max_tokens=16)
        assert collected.done.wait(60) and collected.failed is None
    finally:
        engine.stop(30)
    assert collected.tokens[0] == expected and len(checks) > 1 and _graphs_compiled() == graphs

ENGINE_PROMPTS, ENGINE_LENGTHS = [[5, 6, 7], [9] * 11, [1, 2], [3, 30, 40, 50, 60]], [20, 6, 12, 9]


def engine_case_eager(model):
    """Each of ENGINE_PROMPTS generated alone, greedy, by the eager model (set up for the engine too)."""
    from .test_serving_engine import Tok

    model.generation_config = GenerationConfig(eos_token_id=None)
    model.tokenizer = Tok()
    config = GenerationConfig(max_new_tokens=1, do_sample=False, top_k=None)
    return [[s[0] for s in generate_tokens(model, [p], config.update(max_new_tokens=m))]
            for p, m in zip(ENGINE_PROMPTS, ENGINE_LENGTHS)]


def engine_case(model, started=lambda: None):
    """ENGINE_PROMPTS through the server's engine with 3 rows for 4 requests: rows join and leave. started() is
    called once the engine has started."""
    from gpt4.serving.engine import Engine

    from .test_serving_engine import run

    engine = Engine(model, max_batch=3).start()
    started()
    try:
        collected = [run(engine, p, max_tokens=m)[1] for p, m in zip(ENGINE_PROMPTS, ENGINE_LENGTHS)]
        for c in collected:
            assert c.done.wait(60) and c.failed is None
    finally:
        engine.stop(30)
    return [c.tokens[0] for c in collected]
