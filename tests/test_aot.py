"""The decode step compiled ahead of time (gpt4.aot): the same tokens as eager, loaded from its cache, keyed by
what it was compiled from, and never a half-built or unchecked package."""

import warnings

import pytest
import torch

from gpt4 import aot
from gpt4.quant import quantize_

from .conftest import skip_without_w4a8, tiny_model
from .test_compiled_decode import GREEDY, PROMPTS, _step_logits, _tokens, needs_compiler


def _int4_model(seed=0):
    model = tiny_model("llama-gqa-untied", seed=seed, hidden_size=64, intermediate_size=128)  # int4's smallest tile
    return quantize_(model, "int4")


@pytest.fixture(scope="module")
def compiled_home(tmp_path_factory):
    """A $GPT4_HOME with no packages yet (the first test builds the tiny int4 model's; the next ones load them)."""
    return tmp_path_factory.mktemp("gpt4-home")


@needs_compiler
def test_the_step_compiled_ahead_equals_eager_and_later_loads_from_its_cache(compiled_home, monkeypatch):
    monkeypatch.setenv("GPT4_HOME", str(compiled_home))
    model = _int4_model()
    eager = (_tokens(model, PROMPTS[:1]), _tokens(model, PROMPTS), _step_logits(model, PROMPTS))
    with pytest.warns(RuntimeWarning, match="Compiling the decode step ahead of time"):
        model.compile_decode("aot")
    assert isinstance(model._compiled_decode, aot.CompiledDecode)  # built, checked, used
    folder = aot.package_folder(model)
    assert aot.is_built(folder) and folder.parent == compiled_home / "compiled"
    compiled = (_tokens(model, PROMPTS[:1]), _tokens(model, PROMPTS), _step_logits(model, PROMPTS))
    assert compiled[:2] == eager[:2]
    torch.testing.assert_close(compiled[2], eager[2], atol=2e-2, rtol=1e-4)

    # Another process's identical model: the packages are loaded, not built, and bound to its own tensors.
    again = _int4_model()
    monkeypatch.setattr(aot, "build", lambda *args, **kwargs: pytest.fail("built again"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all: nothing built, nothing fell back
        again.compile_decode("aot")
    assert isinstance(again._compiled_decode, aot.CompiledDecode)
    assert (_tokens(again, PROMPTS[:1]), _tokens(again, PROMPTS)) == eager[:2]


@needs_compiler
def test_prompt_lookup_checks_drafts_through_the_step_compiled_ahead(compiled_home, monkeypatch):
    """The draft graph (packages of the first test) gives plain greedy decoding's tokens; drafts longer than it
    takes are checked eagerly, with the same tokens."""
    from gpt4 import GenerationConfig
    from gpt4.generation import generate_tokens

    from .test_prompt_lookup import _oracle_drafts

    monkeypatch.setenv("GPT4_HOME", str(compiled_home))
    model = _int4_model()
    prompt = PROMPTS[0]
    config = GenerationConfig(max_new_tokens=24, eos_token_id=None)
    plain = [s[0] for s in generate_tokens(model, [prompt], config)]
    monkeypatch.setattr(aot, "build", lambda *args, **kwargs: pytest.fail("not built by the first test"))
    model.compile_decode("aot")
    widths = []
    verify = aot.CompiledDecode.verify
    monkeypatch.setattr(aot.CompiledDecode, "verify", lambda self, ids, *a: widths.append(ids.shape[1])
                        or verify(self, ids, *a))
    for lookup in (3, aot.MAX_DRAFT + 4):
        widths.clear()
        with monkeypatch.context() as patch:
            _oracle_drafts(patch, plain, len(prompt), kept := [])
            drafted = [s[0] for s in generate_tokens(model, [prompt], config.update(prompt_lookup_num_tokens=lookup))]
        assert drafted == plain and sum(kept) > len(plain) // 3
        assert (max(widths) == 4) if lookup == 3 else (max(widths, default=0) <= aot.MAX_DRAFT < 1 + max(kept))


@needs_compiler
def test_the_server_engine_batches_through_the_step_compiled_ahead(compiled_home, monkeypatch):
    """Continuous batching (rows join and leave; the running rows as views of a larger cache) on the packages of
    the test above; more rows than the batch graph takes decode eagerly."""
    from gpt4.generation import generate_tokens

    from .test_compiled_decode import ENGINE_PROMPTS, engine_case, engine_case_eager

    monkeypatch.setenv("GPT4_HOME", str(compiled_home))
    model = _int4_model()
    expected = engine_case_eager(model)
    monkeypatch.setattr(aot, "build", lambda *args, **kwargs: pytest.fail("not built by the test above"))
    model.compile_decode("aot")
    calls = []
    step = model._compiled_decode
    model._compiled_decode = lambda *args: calls.append(args[0].shape[0]) or step(*args)
    model._compiled_decode.max_rows = step.max_rows
    assert engine_case(model) == expected
    assert 1 in calls and 3 in calls  # both packages ran

    monkeypatch.setattr(step, "max_rows", 2)  # a batch past the graph's range: eager, the same tokens
    model._compiled_decode = step
    rows = ENGINE_PROMPTS[:3]
    assert _tokens(model, rows) == [s for s in generate_tokens(_int4_model(), rows, GREEDY)]


def test_the_cache_key_follows_the_weights_their_file_the_dtype_and_the_code(tmp_path, monkeypatch):
    base = aot.cache_key(_int4_model())
    assert aot.cache_key(_int4_model()) == base  # the same model built again
    assert aot.cache_key(_int4_model(seed=1)) != base  # other weights
    assert aot.cache_key(tiny_model("llama-gqa-untied", hidden_size=64, intermediate_size=128)) != base  # not int4
    model = tiny_model("llama-gqa-untied")
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"one")
    model.source = weights  # loaded from a file: keyed by the file, not by hashing its tensors
    from_file = aot.cache_key(model)
    weights.write_bytes(b"two!")
    now = aot.cache_key(model)
    assert now != from_file
    monkeypatch.setattr(torch, "__version__", "0.0.0")  # another torch: its packages are not this one's
    assert aot.cache_key(model) != now


def test_a_build_that_fails_its_check_leaves_nothing_and_decoding_stays_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT4_HOME", str(tmp_path))
    model = tiny_model("llama-gqa-untied")
    expected = _tokens(model, PROMPTS)

    def fake_compile(exported, package_path, inductor_configs):  # (no C++ build: what happens around it)
        with open(package_path, "wb") as f:
            f.write(b"not a package")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_compile)
    monkeypatch.setattr(aot, "CompiledDecode", lambda model, folder: object())
    monkeypatch.setattr(aot, "check_against_eager", lambda model, compiled: (_ for _ in ()).throw(
        RuntimeError("its logits differ from the eager step's by 30.0%")))
    with pytest.warns(RuntimeWarning, match="decoding eagerly: RuntimeError: its logits differ"):
        model.compile_decode("aot")
    assert model._compiled_decode is None and _tokens(model, PROMPTS) == expected
    assert list((tmp_path / "compiled").iterdir()) == []  # neither the packages nor the staging folder


def test_a_package_that_does_not_load_is_a_warning_and_eager_decoding(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT4_HOME", str(tmp_path))
    model = tiny_model("llama-gqa-untied")
    folder = aot.package_folder(model)
    folder.mkdir(parents=True)
    for graph in aot.GRAPHS:
        (folder / f"{graph}.pt2").write_bytes(b"truncated")
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        model.compile_decode("aot")
    assert model._compiled_decode is None


@needs_compiler
def test_w4a8_layers_our_own_operator_compile_ahead_and_equal_eager(tmp_path, monkeypatch):
    """The packages call gpt4_kernels::w4a8_matmul through AOTInductor's proxy executor: registered by quantizing,
    before any package loads."""
    skip_without_w4a8()
    monkeypatch.setenv("GPT4_HOME", str(tmp_path))

    def w4a8_model():
        return quantize_(tiny_model("llama-gqa-untied", hidden_size=64, intermediate_size=128), "w4a8")

    model = w4a8_model()
    eager = (_tokens(model, PROMPTS[:1]), _tokens(model, PROMPTS), _step_logits(model, PROMPTS))
    with pytest.warns(RuntimeWarning, match="Compiling the decode step ahead of time"):
        model.compile_decode("aot")
    assert isinstance(model._compiled_decode, aot.CompiledDecode)
    compiled = (_tokens(model, PROMPTS[:1]), _tokens(model, PROMPTS), _step_logits(model, PROMPTS))
    assert compiled[:2] == eager[:2]
    torch.testing.assert_close(compiled[2], eager[2], atol=2e-2, rtol=1e-4)
    again = w4a8_model()  # loaded, not built
    monkeypatch.setattr(aot, "build", lambda *args, **kwargs: pytest.fail("built again"))
    again.compile_decode("aot")
    assert isinstance(again._compiled_decode, aot.CompiledDecode)
    assert (_tokens(again, PROMPTS[:1]), _tokens(again, PROMPTS)) == eager[:2]


def test_int8_layers_packed_for_onednn_are_refused_before_any_build(tmp_path, monkeypatch):
    from gpt4.quant import integer_matmul_available

    monkeypatch.setenv("GPT4_HOME", str(tmp_path))
    monkeypatch.setattr(aot, "build", lambda *args, **kwargs: pytest.fail("built"))
    model = quantize_(tiny_model("qwen2", hidden_size=64, intermediate_size=128), "w8a8")
    if not integer_matmul_available():
        pytest.skip("no VNNI: w8a8's layers are not packed for oneDNN here")
    with pytest.warns(RuntimeWarning, match="not supported ahead of time; --compile compiles them"):
        model.compile_decode("aot")
    assert model._compiled_decode is None


def test_the_cli_refuses_two_compile_flags(capsys):
    from gpt4.cli import main

    assert main(["generate", "--aot", "--compile", "hello"]) != 0
    assert "Choose one of --compile, --max-autotune and --aot" in capsys.readouterr().err
