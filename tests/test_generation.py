"""Generation: KV-cache decode equals recompute, batched equals one-by-one, sampling equals transformers'."""

import copy

import pytest
import torch

from gpt4 import GenerationConfig, quant
from gpt4.cache import KVCache, dequantize_slots, quantize_slots
from gpt4.generation import generate_tokens
from gpt4.generation.sampling import apply_penalties, argmax, warp
from gpt4.quant import quantize_

from .conftest import skip_without_w4a8, tiny_model


def _greedy_by_recompute(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    ids, all_logits = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            all_logits.append(logits)
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], all_logits


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa-untied", "qwen2", "mistral"])
def test_kv_cache_decode_equals_full_recompute(family):
    model = tiny_model(family)
    prompt = [5, 17, 33, 2, 9, 41, 7]
    want, _ = _greedy_by_recompute(model, prompt, 20)  # 27 tokens > mistral's window of 8
    config = GenerationConfig(max_new_tokens=20, eos_token_id=None)
    got = [step[0] for step in generate_tokens(model, [prompt], config)]
    assert got == want


def test_cached_logits_equal_recomputed_logits():
    model = tiny_model("llama-gqa-untied")
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    tokens, logits = _greedy_by_recompute(model, prompt, 6)
    cache = model.new_cache(1, 32)
    with torch.no_grad():
        h = model.hidden_states(torch.tensor([prompt]), torch.arange(8)[None], cache)
        torch.testing.assert_close(model.lm_head(h[:, -1])[0], logits[0], atol=1e-5, rtol=1e-5)
        for i, t in enumerate(tokens[:-1]):
            h = model.hidden_states(torch.tensor([[t]]), torch.tensor([[8 + i]]), cache)
            torch.testing.assert_close(model.lm_head(h[:, -1])[0], logits[i + 1], atol=1e-5, rtol=1e-5)


def test_an_int8_cache_rounds_each_group_of_32_to_127_steps_of_its_largest_value():
    """KVCache's int8 rows (quantize_slots): D int8 values, then a float32 scale per 32; dequantized, each value within
    half a step (max|x| / 254 of its group) of the original; a group of zeros stays zeros (no 0 / 0)."""
    x = torch.randn(2, 3, 5, 64) * torch.tensor([1.0, 50.0]).repeat_interleave(32)  # groups of different scales
    x[0, 0, 0, 32:] = 0
    rows = quantize_slots(x)
    assert rows.dtype == torch.int8 and rows.shape == (2, 3, 5, 64 + 8)
    back = dequantize_slots(rows, torch.float32)
    step = x.unflatten(-1, (2, 32)).abs().amax(-1, keepdim=True) / 127  # (2, 3, 5, 2, 1)
    assert ((back - x).unflatten(-1, (2, 32)).abs() <= step / 2 * (1 + 1e-5)).all()
    assert (back[0, 0, 0, 32:] == 0).all() and not back.isnan().any()
    config = tiny_model("llama-gqa-untied", hidden_size=128).config  # 4 heads of 32, 2 KV heads
    cache = KVCache(config, 2, 8, dtype=torch.int8)
    k, v = torch.randn(2, 2, 3, 32), torch.randn(2, 2, 3, 32)
    keys, values = cache.update(0, k, v, torch.tensor([[0, 1, 2], [4, 5, 6]]), kv_length=7)
    torch.testing.assert_close(dequantize_slots(keys[1, :, 4:7], torch.float32), k[1], atol=0.02, rtol=0)
    torch.testing.assert_close(dequantize_slots(values[0, :, :3], torch.float32), v[0], atol=0.02, rtol=0)
    assert (keys[1, :, :4] == 0).all()  # untouched slots


def test_an_int8_cache_decodes_through_sdpa_with_the_logits_of_a_float_one():
    """A model without our attention kernels (SDPA over the rows dequantized): a prompt in two chunks and decode
    steps give a float32 cache's logits to the rounding of the cached values."""
    model = tiny_model("llama-gqa-untied", hidden_size=128)
    ids = torch.randint(0, 96, (1, 14), generator=torch.Generator().manual_seed(4))
    logits = {}
    for dtype in (torch.float32, torch.int8):
        model.kv_cache_dtype = dtype
        cache = model.new_cache(1, 20)
        with torch.no_grad():
            out = [model.hidden_states(ids[:, :8], torch.arange(8)[None], cache, kv_length=8),
                   model.hidden_states(ids[:, 8:12], torch.arange(8, 12)[None], cache, kv_length=12)]
            out += [model.decode_logits(ids[:, i:i + 1], torch.tensor([[i]]), cache, i + 1) for i in (12, 13)]
        assert cache.keys[0].dtype == dtype
        logits[dtype] = [model.lm_head(h[0]) for h in out[:2]] + out[2:]
    for rounded, full in zip(logits[torch.int8], logits[torch.float32]):
        torch.testing.assert_close(rounded, full, atol=2e-2 * float(full.abs().max()), rtol=0)


@pytest.mark.parametrize("amx", [False, True])
def test_a_bf16_model_caches_keys_and_values_in_fp32_on_the_cpu_unless_it_decodes_eagerly_on_amx(amx, monkeypatch):
    # fp32 where PyTorch's CPU attention is several times faster than in bf16 for one query row, and for compiled
    # steps; bf16, half the bytes, where it is as fast (see GPT4LMHeadModel._cache_dtype).
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    model = tiny_model("llama-gqa-untied").to(torch.bfloat16)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    cache = model.new_cache(1, 16)
    expected = torch.bfloat16 if amx else torch.float32
    assert cache.keys[0].dtype == cache.values[0].dtype == expected
    model._compiled_decode = "a compiled step"  # (only its presence matters here)
    assert model.new_cache(1, 16).keys[0].dtype == torch.float32
    model._compiled_decode = None
    assert tiny_model("llama-gqa-untied").new_cache(1, 16).keys[0].dtype == torch.float32  # an fp32 model
    with torch.inference_mode():
        full = model(torch.tensor([prompt])).logits[0, -1].float()  # no cache: attention in bf16
        model.hidden_states(torch.tensor([prompt[:-1]]), torch.arange(7)[None], cache)
        step = model.decode_logits(torch.tensor([prompt[-1:]]), torch.tensor([[7]]), cache, kv_length=8)[0]
    assert step.dtype == torch.float32
    torch.testing.assert_close(step, full, atol=0.02 * full.abs().max().item(), rtol=0)
    assert step.argmax() == full.argmax()


@pytest.mark.parametrize("family", ["llama-gqa-untied", "mistral"])
def test_a_prompts_first_chunk_attends_like_the_cache_free_forward_and_later_chunks_read_its_cache(family):
    # The first chunk (rows at slots 0..S-1) attends causally to its own keys in the model's dtype, as the forward
    # without a cache does (bit for bit in bf16); the cache still receives them for the chunks and steps after.
    model = tiny_model(family).to(torch.bfloat16)  # mistral: a window of 8, shorter than the prompt
    ids = torch.randint(0, model.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(0))
    first, second = 10, 4
    positions = torch.arange(14).expand(2, 14)
    with torch.inference_mode():
        cache = model.new_cache(2, 16)
        chunk = model.hidden_states(ids[:, :first], positions[:, :first], cache)
        whole = model.hidden_states(ids)  # no cache: bf16 attention over the whole prompt
        if family == "mistral":  # prompts past the window keep the mask (and the fp32 cache's keys)
            torch.testing.assert_close(chunk, whole[:, :first], atol=0.05, rtol=0)
        else:
            assert torch.equal(chunk, whole[:, :first])
        after = model.hidden_states(ids[:, first:], positions[:, first:], cache)  # reads the first chunk's cache
    torch.testing.assert_close(after, whole[:, first:], atol=0.05, rtol=0)
    assert cache.keys[0][:, :, first + second:].abs().sum() == 0  # nothing written past the prompt


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa-untied"])
def test_batched_generation_equals_one_by_one(family):
    model = tiny_model(family)
    prompts = [[4, 8, 15, 16, 23, 42], [7], [1, 2, 3], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]
    config = GenerationConfig(max_new_tokens=12, eos_token_id=None)
    alone = [[s[0] for s in generate_tokens(model, [p], config)] for p in prompts]
    together = [[] for _ in prompts]
    for step in generate_tokens(model, prompts, config):
        for row, token in zip(together, step):
            row.append(token)
    assert together == alone


def test_tensor_api_with_left_padding_matches_unpadded_rows():
    model = tiny_model("llama-gqa-untied")
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None)
    assert out.shape == (2, 11) and torch.equal(out[:, :6], ids)
    alone = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, eos_token_id=None)
    assert torch.equal(out[0, 6:], alone[0, 3:])


def test_rows_stop_at_eos_and_are_padded():
    model = tiny_model("gpt2")
    prompt = torch.tensor([[5, 6, 7]])
    free = model.generate(prompt, max_new_tokens=8, eos_token_id=None)[0, 3:].tolist()
    eos = free[2]
    out = model.generate(prompt, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)[0, 3:].tolist()
    assert out == free[:free.index(eos) + 1]


def test_seeded_sampling_is_reproducible_and_num_return_sequences():
    model = tiny_model("llama-gqa-untied")
    prompt = torch.tensor([[5, 6, 7]])
    kwargs = dict(do_sample=True, temperature=1.5, max_new_tokens=10, eos_token_id=None, seed=123,
                  num_return_sequences=3)
    a, b = model.generate(prompt, **kwargs), model.generate(prompt, **kwargs)
    assert a.shape == (3, 13) and torch.equal(a, b)
    assert len({tuple(r) for r in a.tolist()}) > 1  # three different samples
    greedy = model.generate(prompt, max_new_tokens=10, eos_token_id=None)
    top1 = model.generate(prompt, do_sample=True, top_k=1, max_new_tokens=10, eos_token_id=None, seed=1)
    assert torch.equal(greedy, top1)


def test_generation_config_validation_names_the_field():
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(TypeError, match="Unknown generation arguments: max_tokens"):
        GenerationConfig().update(max_tokens=3)


# -- sampling parity with transformers' logits processors ---------------------------------------------
transformers = pytest.importorskip("transformers")


def _logits(seed=0):
    return torch.randn(3, 50, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("kwargs,processor", [
    (dict(temperature=0.7), lambda: transformers.TemperatureLogitsWarper(0.7)),
    (dict(top_k=7), lambda: transformers.TopKLogitsWarper(7)),
    (dict(top_p=0.8), lambda: transformers.TopPLogitsWarper(0.8)),
    (dict(min_p=0.1), lambda: transformers.MinPLogitsWarper(0.1)),
])
def test_warpers_match_transformers(kwargs, processor):
    logits = _logits()
    want = processor()(torch.zeros(3, 1, dtype=torch.long), logits.clone())
    got = warp(logits.clone(), **kwargs)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_repetition_penalty_matches_transformers():
    logits = _logits(1)
    history = torch.tensor([[1, 2, 3, 3], [4, 4, 4, 4], [0, 49, 10, 11]])
    want = transformers.RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, history, True)
    torch.testing.assert_close(apply_penalties(logits.clone(), seen, None, repetition_penalty=1.3), want)


def test_presence_frequency_penalties_and_logit_bias_follow_openai():
    logits = torch.zeros(1, 5)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0, 0.0]])
    out = apply_penalties(logits, None, counts, presence_penalty=0.5, frequency_penalty=0.25,
                          logit_bias={4: -100.0})
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0, -100.0]]


@pytest.mark.parametrize("vocab", [50, 2048, 49152, 49153, 151936])
def test_greedy_argmax_picks_the_ids_torch_argmax_picks(vocab):
    generator = torch.Generator().manual_seed(vocab)
    cases = [torch.randn(8, vocab, generator=generator)]
    ties = torch.zeros(3, vocab)  # across blocks (the first wins), and at the very last id
    ties[0, [vocab // 2, vocab - 1]] = 1
    ties[1, [7, vocab // 3]] = 1
    ties[2, vocab - 1] = 1
    cases.append(ties)
    nans = torch.randn(3, vocab, generator=generator)  # NaN counts as the maximum, as in torch.argmax
    nans[0, vocab - 1] = nans[1, vocab // 3] = nans[1, vocab - 2] = float("nan")
    nans[2, 0] = float("inf")
    cases += [nans, torch.full((2, vocab), float("-inf"))]
    for logits in cases:
        assert torch.equal(argmax(logits), logits.argmax(-1))


def test_a_prompt_goes_through_in_the_models_prefill_chunks(monkeypatch):
    """256 tokens a pass (fewer activations, nearer the caches), or 512 where a layer dequantizes its weight for each
    chunk (int4; blocks where bf16 is native); a long prompt's tokens are those of recomputing the whole sequence."""
    model = tiny_model("llama-gqa-untied", max_position_embeddings=640, intermediate_size=64)
    assert model.prefill_chunk == 256
    passes = []

    def counted(ids, *args, **kwargs):
        passes.append(ids.shape[1])
        return type(model).hidden_states(model, ids, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", counted)
    prompt = torch.randint(0, 96, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    got = [step[0] for step in generate_tokens(model, [prompt], GenerationConfig(max_new_tokens=3, eos_token_id=None))]
    assert passes == [256, 256, 88]
    assert got == _greedy_by_recompute(model, prompt, 3)[0]
    monkeypatch.undo()
    assert quantize_(copy.deepcopy(model), "int4").prefill_chunk == 512
    skip_without_w4a8()
    blocks = quantize_(copy.deepcopy(model), "w4a8")
    assert blocks.prefill_chunk == 256
    monkeypatch.setattr(quant, "bf16_matmul_is_native", lambda: True)
    assert blocks.prefill_chunk == 512


def test_an_empty_stop_string_is_refused_as_it_would_stop_every_text_at_once():
    from gpt4.generation import GenerationConfig

    for stops in ("", ["</s>", ""]):
        with pytest.raises(ValueError, match="must not contain an empty string"):
            GenerationConfig(stop_strings=stops)
    assert GenerationConfig(stop_strings="\n\n").stop_strings == ["\n\n"]
