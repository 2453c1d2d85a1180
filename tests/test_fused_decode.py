"""The fused decode step (gpt4_kernels.decode_layers: every layer of a w4a8 model in one call) against the eager
layers it stands for: the same logits, to the rounding of a few operations, and the same cache writes, for one or
several sequences at different positions, under masks and a sliding window, in float32 and bfloat16 with each
cache dtype; biases, GQA, one KV head, Llama 3 rope scaling; the default model's greedy tokens; and refusals."""

import copy

import pytest
import torch
import torch.nn.functional as F

import gpt4.quant
from gpt4 import GPT4LMHeadModel
from gpt4.cache import KVCache, dequantize_slots, quantize_slots
from gpt4.model import attention_mask_for
from gpt4.quant import DEQUANTIZE_ROWS, bf16_matmul_is_native, blocks_kernel_multiplies, quantize_

from .conftest import skip_without_w4a8, tiny_model

# hidden 128 in 4 heads of 32: the fused step rotates head halves in vectors of 16 floats.
SIZES = dict(hidden_size=128, intermediate_size=256)


def fused_model(family: str, dtype: torch.dtype, **overrides) -> GPT4LMHeadModel:
    skip_without_w4a8()
    model = tiny_model(family, **SIZES, **overrides).to(dtype)
    quantize_(model, "w4a8")
    assert model._fused_decode is not None
    return model


def random_cache(model, batch: int, slots: int, dtype: torch.dtype) -> KVCache:
    """A cache whose slots hold random keys and values, as earlier tokens would have left them."""
    cache = KVCache(model.config, batch, slots, dtype=dtype)
    generator = torch.Generator().manual_seed(1)
    for t in cache.keys + cache.values:
        if dtype == torch.int8:  # rows of int8 values and their scales
            t.copy_(quantize_slots(torch.randn(*t.shape[:-1], model.config.head_dim, generator=generator)))
        else:
            t.copy_(torch.randn(t.shape, generator=generator))
    return cache


def assert_caches_close(got: KVCache, want: KVCache) -> None:
    """The values the two caches' slots hold (an int8 cache's dequantized: keys a few ulps apart may round to
    neighbouring steps, 1/127 of their group's largest value)."""
    for a, b in zip(got.keys + got.values, want.keys + want.values):
        if a.dtype == torch.int8:
            a, b = dequantize_slots(a, torch.float32), dequantize_slots(b, torch.float32)
            torch.testing.assert_close(a, b, atol=float(b.abs().max()) / 127, rtol=0)
        else:
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def both_steps(model, ids, positions, kv_length, cache, mask):
    """(eager logits, eager cache), (fused logits, fused cache) from copies of the same cache."""
    eager_cache, fused_cache = copy.deepcopy(cache), copy.deepcopy(cache)
    with torch.inference_mode():
        eager = model._decode_step(ids, positions, mask, eager_cache, kv_length)
        fused = model._fused_step(ids[:, 0], positions[:, 0], mask, fused_cache.keys, fused_cache.values, kv_length)
    return (eager, eager_cache), (fused, fused_cache)


def assert_logits_close(fused, eager, share=1e-2):
    """Measured here: bf16 bit for bit; fp32 within 3e-7 of the largest logit (a multiply-add fused, a sum in
    another order), except where such a difference moves an activation across a rounding boundary of its int8
    quantization: 1e-3 of it then (one case in these tests). A wrong weight, slot or mask costs 0.1 or more."""
    torch.testing.assert_close(fused, eager, atol=share * float(eager.abs().max()), rtol=0)


@pytest.mark.parametrize("dtype,cache_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
    (torch.float32, torch.int8), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
# (float16 and int8 caches are for float32 models)
@pytest.mark.parametrize("family,overrides", [
    ("llama-gqa-untied", {}),  # 2 query heads per KV head
    ("llama3-rope-scaling", {}),  # one KV head for 4 query heads, scaled rotations
    ("qwen2", dict(output_bias=True, mlp_bias=True)),  # a bias on every linear layer
    ("mistral", {}),  # a sliding window of 8 slots
    ("llama-tied", {}),  # the head and embedding in one Q8 table
])
def test_fused_step_equals_the_eager_layers(family, overrides, dtype, cache_dtype):
    model = fused_model(family, dtype, **overrides)
    ids = torch.tensor([[5], [90], [17]])
    positions = torch.tensor([[3], [20], [11]])  # rows at different lengths, one past the window
    kv_length = 21
    cache = random_cache(model, 4, 32, cache_dtype)  # more rows and slots than the step uses
    mask = attention_mask_for(positions, kv_length, model.config.sliding_window)
    for rows, step_mask in ((3, mask), (1, None), (1, mask[:1])):
        (eager, eager_cache), (fused, fused_cache) = both_steps(
            model, ids[:rows], positions[:rows], kv_length if rows > 1 else 4, cache, step_mask[..., :4]
            if step_mask is not None and rows == 1 else step_mask)
        assert fused.dtype == torch.float32 and fused.shape == eager.shape == (rows, model.config.vocab_size)
        assert_logits_close(fused, eager)
        assert_caches_close(fused_cache, eager_cache)
        for got, old in zip(fused_cache.keys + fused_cache.values, cache.keys + cache.values):
            written = (got != old).any(-1).any(1)  # (B, T): the slots the step wrote, in any KV head
            for row in range(cache.batch_size):
                assert written[row].nonzero().flatten().tolist() == ([int(positions[row])] if row < rows else [])


@pytest.mark.parametrize("family", ["llama-gqa-untied", "mistral"])
def test_a_drafts_check_runs_fused_as_rows_that_share_a_cache_row(family):
    """verify_logits (prompt lookup's check of S draft tokens) through the fused step: the logits of the eager check
    and the same S slots written, the tokens seeing each other causally (and through a sliding window)."""
    model = fused_model(family, torch.float32)
    cache = random_cache(model, 2, 32, torch.float32)
    ids, positions = torch.tensor([[7, 50, 3, 91, 12]]), torch.arange(9, 14)[None]  # after 9 cached tokens
    mask = attention_mask_for(positions, 14, model.config.sliding_window)
    eager_cache, fused_cache = copy.deepcopy(cache), copy.deepcopy(cache)
    with torch.inference_mode():
        eager = model._verify_step(ids, positions, mask, eager_cache)
        fused = model.verify_logits(ids, positions, fused_cache, 14)
    assert_logits_close(fused, eager)
    for got, want, old in zip(fused_cache.keys + fused_cache.values, eager_cache.keys + eager_cache.values,
                              cache.keys + cache.values):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
        assert (got != old).any(-1).any(1)[0].nonzero().flatten().tolist() == list(range(9, 14))
        assert torch.equal(got[1], old[1])  # the other row untouched


def count_fused_prompt_chunks(monkeypatch) -> list:
    """A list that gets an item at each call of gpt4_kernels.prefill_layers from now on."""
    calls, prefill_layers = [], torch.ops.gpt4_kernels.prefill_layers
    monkeypatch.setattr(torch.ops.gpt4_kernels, "prefill_layers", lambda *args: calls.append(1) or prefill_layers(*args))
    return calls


@pytest.mark.parametrize("dtype,cache_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
    (torch.float32, torch.int8), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("family,overrides", [
    ("llama-gqa-untied", {}), ("llama3-rope-scaling", {}), ("qwen2", dict(output_bias=True, mlp_bias=True)),
    ("mistral", {}), ("llama-tied", {})])
def test_fused_prompt_chunks_equal_the_eager_layers(family, overrides, dtype, cache_dtype, monkeypatch):
    """A prompt through gpt4_kernels.prefill_layers in two chunks: the first causal over itself (no mask; under
    mistral's window of 8 slots a mask), the second over the cache's slots under a mask; two rows at once. The eager
    layers' hidden states (measured: bf16 bit for bit, fp32 within 2e-7 of the largest value but where an int8
    rounding boundary is crossed, 1.4e-3) and cache writes, each row's slots and no others."""
    model = fused_model(family, dtype, **overrides)
    calls = count_fused_prompt_chunks(monkeypatch)
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(19).expand(2, 19)
    cache = random_cache(model, 3, 24, cache_dtype)  # a row and slots more than the prompt's
    eager_cache, fused_cache = copy.deepcopy(cache), copy.deepcopy(cache)
    for start, stop in ((0, 12), (12, 19)):
        chunk = (ids[:, start:stop], positions[:, start:stop])
        with torch.inference_mode():
            model.use_fused_decode(enabled=False)
            eager = model.hidden_states(*chunk, eager_cache, kv_length=stop)
            assert model.use_fused_decode()
            fused = model.hidden_states(*chunk, fused_cache, kv_length=stop)
        assert fused.dtype == eager.dtype == dtype and fused.shape == eager.shape == (2, stop - start, 128)
        assert_logits_close(fused.float(), eager.float())
    assert len(calls) == 2
    assert_caches_close(fused_cache, eager_cache)
    for got, old in zip(fused_cache.keys + fused_cache.values, cache.keys + cache.values):
        written = (got != old).any(-1).any(1)  # (B, T)
        assert [written[row].nonzero().flatten().tolist() for row in range(3)] == [list(range(19))] * 2 + [[]]


def test_where_bf16_is_native_long_prompt_chunks_run_through_the_eager_layers(monkeypatch):
    """There the eager layers multiply chunks of DEQUANTIZE_ROWS rows or more by dequantized weights (AMX's bf16
    matmuls beat our integer kernel); shorter ones still run fused."""
    model = fused_model("llama-gqa-untied", torch.float32)
    calls = count_fused_prompt_chunks(monkeypatch)
    monkeypatch.setattr(gpt4.quant, "bf16_matmul_is_native", lambda: True)
    ids = torch.randint(0, model.config.vocab_size, (1, DEQUANTIZE_ROWS + 8))
    cache = model.new_cache(1, DEQUANTIZE_ROWS + 8)
    with torch.inference_mode():
        model.hidden_states(ids[:, :DEQUANTIZE_ROWS], torch.arange(DEQUANTIZE_ROWS)[None], cache)
        assert calls == []
        model.hidden_states(ids[:, DEQUANTIZE_ROWS:], torch.arange(DEQUANTIZE_ROWS, DEQUANTIZE_ROWS + 8)[None], cache)
        assert calls == [1]


def test_the_fused_prefill_refuses_what_it_cannot_compute():
    model = fused_model("llama-gqa-untied", torch.float32)
    weights, biases, inv_freq = model._fused_decode
    cache = KVCache(model.config, 1, 16)
    x = model.embed_tokens(torch.tensor([[1, 2, 3]]))  # (1, 3, H)

    def chunk(positions=(0, 1, 2), kv_length=3, mask=None):
        return torch.ops.gpt4_kernels.prefill_layers(
            x, torch.tensor([positions]), mask, cache.keys, cache.values, kv_length, weights, biases, inv_freq,
            model.config.num_attention_heads, model.config.norm_eps)

    assert chunk().shape == x.shape
    with pytest.raises(RuntimeError, match="position 3 is outside the 3 slots"):
        chunk(positions=(1, 2, 3))
    with pytest.raises(RuntimeError, match="kv_length == S"):  # no mask: the chunk's keys are all it sees
        chunk(positions=(4, 5, 6), kv_length=7)
    with pytest.raises(RuntimeError, match=r"mask must be bool \(B or 1, 1, S, kv_length\)"):
        chunk(positions=(4, 5, 6), kv_length=7, mask=torch.ones(1, 1, 1, 7, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="at least 17"):
        chunk(positions=(14, 15, 16), kv_length=17, mask=torch.ones(1, 1, 3, 17, dtype=torch.bool))


def test_w4a8_default_model_decodes_fused_with_the_eager_tokens():
    """The defaults' model (bf16, w4a8) decodes fused, and gives the eager layers' greedy tokens: one prompt, and a
    padded batch of three (a mask over the cache). Prompt lookup's drafts, checked fused, keep those tokens (checked
    by the eager layers, whose bf16 prompt-chunk attention rounds differently, they did not here). Bit for bit where
    PyTorch's bf16 operators round as the kernel does (CPUs with AMX or AVX512-BF16, where bf16 is the default); on
    others fp32 is, tested below."""
    skip_without_w4a8()
    if not bf16_matmul_is_native():
        pytest.skip("bf16 is not native on this CPU (nor the default): its eager operators' roundings differ")
    model = GPT4LMHeadModel.from_pretrained("gpt4", dtype="bfloat16", quant="w4a8")
    assert model._fused_decode is not None
    prompts = ["Princess Peach is a character in the Super Mario video game series. Princess Peach is",
               "The capital of France is", "def fibonacci(n):"]
    outputs = {}
    for name in ("fused", "eager"):
        assert model.use_fused_decode(enabled=name == "fused") == (name == "fused")
        outputs[name] = [model.generate(prompts[0], max_new_tokens=48, do_sample=False),
                         model.generate(prompts, max_new_tokens=24, do_sample=False)]
    assert outputs["fused"] == outputs["eager"]
    model.use_fused_decode()
    assert model.generate(prompts[0], max_new_tokens=48, do_sample=False, prompt_lookup_num_tokens=3) == \
        outputs["fused"][0]


def test_fused_float32_default_model_predicts_the_eager_layers_next_tokens():
    """In fp32 the fused step's sums run in another order than PyTorch's (a norm's, a matmul's rows), a few ulps apart,
    and where that moves an activation across a rounding boundary of its int8 quantization the difference grows
    through the layers (the default model: up to 2% of the largest logit). Along the eager layers' own greedy tokens
    both steps still predict the same next token (measured: 40 of 40 on an AVX2 EPYC); a wrong weight, slot or
    rotation would not."""
    skip_without_w4a8()
    model = GPT4LMHeadModel.from_pretrained("gpt4", dtype="float32", quant="w4a8")
    ids = model.tokenizer.encode("Princess Peach is a character in the Super Mario video game series. She")
    steps, agree = 40, 0
    with torch.inference_mode():
        cache = model.new_cache(1, len(ids) + steps)
        hidden = model.hidden_states(torch.tensor([ids]), torch.arange(len(ids))[None], cache)
        token = model.lm_head(hidden[:, -1]).argmax(-1)  # (1,)
        for step in range(steps):
            position = torch.tensor([[len(ids) + step]])
            fused_cache = copy.deepcopy(cache)
            assert model.use_fused_decode()
            fused = model.decode_logits(token[:, None], position, fused_cache, len(ids) + step + 1)
            model.use_fused_decode(enabled=False)
            eager = model.decode_logits(token[:, None], position, cache, len(ids) + step + 1)
            torch.testing.assert_close(fused, eager, atol=0.05 * float(eager.abs().max()), rtol=0)
            agree += int(fused.argmax() == eager.argmax())
            token = eager.argmax(-1)
    assert agree >= steps - 2, f"the fused step predicted the eager step's token {agree} times of {steps}"


def test_fused_float32_default_model_scores_a_prompt_as_the_eager_layers():
    """The default model in fp32 reading two 512-token windows of pydoc in chunks of 256, fused (prefill_layers) and
    eager: the sums' other order crosses int8 rounding boundaries (as in decoding, above), so the logits are not
    equal, but the next-token predictions agree (measured here: 96-97.5% over eight windows) and so does the text's
    likelihood (within 0.35%); a wrong slot, mask or rotation moves both far."""
    skip_without_w4a8()
    if not blocks_kernel_multiplies(256):
        pytest.skip("bf16 is native here: prompt chunks of 256 multiply dequantized weights, in the eager layers")
    from pydoc_data.topics import topics

    model = GPT4LMHeadModel.from_pretrained("gpt4", dtype="float32", quant="w4a8")
    ids = model.tokenizer.encode("".join(topics[key] for key in sorted(topics))[:20000])
    for window in range(2):
        prompt = torch.tensor([ids[window * 512:(window + 1) * 512]])
        logits = {}
        for fused in (True, False):
            assert model.use_fused_decode(enabled=fused) == fused
            with torch.inference_mode():
                cache = model.new_cache(1, 512)
                hidden = [model.hidden_states(prompt[:, s:s + 256], torch.arange(s, s + 256)[None], cache)
                          for s in (0, 256)]
                logits[fused] = model.lm_head(torch.cat(hidden, 1)[0]).float()  # (512, V)
        agree = float((logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean())
        nll = {fused: float(F.cross_entropy(x[:-1], prompt[0, 1:])) for fused, x in logits.items()}
        assert agree >= 0.93, f"window {window}: the fused prompt predicted the eager one's token at {agree:.1%}"
        assert abs(nll[True] / nll[False] - 1) < 0.01, nll
    model.use_fused_decode()


def test_only_models_the_kernel_holds_decode_fused():
    skip_without_w4a8()
    assert fused_model("llama-tied", torch.bfloat16).use_fused_decode()
    for family, mode, overrides in (("gpt2", "w4a8", SIZES),  # LayerNorm, GELU, learned positions
                                    ("llama-tied", "int4", SIZES),  # PyTorch's int4 kernel, not blocks
                                    ("llama-tied", "w4a8", dict(hidden_size=64, intermediate_size=128)),  # D = 16
                                    ("llama-tied", "none", SIZES)):
        model = quantize_(tiny_model(family, **overrides), mode)
        assert model._fused_decode is None and not model.use_fused_decode()


def test_the_fused_step_refuses_what_it_cannot_compute():
    model = fused_model("llama-gqa-untied", torch.float32)
    weights, biases, inv_freq = model._fused_decode
    cache = KVCache(model.config, 2, 16)
    x = model.embed_tokens(torch.tensor([1, 2]))
    config = model.config

    def step(positions=(3, 4), kv_length=5, mask=None, keys=cache.keys, weights=weights):
        return torch.ops.gpt4_kernels.decode_layers(
            x, torch.tensor(positions), mask, keys, cache.values, kv_length, weights, biases,
            inv_freq, config.num_attention_heads, config.norm_eps)

    assert step().shape == x.shape
    with pytest.raises(RuntimeError, match="position 5 is outside the 5 slots"):  # written past the cache's end
        step(positions=(3, 5))
    with pytest.raises(RuntimeError, match="position -1"):
        step(positions=(-1, 4))
    with pytest.raises(RuntimeError, match="at least 17"):
        step(positions=(3, 16), kv_length=17)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        step(mask=torch.ones(2, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="6 weights"):
        step(weights=weights[:-1])
    with pytest.raises(RuntimeError, match="blocks of shape"):
        step(weights=[weights[0], weights[2], *weights[2:]])  # o's blocks where qkv's belong
    with pytest.raises(RuntimeError, match="one dtype"):
        step(keys=[k.bfloat16() for k in cache.keys])
    half = [t.half() for t in cache.keys]
    bf16_weights = fused_model("llama-gqa-untied", torch.bfloat16)._fused_decode[0]
    for caches in (half, KVCache(config, 2, 16, dtype=torch.int8).keys):  # (a bf16 model's queries would be rounded)
        with pytest.raises(RuntimeError, match="float16 or int8 rows for a float32 x"):
            torch.ops.gpt4_kernels.decode_layers(x.bfloat16(), torch.tensor([3, 4]), None, caches, caches, 5,
                                                 bf16_weights, biases, inv_freq, config.num_attention_heads,
                                                 config.norm_eps)
    short = [t[..., :-1] for t in KVCache(config, 2, 16, dtype=torch.int8).keys]  # a byte short of the scales
    with pytest.raises(RuntimeError, match="a float32 scale for each 32"):
        torch.ops.gpt4_kernels.decode_layers(x, torch.tensor([3, 4]), None, short, short, 5, weights, biases,
                                             inv_freq, config.num_attention_heads, config.norm_eps)


def test_a_float32_model_that_decodes_through_the_kernel_caches_keys_and_values_in_float16():
    """As llama.cpp caches them: half the bytes (see GPT4LMHeadModel._cache_dtype), unless the step is compiled or the
    user chose another dtype; a bf16 model's would round its queries too, and is refused."""
    model = fused_model("llama-gqa-untied", torch.float32)
    assert model.new_cache(1, 8).keys[0].dtype == model.new_cache(1, 8).values[0].dtype == torch.float16
    model._compiled_decode = "a compiled step"  # (only its presence matters here)
    assert model.new_cache(1, 8).keys[0].dtype == torch.float32
    model._compiled_decode = None
    model.kv_cache_dtype = torch.float32
    assert model.new_cache(1, 8).keys[0].dtype == torch.float32
    assert tiny_model("llama-gqa-untied").new_cache(1, 8).keys[0].dtype == torch.float32  # attention through SDPA
    bf16 = fused_model("llama-gqa-untied", torch.bfloat16)
    for dtype in ("float16", "int8"):
        bf16.kv_cache_dtype = getattr(torch, dtype)
        with pytest.raises(ValueError, match=f"{dtype} KV cache is for float32 models"):
            bf16.new_cache(1, 8)


def test_an_int8_cache_is_for_eager_steps_and_heads_of_groups_of_32():
    """An int8 cache holds rows of D values and a float32 scale per 32 (KVCache): 0.5625x float16's bytes. A compiled
    step (SDPA over float caches) and a head size that is not a multiple of 32 are refused with what to do."""
    model = fused_model("llama-gqa-untied", torch.float32)
    model.kv_cache_dtype = torch.int8
    cache = model.new_cache(2, 8)
    assert cache.keys[0].dtype == torch.int8 and cache.keys[0].shape == (2, 2, 8, 32 + 4)
    model._compiled_decode = "a compiled step"  # (only its presence matters here)
    with pytest.raises(ValueError, match="eager decode steps"):
        model.new_cache(1, 8)
    small = tiny_model("llama-gqa-untied")  # heads of 8
    small.kv_cache_dtype = torch.int8
    with pytest.raises(ValueError, match="multiple of 32; this model's is 8"):
        small.new_cache(1, 8)


@pytest.mark.parametrize("cache_dtype,share", [(torch.float16, 1e-2), (torch.int8, 2e-2)])
def test_a_float16_or_int8_cache_gives_the_logits_of_a_float32_one(cache_dtype, share):
    """To the rounding of the cached keys and values: a prompt in two chunks (the second attends through the cache),
    eager and fused decode steps, and a draft's check. (int8's steps of 1/127 of a group's largest value moved a
    logit by up to 1.03e-2 of the largest, float16's less than 1e-2.)"""
    model = fused_model("llama-gqa-untied", torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    logits = {}
    for dtype in (torch.float32, cache_dtype):
        model.kv_cache_dtype = dtype
        with torch.inference_mode():
            cache = model.new_cache(1, 40)
            first = model.hidden_states(ids[:, :16], torch.arange(16)[None], cache, kv_length=16)
            second = model.hidden_states(ids[:, 16:], torch.arange(16, 24)[None], cache, kv_length=24)
            out = [model.lm_head(torch.cat([first, second], 1)[0]).float()]  # (24, V)
            for fused in (True, False):
                model.use_fused_decode(enabled=fused)
                out.append(model.decode_logits(torch.tensor([[7]]), torch.tensor([[24]]), copy.deepcopy(cache), 25))
            model.use_fused_decode()
            out.append(model.verify_logits(torch.tensor([[7, 8, 9]]), torch.arange(24, 27)[None], cache, 27))
        assert cache.keys[0].dtype == dtype
        logits[dtype] = out
    for rounded, full in zip(logits[cache_dtype], logits[torch.float32]):
        assert_logits_close(rounded, full, share)
