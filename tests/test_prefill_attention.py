"""Our prompt chunk attention kernel (gpt4_kernels.prefill_attention) against torch's SDPA: softmax(q k^T / sqrt(d)) v
for many queries at once, causal or under a mask over the cache, with grouped query heads, over float32, float16 and
bfloat16 keys and values, from strided views as the model passes them; and the model's prompts through it."""

import pytest
import torch
import torch.nn.functional as F

from gpt4 import GPT4LMHeadModel
from gpt4.cache import dequantize_slots, quantize_slots

from .conftest import greedy_with_and_without_attention_kernels, skip_without_w4a8


@pytest.fixture(scope="module")
def prefill_attention():
    skip_without_w4a8()
    from gpt4.kernels import load_w4a8

    load_w4a8()
    return torch.ops.gpt4_kernels.prefill_attention


def sdpa(q, k, v, mask):
    """The reference in float32, each KV head repeated for the query heads that share it."""
    group = q.shape[1] // k.shape[1]
    k, v = (dequantize_slots(t, torch.float32) if t.dtype == torch.int8 else t.float() for t in (k, v))
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


# (batch, query heads, KV heads, queries, keys, head size): the default model's first and second chunks of 256,
# partial blocks of queries and keys, one KV head for all, as many as query heads, head sizes 16 to 128, 2 queries.
SHAPES = [(1, 9, 3, 256, 256, 64), (1, 9, 3, 256, 512, 64), (2, 14, 2, 37, 37, 64), (2, 14, 2, 50, 121, 64),
          (1, 8, 1, 19, 19, 16), (3, 4, 4, 5, 300, 128), (1, 6, 2, 2, 70, 48)]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("shape", SHAPES)
def test_prefill_attention_equals_sdpa(prefill_attention, shape, cache_dtype):
    batch, heads, kv_heads, queries, keys, size = shape
    if cache_dtype == torch.int8 and size % 32:
        pytest.skip("int8 rows hold groups of 32")
    generator = torch.Generator().manual_seed(0)
    # q as a view of the chunk's qkv rows (B, S, heads, D) -> (B, heads, S, D), the keys a cache's first slots
    q = (torch.randn(batch, queries, heads, size, generator=generator) * 3).transpose(1, 2)  # sharper softmax
    cache = torch.randn(2, batch, kv_heads, keys + 40, size, generator=generator)
    cache = quantize_slots(cache) if cache_dtype == torch.int8 else cache.to(cache_dtype)  # (int8: KVCache's rows)
    k, v = cache[0, :, :, :keys], cache[1, :, :, :keys]
    masks = [None] if queries == keys else []
    positions = torch.arange(keys - queries, keys)  # the chunk's last: causal over the cache
    causal = (torch.arange(keys)[None, :] <= positions[:, None])[None, None]  # (1, 1, S, T)
    masks.append(causal)
    ragged = causal.expand(batch, 1, queries, keys).clone()
    ragged[0, ..., : keys // 2] = False  # a row's whole blocks of keys hidden (a left-padded prompt)
    ragged[-1, ..., 1::3] = False
    masks.append(ragged)
    for mask in masks:
        got = prefill_attention(q, k, v, mask, size ** -0.5)
        assert got.dtype == torch.float32 and got.shape == q.shape
        assert got.transpose(1, 2).is_contiguous()  # (B, S, heads, D) underneath: what o_proj reads
        torch.testing.assert_close(got, sdpa(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_a_query_that_sees_no_key_gets_zeros(prefill_attention):
    q, k = torch.randn(1, 2, 3, 64), torch.randn(1, 1, 100, 64)
    mask = torch.ones(1, 1, 3, 100, dtype=torch.bool)
    mask[..., 1, :] = False
    got = prefill_attention(q, k, k, mask, 0.125)
    assert (got[:, :, 1] == 0).all()  # (not NaN, as the softmax of no score would be: SDPA on CPU gives zeros too)
    torch.testing.assert_close(got, sdpa(q, k, k, mask), atol=1e-5, rtol=1e-5)


def test_prefill_attention_refuses_what_it_cannot_compute(prefill_attention):
    q, k = torch.randn(1, 4, 8, 64), torch.randn(1, 2, 8, 64)
    with pytest.raises(RuntimeError, match="q must be float32"):
        prefill_attention(q.bfloat16(), k.bfloat16(), k.bfloat16(), None, 0.125)
    rows = quantize_slots(k)
    with pytest.raises(RuntimeError, match="int8 rows"):  # rows of another head size
        prefill_attention(q, rows[..., :-4], rows[..., :-4], None, 0.125)
    with pytest.raises(RuntimeError, match="multiple of 32"):  # int8 rows of 48 values: a group and a half
        prefill_attention(q[..., :48], rows[..., :54], rows[..., :54], None, 0.125)
    with pytest.raises(RuntimeError, match="Hq a multiple of Hkv"):
        prefill_attention(q[:, :3], k, k, None, 0.125)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        prefill_attention(q[..., :40], k[..., :40], k[..., :40], None, 0.125)
    with pytest.raises(RuntimeError, match="S must equal T"):
        prefill_attention(q, torch.randn(1, 2, 9, 64), torch.randn(1, 2, 9, 64), None, 0.125)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        prefill_attention(q, k, k, torch.ones(1, 1, 8, 9, dtype=torch.bool), 0.125)
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        prefill_attention(q, torch.randn(1, 2, 64, 8).transpose(2, 3), k, None, 0.125)


def test_w4a8_models_prefill_through_it_with_sdpas_tokens(prefill_attention, monkeypatch):
    """A float32 model with the kernels on reads its prompts through prefill_attention (a 300-token prompt in two
    chunks: causal, then under the cache's mask; a padded batch, under its mask) and gives the tokens it gives
    through SDPA."""
    model = GPT4LMHeadModel.from_pretrained("gpt4", dtype="float32")  # exact weights: no int8 activations to amplify
    for layer in model.layers:
        assert layer.attn.use_attention_kernels()
    masks = []
    monkeypatch.setattr(torch.ops.gpt4_kernels, "prefill_attention", lambda q, k, v, mask, scale: (
        masks.append(mask is not None) or prefill_attention(q, k, v, mask, scale)))
    story = "The history of the Roman Empire spans many centuries, from the founding of the city to its fall. "
    prompts = [story * 14 + "Its first emperor was", "Water boils at a temperature of"]
    assert len(model.tokenizer.encode(prompts[0])) > model.prefill_chunk
    outputs = greedy_with_and_without_attention_kernels(model, prompts, max_new_tokens=12)  # (and a padded batch)
    assert False in masks and True in masks  # causal first chunks, masked ones after them and in the batch
    assert outputs[True] == outputs[False]
    assert len(masks) == 5 * len(model.layers)  # none with the kernels off; with them on 2 + 1 chunks, the batch 2
