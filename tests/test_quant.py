"""Quantized linears: exact against their own dequantized weights (and 8-bit activations in w8a8), close to fp32
on the real model."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gpt4 import GPT4LMHeadModel, quant
from gpt4.kernels import BLOCK_LAYOUTS as BLOCK_FORMATS  # kind: (a block's bytes, its first float16 byte)
from gpt4.quant import (DEQUANTIZE_ROWS, Int4Linear, Int8Embedding, Int8Linear, integer_matmul_available, linear_bytes,
                        quantize_)

from .conftest import skip_without_w4a8, tiny_model


def _activations_seen(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x as the integer matmuls see it: each row over its own max |x| in int8 steps; with 16 bits, plus the
    remainder in steps 254 times finer."""
    rows = x.reshape(-1, x.shape[-1])
    step = rows.abs().amax(-1, keepdim=True) / 127
    high = (rows / step).round()
    seen = high * step
    if bits == 16:
        seen = seen + ((rows / step - high) * 254).round() * (step / 254)
    return seen.reshape(x.shape)


@pytest.mark.parametrize("rows", [5, 200])  # decode and prefill sizes
@pytest.mark.parametrize("activation_bits", [None, 8, 16])
def test_int8_linear_equals_matmul_with_its_dequantized_weight(rows, activation_bits):
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 64), torch.randn(96), torch.randn(rows, 3, 64)
    layer = Int8Linear(w, b, activation_bits=activation_bits)
    assert (layer.dequantized() - w).abs().max() <= w.abs().amax(1).max() / 127  # half a step at most, x2
    exact = F.linear(x, layer.dequantized(), b)
    if activation_bits == 8 or (activation_bits == 16 and rows < 100 and integer_matmul_available()):
        want = F.linear(_activations_seen(x, activation_bits), layer.dequantized(), b.bfloat16().float())
        torch.testing.assert_close(layer(x).float(), want, atol=1e-3, rtol=0.01)  # bf16 output
        # 8 bits are visibly off the exact product; 16 are within bf16's rounding of it
        off = (layer(x).float() - exact).abs().max() / exact.abs().max()
        assert off > 3e-3 if activation_bits == 8 else off < 3e-3
    else:  # bf16 activations: the weight-only kernel, or (prompt chunks) a bf16 matmul
        want = F.linear(x.bfloat16().float(), layer.dequantized(), b)
        torch.testing.assert_close(layer(x).float(), want, atol=0.15, rtol=0.02)


@pytest.mark.parametrize("activation_bits", [8, 16])
def test_integer_matmuls_are_exact(activation_bits):
    """The integer products (oneDNN's on packed weights where the CPU has VNNI) equal int64 arithmetic, scaled
    by the weight's and the activations' steps."""
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(192, 128), None, activation_bits=activation_bits)
    assert (layer.packed is not None) == integer_matmul_available()
    if layer.packed is not None:  # the packed copy is the only one
        assert layer.weight_int8 is None
        kept = Int8Linear(torch.randn(192, 128), None, activation_bits=activation_bits, keep_rows=True)
        assert kept.weight_int8 is not None
    elif activation_bits == 16:
        pytest.skip("no VNNI: 16-bit activations use the weight-only kernel")
    q = (layer.dequantized() / layer.scales[:, None]).round().long()  # (out, in)
    rows = torch.randn(7, 128) * torch.tensor([0.01, 1, 100, 1, 5, 0.2, 3])[:, None]
    step = rows.abs().amax(-1, keepdim=True) / 127
    high = (rows / step).round()
    products = (high.long() @ q.t()).double() * layer.scales.double()  # exact integer sums, then scaled
    if activation_bits == 16:
        low = ((rows / step - high) * 254).round()
        assert low.abs().max() <= 127
        products = products + (low.long() @ q.t()).double() * layer.scales.double() / 254
    torch.testing.assert_close(layer._integer_matmul(rows), (products * step.double()).float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("activation_bits", [8, 16])
def test_integer_matmul_rows_do_not_depend_on_the_rest_of_the_batch(activation_bits):
    """Activations are quantized per row: a sequence's logits are the same alone or batched with others."""
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(96, 64), None, activation_bits=activation_bits)
    batch = torch.randn(6, 64) * torch.tensor([0.01, 1, 100, 1, 5, 0.2])[:, None]
    together = layer(batch)
    for i in range(6):
        assert torch.equal(layer(batch[i:i + 1]), together[i:i + 1])


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_prompt_chunks_multiply_in_float32_where_bf16_is_not_native(kind, native, monkeypatch):
    """A bf16 layer's prompt chunk (dequantized weights, one matmul) runs in fp32 on CPUs without AMX or AVX512-BF16,
    where PyTorch converts bf16 in software (~70x slower than fp32 on an AVX2 EPYC); its result is still bf16."""
    monkeypatch.setattr(quant, "bf16_matmul_is_native", lambda: native)
    torch.manual_seed(0)
    w, x = torch.randn(192, 128), torch.randn(DEQUANTIZE_ROWS, 128).bfloat16()
    layer = Int4Linear.from_float(w, None, 32) if kind == "int4" else Int8Linear(w, None, dtype=torch.bfloat16)
    compute = torch.bfloat16 if native else torch.float32
    weight_t = layer.dequantized_t(compute) if kind == "int4" else layer._dequantized_t(compute)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (x.to(compute) @ weight_t).bfloat16())


@pytest.mark.parametrize("rows", [4, 200])  # the int4 kernel (decode) and dequantize + bf16 matmul (prefill)
@pytest.mark.parametrize("out_features", [96, 192])  # prefill reads a plain copy of the nibbles / the kernel's own
def test_int4_linear_equals_matmul_with_its_dequantized_weight(rows, out_features):
    torch.manual_seed(0)
    w, x = torch.randn(out_features, 128), torch.randn(rows, 128)
    layer = Int4Linear.from_float(w, None, group_size=32)
    # Whole 64-row blocks in the layout we pack (PyTorch's AVX-512 one): weights held once.
    assert (layer.nibbles is None) == (out_features % 64 == 0 and quant._kernel_layout_is_known())
    groups = w.reshape(out_features, 4, 32)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    dequant = (((groups - lo) / step).round() * step + lo).reshape(out_features, 128)
    torch.testing.assert_close(layer.dequantized().float(), dequant, atol=0.04, rtol=0.01)  # bf16 scales
    # Prefill's weight is (q - 8) * scale + zero from the stored bf16 scales and zeros, in fp32, rounded once.
    scale, zero = layer.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (out, groups) each
    q = ((groups - lo) / step).round().clamp(0, 15)  # (out, groups, 32)
    exact = ((q - 8) * scale[..., None] + zero[..., None]).reshape(out_features, 128).bfloat16()
    assert torch.equal(layer.dequantized(), exact)
    torch.testing.assert_close(layer(x).float(), F.linear(x, dequant), atol=0.3, rtol=0.03)


@pytest.mark.parametrize("out_features", [128, 96])  # whole blocks of 64 rows (packed by us) or not (by PyTorch)
def test_int4_layers_packed_from_gguf_block_bytes_match_pytorchs_own_packing(out_features):
    from gpt4.quant import unpack_block_nibbles

    generator = torch.Generator().manual_seed(0)
    nibbles = torch.randint(0, 256, (out_features, 96 // 2), dtype=torch.uint8, generator=generator)  # 3 groups
    scales, zeros = torch.rand(out_features, 3, generator=generator), torch.randn(out_features, 3, generator=generator)
    q = unpack_block_nibbles(nibbles)  # (out, 96): byte j of a group's 16 holds elements j and 16 + j
    assert torch.equal(q[:, 16], nibbles[:, 0] >> 4) and torch.equal(q[:, 32 + 3], nibbles[:, 16 + 3] & 15)
    layer = Int4Linear.from_block_nibbles(nibbles, scales, zeros, None)
    # The bytes the kernel reads are exactly those of PyTorch's packing op.
    assert torch.equal(layer.packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1))
    # The same from the groups where they lie in Q4_1 blocks, between the scales (a strided (out, 3, 16) view).
    blocks = torch.zeros(out_features, 3, 20, dtype=torch.uint8)
    blocks[..., 4:] = nibbles.view(out_features, 3, 16)
    in_place = Int4Linear.from_block_nibbles(blocks[..., 4:], scales, zeros, None)
    assert not blocks[..., 4:].is_contiguous() and torch.equal(in_place.packed, layer.packed)
    reference = Int4Linear(q, scales, zeros, 32, None)
    for rows in (1, 200):  # the kernel, and prefill's dequantized weight
        x = torch.randn(rows, 96, generator=generator)
        assert torch.equal(layer(x), reference(x))


@pytest.mark.parametrize("family", ["llama-tied", "llama-gqa-untied", "gpt2"])
@pytest.mark.parametrize("mode", ["int8", "int4", "w8a8"])
def test_quantized_models_look_up_int8_embedding_rows_shared_with_a_tied_head(family, mode):
    model = tiny_model(family, hidden_size=64, intermediate_size=128)  # the int4 kernel's smallest tile
    table = model.embed_tokens.weight.detach().clone()  # (vocab, hidden)
    ids = torch.tensor([[0, 5, 95, 17, 5]])
    with torch.no_grad():
        want = model(ids).logits
        quantize_(model, mode)
        got = model(ids).logits.float()
    embedding = model.embed_tokens
    assert isinstance(embedding, Int8Embedding)
    tied = model.config.tie_word_embeddings
    head_rows = model.lm_head.weight_int8  # None where the head holds only a packed copy
    assert (head_rows is not None and embedding.weight_int8.data_ptr() == head_rows.data_ptr()) == tied  # held once
    rows = embedding(ids)[0]
    assert rows.dtype == torch.float32 and model.dtype == torch.float32
    step = table[ids[0]].abs().amax(-1, keepdim=True) / 127  # one int8 step of each row
    # Half a step of rounding, plus a bf16 scale's error (2^-9 relative) times |q| <= 127: 0.75 step at most.
    assert ((rows - table[ids[0]]).abs() <= 0.76 * step).all()
    assert F.cosine_similarity(got, want, dim=-1).min() > 0.98


@pytest.mark.parametrize("mode,min_agreement", [("int8", 0.9), ("int4", 0.6), ("w8a8", 0.6)])
def test_quantized_default_model_stays_close_to_fp32(mode, min_agreement, default_model):
    quantized = quantize_(GPT4LMHeadModel.from_pretrained("gpt4", dtype="bfloat16"), mode)
    assert linear_bytes(quantized) < linear_bytes(default_model) / (5 if mode == "int4" else 3)
    ids = torch.tensor([default_model.tokenizer.encode("The Eiffel Tower is located in the city of")])
    with torch.no_grad():
        a, b = default_model(ids).logits[0, -1], quantized(ids).logits[0, -1].float()
    assert F.cosine_similarity(a, b, dim=0) > 0.97
    assert a.argmax() == b.argmax()
    want = default_model.generate(ids, max_new_tokens=16)[0, ids.shape[1]:]
    got = quantized.generate(ids, max_new_tokens=16)[0, ids.shape[1]:]
    first_difference = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), len(want))
    assert first_difference / len(want) >= min_agreement


def test_int4_from_a_4bit_gguf_keeps_the_files_quality(default_model):
    """--quant int4 on the Q4_1 default model runs the file's own 4-bit groups (and an 8-bit head, as the file
    has): its perplexity stays within 1% of the fp32 dequantized model. Re-quantizing the Q8_0 head to 4 bits
    instead costs ~5%."""
    from pydoc_data.topics import topics

    from gpt4.evaluation.perplexity import perplexity

    text = topics["assignment"][:4000]
    int4 = GPT4LMHeadModel.from_pretrained("gpt4", dtype="bfloat16", quant="int4")
    assert isinstance(int4.lm_head, Int8Linear) and isinstance(int4.layers[0].mlp.down_proj, Int4Linear)
    want = perplexity(default_model, text, window=512)["ppl"]
    got = perplexity(int4, text, window=512)["ppl"]
    assert abs(got / want - 1) < 0.01, (got, want)


def test_a_weight_only_int8_layer_switched_to_integer_matmuls_keeps_its_tied_embedding():
    """use_integer_matmul (int4's LM head under compile_decode): 16-bit activations, the embedding that shares
    the head's rows looks up the same values as before."""
    torch.manual_seed(0)
    model = tiny_model("llama-tied", hidden_size=64, intermediate_size=128)
    assert model.lm_head.weight is model.embed_tokens.weight
    quantize_(model, "int4")
    head, embedding = model.lm_head, model.embed_tokens
    assert head.activation_bits is None and embedding.weight_int8 is head.weight_int8
    ids, x = torch.tensor([[3, 1, 4, 1, 5]]), torch.randn(7, 64)
    looked_up, weight_only = embedding(ids), head(x)
    if not head.use_integer_matmul(keep_rows=True):
        pytest.skip("no VNNI: the head keeps the weight-only kernel")
    assert head.activation_bits == 16 and head.packed is not None and head.scales.dtype == torch.float32
    assert torch.equal(embedding(ids), looked_up) and embedding.scales.dtype == torch.bfloat16
    want = F.linear(_activations_seen(x, 16), head.dequantized())
    torch.testing.assert_close(head(x).float(), want, atol=1e-3, rtol=0.01)
    torch.testing.assert_close(head(x).float(), weight_only.float(), atol=0.05, rtol=0.02)


def _activations_in_groups_of_32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, K) as the w4a8 kernel quantizes it: int8 values and a scale per group of 32, max |x| / 127."""
    groups = x.reshape(x.shape[0], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    q = (groups * torch.where(amax > 0, 127 / amax, 0)).round()  # half to even, as the kernel's conversion
    return q, amax / 127


@pytest.mark.parametrize("rows", [1, 5, 7, 8, 9, 20, 200])  # tiles of 8 or 4 rows, then 4, 2, 1; 200: unpacked once
def test_w4a8_linear_multiplies_its_int4_weights_by_int8_activations_in_groups_of_32(rows):
    skip_without_w4a8()
    from gpt4.quant import W4A8Linear

    generator = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 96, generator=generator), torch.randn(48, generator=generator)  # 3 blocks of 16 rows
    int4 = Int4Linear.from_float(w, b, group_size=32)
    layer = W4A8Linear.from_int4(int4)
    # The kernel's weight: d q + m in fp32, d = scale and m = zero - 8 scale in float16.
    scale, zero = int4.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (out, groups)
    q = int4.dequantized_q().float().reshape(48, 3, 32)
    weight = (q * scale[..., None] + (zero - 8 * scale).half().float()[..., None]).reshape(48, 96)
    assert torch.equal(torch.ops.gpt4_kernels.w4a8_dequantize(layer.blocks, torch.float32).t(), weight)
    x = torch.randn(rows, 96, generator=generator) * torch.linspace(0.1, 10, 96)  # groups of different ranges
    x[0, :32] = 0  # an all-zero group: scale 0, no division by it
    kernel = torch.ops.gpt4_kernels.w4a8_matmul  # reads bf16 as it is and rounds its bf16 result as torch does
    assert torch.equal(kernel(x.bfloat16(), layer.blocks), kernel(x.bfloat16().float(), layer.blocks).bfloat16())
    if rows >= DEQUANTIZE_ROWS and quant.bf16_matmul_is_native():  # prefill: the bf16 matmul, dequantized weight
        assert torch.equal(layer.dequantized_t(), weight.t().bfloat16())
        exact = F.linear(x, weight, b.bfloat16().float())
        assert (layer(x) - exact).norm() / exact.norm() < 0.01  # bf16 activations, weights, products
        return
    q, scale = _activations_in_groups_of_32(x)
    # Integer products per group, times the group's activation scale; the weight's d * q + m in fp32.
    want = F.linear((q * scale).reshape(rows, 96), weight, b.bfloat16().float())
    torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-4)
    off = (layer(x) - F.linear(x, weight, b.bfloat16().float())).norm() / want.norm()
    assert 1e-4 < off < 0.02  # the int8 activations: visible, small
    assert torch.equal(layer(x[:1]), layer(x)[:1])  # a row does not depend on the others
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_w4a8_default_model_runs_the_files_groups_with_int8_activations(default_model):
    """--quant w4a8 on the Q4_1 default model: every layer int4 would hold becomes W4A8Linear, the tied head and
    embedding share one Q8Linear table (the file's Q8_0 groups); its decode logits stay close to fp32's, and it may
    be compiled ahead of time."""
    skip_without_w4a8()
    from gpt4 import aot
    from gpt4.quant import Q8Embedding, Q8Linear, W4A8Linear

    model = GPT4LMHeadModel.from_pretrained("gpt4", dtype="bfloat16", quant="w4a8")
    assert isinstance(model.lm_head, Q8Linear) and isinstance(model.layers[0].mlp.down_proj, W4A8Linear)
    assert isinstance(model.embed_tokens, Q8Embedding) and model.embed_tokens.blocks is model.lm_head.blocks
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    int4 = GPT4LMHeadModel.from_pretrained("gpt4", dtype="bfloat16", quant="int4")
    assert linear_bytes(model.layers) == linear_bytes(int4.layers)  # the same nibbles, scales and zeros, 16 bits each
    assert linear_bytes(model) - linear_bytes(int4) == 576 * 49152 // 32 * 2 - 49152 * 2  # a d a group, not a row
    ids = torch.tensor([default_model.tokenizer.encode("The Eiffel Tower is located in the city of")])
    with torch.no_grad():
        want = default_model(ids).logits[0, -1]
        cache_free_step = model(ids[:, -1:]).logits[0, -1]  # one row: the kernel
        got = model(ids).logits[0, -1].float()
    assert torch.isfinite(cache_free_step).all()
    assert F.cosine_similarity(want, got, dim=0) > 0.97 and want.argmax() == got.argmax()
    out = model.generate(ids, max_new_tokens=8)[0, ids.shape[1]:]  # decoding: one row at a time
    assert "Paris" in model.tokenizer.decode(out.tolist())
    assert aot.unsupported(model) is None


@pytest.mark.parametrize("rows", [1, 9, 200])  # the kernel (tiles of 8 rows) and prefill's matmul
def test_q8_linear_multiplies_int8_groups_by_int8_activations_in_groups_of_32(rows):
    skip_without_w4a8()
    from gpt4.quant import Q8Linear

    generator = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 96, generator=generator), torch.randn(48, generator=generator)
    w[5, 32:64] = 0  # an all-zero group of weights: d = 0
    layer = Q8Linear(*Q8Linear.quantize(w), b)
    q, d = Q8Linear.quantize(w)
    weight = (q.float() * d.half().float()[..., None]).reshape(48, 96)  # w = d q, d in float16
    assert torch.equal(torch.ops.gpt4_kernels.q8_dequantize(layer.blocks, torch.float32).t(), weight)
    assert (weight - w).abs().max() <= w.abs().max() / 127  # half a step, and d's float16 rounding
    x = torch.randn(rows, 96, generator=generator) * torch.linspace(0.1, 10, 96)
    x[0, :32] = 0  # an all-zero group of activations
    if rows >= 128:
        assert torch.equal(layer.dequantized_t(), weight.t().bfloat16())
        exact = F.linear(x, weight, b.bfloat16().float())
        assert (layer(x) - exact).norm() / exact.norm() < 0.01
        return
    xq, scale = _activations_in_groups_of_32(x)
    want = F.linear((xq * scale).reshape(rows, 96), weight, b.bfloat16().float())
    torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-4)
    assert torch.equal(layer(x[:1]), layer(x)[:1])
    kernel = torch.ops.gpt4_kernels.q8_matmul  # bf16 in and out, rounded as torch rounds
    assert torch.equal(kernel(x.bfloat16(), layer.blocks), kernel(x.bfloat16().float(), layer.blocks).bfloat16())


def test_q8_quantizes_as_llama_cpp_and_holds_the_default_models_q8_0_table_bit_for_bit():
    """Q8Linear.quantize gives the bytes of the gguf package's Q8_0 quantization (bit-exact with ggml's); the
    default model's Q8_0 token embedding, taken from the file as it is, dequantizes to the gguf package's values,
    and Q8Embedding looks up those rows."""
    skip_without_w4a8()
    import gguf
    import numpy as np

    from gpt4.models import resolve
    from gpt4.quant import Q8Embedding, Q8Linear
    from gpt4.weights.gguf_file import GGUFFile

    generator = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=generator) * torch.logspace(-3, 2, 32)[:, None]
    w[0, :32] = 0
    w[1, :32] = torch.arange(32) - 15.5  # halves: away from zero
    q, d = Q8Linear.quantize(w)
    theirs = torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0).view(np.uint8).copy())
    ours = torch.cat([d.half().view(torch.uint8).reshape(32, 4, 2), q.view(torch.uint8)], dim=-1)  # (rows, g, 34)
    assert torch.equal(ours.reshape(32, -1), theirs)

    path = resolve("gpt4")
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
    reference = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())  # (vocab, hidden)
    file = GGUFFile(path)
    table = Q8Linear(*file.int8_groups("token_embd.weight"), None, dtype=torch.bfloat16)
    file.close()
    assert torch.equal(torch.ops.gpt4_kernels.q8_dequantize(table.blocks, torch.float32).t(), reference)
    ids = torch.tensor([[0, 1, 15, 16, 49151], [7, 7, 12345, 30000, 2]])
    for dtype in (torch.float32, torch.bfloat16):  # rounded once
        assert torch.equal(Q8Embedding(table, dtype)(ids), reference[ids].to(dtype))


@pytest.mark.parametrize("family", ["llama-tied", "llama-gqa-untied"])
def test_w4a8_makes_the_head_and_embedding_q8_tables_held_once_when_tied(family):
    skip_without_w4a8()
    from gpt4.quant import Q8Embedding, Q8Linear

    model = tiny_model(family, hidden_size=64, intermediate_size=128)
    table = model.embed_tokens.weight.detach().clone()
    ids = torch.tensor([[0, 5, 95, 17, 5]])
    with torch.no_grad():
        want = model(ids).logits
        quantize_(model, "w4a8")
        got = model(ids).logits.float()
    assert isinstance(model.lm_head, Q8Linear) and isinstance(model.embed_tokens, Q8Embedding)
    assert (model.embed_tokens.blocks is model.lm_head.blocks) == model.config.tie_word_embeddings
    q, d = Q8Linear.quantize(table)
    assert torch.equal(model.embed_tokens(ids), (q.float() * d.half().float()[..., None]).flatten(1)[ids])
    assert F.cosine_similarity(got, want, dim=-1).min() > 0.98
    for factor in (1e10, 1e-7):  # d past float16's range, or among its subnormals: the int8 tables of before
        big = tiny_model(family, hidden_size=64, intermediate_size=128)
        with torch.no_grad():
            big.embed_tokens.weight.mul_(factor)
            if not model.config.tie_word_embeddings:
                big.lm_head.weight.mul_(factor)
        quantize_(big, "w4a8")
        assert isinstance(big.lm_head, Int8Linear) and isinstance(big.embed_tokens, Int8Embedding)


def _assert_multiplies_as_its_weight(layer, weight, bias, rows, generator):
    """A blocks layer against its weight (out, in): decode rows as activations quantized to int8 in groups of 32
    times the weight (to float32's rounding), a prefill chunk as the bf16 matmul where bf16 is native (to 1%; elsewhere
    through the kernel as decode rows); a row alone as in a batch."""
    x = torch.randn(rows, weight.shape[1], generator=generator) * torch.linspace(0.1, 10, weight.shape[1])
    if rows >= DEQUANTIZE_ROWS and quant.bf16_matmul_is_native():  # prefill: the bf16 matmul, dequantized weight
        exact = F.linear(x, weight, bias.bfloat16().float())
        assert (layer(x) - exact).norm() / exact.norm() < 0.01
        return
    xq, scale = _activations_in_groups_of_32(x)
    want = F.linear((xq * scale).reshape(rows, -1), weight, bias.bfloat16().float())
    torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-4)
    assert torch.equal(layer(x[:1]), layer(x)[:1])


@pytest.mark.parametrize("rows", [1, 5, 9, 20, 200])
def test_q6_linear_multiplies_6_bit_groups_with_a_d_a_half_by_int8_activations(rows):
    """Q6Linear: GGUF's Q6_K as groups of 32 (low nibbles, fifth and sixth bits, a d for each half) in our kernel's
    blocks, dequantized bit for bit (w = d (q - 32)), multiplied by activations quantized to int8 in groups of 32;
    prefill's dequantized matmul."""
    skip_without_w4a8()
    from gpt4.quant import Q6Linear, pack_bits

    generator = torch.Generator().manual_seed(0)
    n, groups = 48, 3
    q = torch.randint(0, 64, (n, groups, 32), generator=generator, dtype=torch.uint8)
    nibbles = (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)  # byte j: element j low, element 16 + j high
    d = (torch.rand(n, groups, 2, generator=generator) * 0.02 - 0.01).half().float()  # (a Q6_K scale is signed)
    b = torch.randn(n, generator=generator)
    layer = Q6Linear(nibbles, pack_bits((q >> 4) & 1), pack_bits(q >> 5), d, b)
    assert (layer.kind, layer.blocks.shape[-1]) == ("q6", 448)
    weight = ((q.float() - 32).view(n, groups, 2, 16) * d[..., None]).reshape(n, groups * 32)
    assert torch.equal(torch.ops.gpt4_kernels.q6_dequantize(layer.blocks, torch.float32).t(), weight)
    assert torch.equal(Q6Linear.weights(nibbles, pack_bits((q >> 4) & 1), pack_bits(q >> 5), d), weight)
    _assert_multiplies_as_its_weight(layer, weight, b, rows, generator)


@pytest.mark.parametrize("offsets", [False, True])  # GGUF's Q5_0 (m = -16 d) and Q5_K (each group's own m)
@pytest.mark.parametrize("rows", [1, 5, 9, 20, 200])
def test_q5_linear_multiplies_5_bit_groups_by_int8_activations_in_groups_of_32(rows, offsets):
    """Q5Linear: 5-bit groups (low nibbles, fifth bits, d, m) in our kernel's blocks, dequantized bit for bit
    (w = d q + m), multiplied by activations quantized to int8 in groups of 32; prefill's dequantized matmul."""
    skip_without_w4a8()
    from gpt4.quant import Q5Linear, pack_bits

    generator = torch.Generator().manual_seed(0)
    n, groups = 48, 3
    q = torch.randint(0, 32, (n, groups, 32), generator=generator, dtype=torch.uint8)
    nibbles = (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)  # byte j: element j low, element 16 + j high
    fifth = pack_bits(q >> 4)
    d = (torch.rand(n, groups, generator=generator) * 0.02 + 0.001).half().float()
    m = -(torch.rand(n, groups, generator=generator) * 0.2).half().float() if offsets else -16 * d
    b = torch.randn(n, generator=generator)
    layer = Q5Linear(nibbles, fifth, d, m, b)
    assert (layer.kind, layer.blocks.shape[-1]) == (("q5k", 384) if offsets else ("q5", 352))
    weight = (q.float() * d[..., None] + m[..., None]).reshape(n, groups * 32)
    dequantize = getattr(torch.ops.gpt4_kernels, f"{layer.kind}_dequantize")
    assert torch.equal(dequantize(layer.blocks, torch.float32).t(), weight)
    _assert_multiplies_as_its_weight(layer, weight, b, rows, generator)


def test_q8_quantization_against_float16_scales_holds_any_weights():
    """Q8Linear.quantize(float16_scales=True), w4a8's rounding of K-quant layers: d rounded to float16 first and q
    computed against it, so that tiny groups (d among float16's subnormals, which Q8_0's float32 d would not fit)
    stay within half a step of their weights, |q| <= 127."""
    from gpt4.quant import Q8Linear

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 64, generator=generator) * torch.logspace(-9, 0, 32)[:, None]  # rows from 1e-9 to 1
    weight[0] = 0
    q, d = Q8Linear.quantize(weight, float16_scales=True)
    assert q.abs().max() <= 127 and Q8Linear.fits(weight.shape, d) and torch.equal(d, d.half().float())
    back = (q.float() * d[..., None]).flatten(1)
    step = weight.unflatten(1, (-1, 32)).abs().amax(-1) / 127  # the float32 step, which float16 rounds by at most
    rounded = torch.maximum(step * 2.0 ** -11, torch.tensor(2.0 ** -25))  # 2^-11 of it, or half a subnormal's spacing
    bound = 0.5 * d + 127 * rounded  # half a step of d, and what rounding d moved the group's largest weight
    assert ((back - weight).unflatten(1, (-1, 32)).abs() <= bound[..., None]).all()
    assert not Q8Linear.fits(weight.shape, Q8Linear.quantize(weight)[1])  # llama.cpp's float32 d: subnormals


def test_w4a8_rounds_a_bf16_result_half_to_even():
    """Its bf16 output rounds as torch does: 257, halfway between bf16's 256 and 258, becomes 256."""
    skip_without_w4a8()
    from gpt4.quant import W4A8Linear

    q = torch.full((16, 32), 8, dtype=torch.uint8)  # w = (q - 8) * 1 + 0
    q[0, 0], q[0, 1] = 10, 11  # row 0: w = 2, 3, 0, ...
    layer = W4A8Linear.from_int4(Int4Linear(q, torch.ones(16, 1), torch.zeros(16, 1), 32, None))
    x = torch.zeros(1, 32, dtype=torch.bfloat16)
    x[0, 0], x[0, 1] = 127, 1  # quantized exactly (scale 1): y = 127 * 2 + 3 = 257 in the kernel's fp32
    y = torch.ops.gpt4_kernels.w4a8_matmul
    assert y(x.float(), layer.blocks)[0, 0] == 257 and y(x, layer.blocks)[0, 0] == 256


def test_w4a8_holds_the_q4_files_weights_bit_for_bit():
    """From the default model's Q4_1 blocks (a transformer block's MLP down projection), the weights w4a8 multiplies
    are the gguf package's dequantization of the file, exactly: d and m as the file has them, unrounded."""
    skip_without_w4a8()
    import gguf

    from gpt4.models import resolve
    from gpt4.quant import W4A8Linear
    from gpt4.weights.gguf_file import GGUFFile

    path, name = resolve("gpt4"), "blk.3.ffn_down.weight"
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
    reference = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())  # (out, in)
    file = GGUFFile(path)
    layer = W4A8Linear(*file.int4_groups(name), None)
    file.close()
    assert torch.equal(torch.ops.gpt4_kernels.w4a8_dequantize(layer.blocks, torch.float32).t(), reference)


def test_w4a8_holds_scales_and_offsets_that_float16_holds():
    """Its blocks keep d and m in float16: quantize_ keeps a layer whose values float16 would not hold in int4."""
    from gpt4.quant import W4A8Linear

    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    for factor, fits in ((1, True), (1e6, False), (1e-9, False)):  # float16's range ends at 65504 and, below
        int4 = Int4Linear.from_float(w * factor, None, group_size=32)  # 2^-14, in subnormals of less precision
        assert W4A8Linear.fits(*int4.scales_zeros()) == fits
    skip_without_w4a8()  # (the layers are made with the kernel)
    model = tiny_model("llama-gqa-untied", hidden_size=64, intermediate_size=128)
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight.mul_(1e8)  # scales past 65504
    quantize_(model, "w4a8")
    assert isinstance(model.layers[0].mlp.down_proj, Int4Linear)
    assert isinstance(model.layers[1].mlp.down_proj, W4A8Linear)
    assert isinstance(model.layers[0].attn.qkv_proj, W4A8Linear)


def test_auto_quant_takes_int4_where_the_w4a8_kernel_fails_to_build_and_says_so(monkeypatch):
    from gpt4 import kernels
    from gpt4.errors import GPT4Error

    def failing_build():
        raise GPT4Error("Building the w4a8 kernel failed (no compiler); it needs g++ with AVX-512 support.")

    monkeypatch.setattr(kernels, "w4a8_unavailable_reason", lambda: None)
    monkeypatch.setattr(kernels, "load_w4a8", failing_build)
    with pytest.warns(RuntimeWarning, match="no compiler.*--quant auto takes int4"):
        assert kernels.w4a8_ready.__wrapped__() is False


def test_w4a8_kernel_once_built_loads_without_cpp_extension(tmp_path):
    """A finished build (marked "built") is loaded as it is in later processes: cpp_extension, whose import alone
    is 0.13 s of a cold start, is not imported, and the operators work."""
    skip_without_w4a8()
    import os
    import shutil
    import subprocess
    import sys

    from gpt4 import kernels

    kernels.load_w4a8()
    build = kernels.w4a8_build_dir()
    assert (build / "built").exists()
    copy = tmp_path / "kernels" / build.name
    copy.mkdir(parents=True)
    for name in ("gpt4_w4a8.so", "built"):
        shutil.copy2(build / name, copy / name)
    script = ("import sys, torch; from gpt4.kernels import load_w4a8; load_w4a8(); "
              "blocks = torch.zeros(1, 1, 320, dtype=torch.uint8); "
              "y = torch.ops.gpt4_kernels.w4a8_matmul(torch.ones(1, 32), blocks); "
              "print(y.shape, 'torch.utils.cpp_extension' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, GPT4_HOME=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "torch.Size([1, 16]) False"


def test_w4a8_where_it_cannot_run_says_why(monkeypatch):
    from gpt4 import kernels
    from gpt4.errors import GPT4Error

    monkeypatch.setattr(kernels, "w4a8_unavailable_reason",
                        lambda: "--quant w4a8 needs a CPU with AVX-512 VNNI; use --quant int4.")
    with pytest.raises(GPT4Error, match="AVX-512 VNNI"):
        kernels.load_w4a8.__wrapped__()



_AVX2_BUILD_SCRIPT = """
import sys, torch
from gpt4.kernels import AVX2_FLAGS, load_w4a8, w4a8_flags
load_w4a8()
assert w4a8_flags() == AVX2_FLAGS
inputs, ops, out = torch.load(sys.argv[1], weights_only=True), torch.ops.gpt4_kernels, {}
for kind in %r:
    for x in ("x1", "x5", "x9"):
        out[kind + x] = getattr(ops, kind + "_matmul")(inputs[x], inputs[kind])
    out[kind] = getattr(ops, kind + "_dequantize")(inputs[kind], torch.float32)
out["attention"] = ops.decode_attention(inputs["q"], inputs["k"], inputs["v"], None, 0.125)
torch.save(out, sys.argv[2])
""" % (list(BLOCK_FORMATS),)


def test_the_avx2_kernel_computes_what_the_avx512_kernel_does(tmp_path):
    """On an AVX-512 CPU the AVX2 build of the same source (GPT4_KERNEL_ISA=avx2; in a subprocess: both register the
    same operators) gives every block format's matmuls and dequantization bit for bit (the same integer sums, Q8's
    as sums of q - 128 plus 128 times the activations' sum, and the same float operations a lane), and one attention
    step to float rounding (its sums in vectors of 8 instead of 16)."""
    from gpt4.kernels import AVX512_FLAGS, w4a8_flags

    skip_without_w4a8()
    if w4a8_flags() != AVX512_FLAGS:
        pytest.skip("this CPU runs the AVX2 build itself: the other kernel tests check it")
    generator = torch.Generator().manual_seed(0)
    inputs = {"x1": torch.randn(1, 96, generator=generator), "x5": torch.randn(5, 96, generator=generator) * 3,
              "x9": torch.randn(9, 96, generator=generator).bfloat16(),
              "q": torch.randn(2, 3, 4, 64, generator=generator),  # 2 rows, 3 KV heads of 4 query rows
              "k": torch.randn(2, 3, 70, 64, generator=generator), "v": torch.randn(2, 3, 70, 64, generator=generator)}
    for kind, (size, scales) in BLOCK_FORMATS.items():  # 32 outputs x 96 inputs: random bytes, small fp16 scales
        blocks = torch.randint(0, 256, (2, 3, size), dtype=torch.uint8, generator=generator)
        halves = (torch.rand(2, 3, (size - scales) // 2, generator=generator) * 0.02 - 0.01).half()
        blocks[..., scales:] = halves.view(torch.uint8)
        inputs[kind] = blocks
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "GPT4_KERNEL_ISA": "avx2"}
    subprocess.run([sys.executable, "-c", _AVX2_BUILD_SCRIPT, str(tmp_path / "inputs.pt"), str(tmp_path / "avx2.pt")],
                   env=env, check=True, timeout=300)
    avx2, ops = torch.load(tmp_path / "avx2.pt", weights_only=True), torch.ops.gpt4_kernels
    for kind in BLOCK_FORMATS:
        for x in ("x1", "x5", "x9"):
            assert torch.equal(avx2[kind + x], getattr(ops, kind + "_matmul")(inputs[x], inputs[kind])), (kind, x)
        assert torch.equal(avx2[kind], getattr(ops, kind + "_dequantize")(inputs[kind], torch.float32)), kind
    torch.testing.assert_close(avx2["attention"],
                               ops.decode_attention(inputs["q"], inputs["k"], inputs["v"], None, 0.125))
