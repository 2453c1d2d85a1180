"""Our decode attention kernel (gpt4_kernels.decode_attention) against torch's SDPA: the same softmax(q k^T / sqrt(d))
v for one decode step, chunked and merged across threads, under masks, from strided cache slices, in fp32 and bf16,
and over an fp16 cache and an int8 one (SDPA over its rows dequantized)."""

import pytest
import torch
import torch.nn.functional as F

from gpt4 import GPT4LMHeadModel
from gpt4.cache import dequantize_slots, quantize_slots

from .conftest import greedy_with_and_without_attention_kernels, skip_without_w4a8


@pytest.fixture(scope="module")
def decode_attention():
    skip_without_w4a8()
    from gpt4.kernels import load_w4a8

    load_w4a8()
    return torch.ops.gpt4_kernels.decode_attention


# (batch, KV heads, query rows a KV head, head size, slots): one and several chunks of 64, a partial last chunk,
# the largest row count and head size, one slot. The kernel's register tiles take 3 query rows (then 2 or 1) by 4
# keys (a chunk's last tile reads past it) and by 4 vectors of the head (then 2 or 1): 7 rows with a head of 48
# leave one row and, with AVX2, 2 vectors over; 2 rows with a head of 80, 2 vectors (AVX-512: 1).
SHAPES = [(1, 3, 3, 64, 512), (2, 3, 3, 64, 70), (3, 2, 1, 32, 1), (1, 1, 16, 256, 200), (4, 2, 4, 64, 64),
          (2, 2, 4, 128, 100), (1, 2, 7, 48, 131), (2, 1, 2, 80, 67)]


def as_cache(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """Keys or values (..., D) as a KV cache of cache_dtype holds them (an int8 cache: its rows, KVCache's)."""
    return quantize_slots(x) if cache_dtype == torch.int8 else x.to(cache_dtype)


def as_float(cache: torch.Tensor) -> torch.Tensor:
    """The float32 values a cache's slots stand for: what SDPA gets."""
    return dequantize_slots(cache, torch.float32) if cache.dtype == torch.int8 else cache.float()


# (query dtype, cache dtype, tolerance): a float16 or int8 cache's queries stay float32, its keys and values alone
# rounded (an int8 cache's head size: a multiple of its groups of 32).
@pytest.mark.parametrize("dtype,cache_dtype,tolerance", [(torch.float32, torch.float32, 1e-5),
                                                         (torch.bfloat16, torch.bfloat16, 1e-2),
                                                         (torch.float32, torch.float16, 1e-5),
                                                         (torch.float32, torch.int8, 1e-5)])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_attention_equals_sdpa(decode_attention, shape, dtype, cache_dtype, tolerance):
    batch, heads, rows, size, slots = shape
    if cache_dtype == torch.int8 and size % 32:
        pytest.skip("int8 rows hold groups of 32")
    generator = torch.Generator().manual_seed(0)
    cache = as_cache(torch.randn(2, batch, heads, slots + 37, size, generator=generator), cache_dtype)  # longer
    k, v = cache[0, :, :, :slots], cache[1, :, :, :slots]  # its first slots: strided views, as the model passes
    q = torch.randn(batch, heads, rows, size, generator=generator).to(dtype) * 3  # sharper softmax
    mask = torch.rand(batch, 1, 1, slots, generator=generator) < 0.6
    mask[..., 0] = True
    if slots > 130:
        mask[0, ..., 1:130] = False  # whole chunks of 64 with no slot to attend
    for m in (None, mask, mask[:1]):  # no mask, one per row, one for all rows
        want = F.scaled_dot_product_attention(q.float(), as_float(k), as_float(v), attn_mask=m)
        got = decode_attention(q, k, v, m, size ** -0.5)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=tolerance)


def test_decode_attention_refuses_what_it_cannot_compute(decode_attention):
    q, k = torch.randn(1, 2, 3, 64), torch.randn(1, 2, 10, 64)
    with pytest.raises(RuntimeError, match="float32 or all bfloat16"):
        decode_attention(q, k.bfloat16(), k.bfloat16(), None, 0.125)
    with pytest.raises(RuntimeError, match="q float32 and k, v float16 or int8"):
        decode_attention(q.bfloat16(), k.half(), k.half(), None, 0.125)
    rows = quantize_slots(k)
    with pytest.raises(RuntimeError, match="q float32 and k, v float16 or int8"):
        decode_attention(q.bfloat16(), rows, rows, None, 0.125)
    with pytest.raises(RuntimeError, match="int8 rows"):  # rows of another head size
        decode_attention(q, rows[..., :-1], rows[..., :-1], None, 0.125)
    with pytest.raises(RuntimeError, match="multiple of 32"):  # int8 rows of 48 values: a group and a half
        decode_attention(q[..., :48], k[..., :54].to(torch.int8), k[..., :54].to(torch.int8), None, 0.125)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        decode_attention(q[..., :40], k[..., :40], k[..., :40], None, 0.125)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        decode_attention(q, k, k, torch.ones(1, 1, 1, 9, dtype=torch.bool), 0.125)
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        decode_attention(q, torch.randn(1, 2, 64, 10).transpose(2, 3), k, None, 0.125)  # columns, not rows


def test_w4a8_models_decode_through_it_with_sdpas_tokens():
    """quantize_'s w4a8 mode switches the kernel on; a float32 model decoding through it (two prompts of different
    lengths: a mask over the cache) gives the tokens of SDPA."""
    skip_without_w4a8()
    model = GPT4LMHeadModel.from_pretrained("gpt4", dtype="float32", quant="w4a8")
    assert all(layer.attn.attention_kernels for layer in model.layers)
    model = GPT4LMHeadModel.from_pretrained("gpt4", dtype="float32")  # exact weights: no int8 activations to amplify
    for layer in model.layers:
        assert layer.attn.use_attention_kernels()
    prompts = ["The capital of France is", "Water boils at a temperature of one hundred degrees"]
    outputs = greedy_with_and_without_attention_kernels(model, prompts, max_new_tokens=24)  # (and a padded batch)
    assert outputs[True] == outputs[False]
