"""A prototype decode kernel, measured against the one the package uses: is a faster int4 matmul within reach?

Decoding one sequence with `--aot` spends ~3.8 of its 5.5 ms a token in PyTorch's int4 kernel
(`_weight_int4pack_mm_for_cpu`), which unpacks nibbles to bf16 and multiplies in floating point. llama.cpp instead
quantizes the activations to int8 in groups of 32 (its Q8 blocks) and multiplies 4-bit weights by them with integer
dot products (AVX-512 VNNI's vpdpbusd: 64 u8 x s8 products an instruction). This script builds such a kernel
(C++, compiled at run time with PyTorch's cpp_extension; needs g++, ninja and a CPU with AVX-512 VNNI) and runs both
on the real default model: every int4 layer's weights, fed the activations the model gives it at one decode step of
a real prompt.

    python benchmarks/bench_int4_vnni_kernel.py [--tokens 1 4 8] [--calls 2000] [--perplexity-tokens 4096]
                                                [--out results/int4-vnni-kernel.json]

Prints, per layer shape and token count, both kernels' time a call (through Python: each includes a few
microseconds of call overhead, measured apart as "fixed") and their error against float32 matmuls with the layer's
dequantized weights; then one decode step's 120 layer calls summed; then the model's perplexity on real text (the
first pydoc topics, windows of 512, as `gpt4 perplexity` scores them) with every int4 layer run by either kernel.
The kernel is not used by the package (yet).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from gpt4 import GPT4LMHeadModel
from gpt4.evaluation.perplexity import perplexity
from gpt4.quant import Int4Linear, _unpack_kernel_layout_t

KERNEL = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// Each row of x (T, K) in groups of 32: int8 values q = round(x / s), s = max|x| / 127, and s * sum(q) (the
// term a group's weight offset multiplies).
static void quantize_groups(const float* x, int64_t T, int64_t K, int8_t* xq, float* scale, float* scaled_sum) {
  const int64_t G = K / 32;
  for (int64_t i = 0; i < T * G; ++i) {
    const float* v = x + i * 32;
    __m512 a0 = _mm512_loadu_ps(v), a1 = _mm512_loadu_ps(v + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
    float inv = amax > 0 ? 127.f / amax : 0.f;
    __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, _mm512_set1_ps(inv)));
    __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, _mm512_set1_ps(inv)));
    _mm_storeu_si128((__m128i*)(xq + i * 32), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128((__m128i*)(xq + i * 32 + 16), _mm512_cvtsepi32_epi8(q1));
    scale[i] = amax / 127.f;
    scaled_sum[i] = scale[i] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
}

// y (T, N) = x (T, K) @ w.T, w = d * q + m in groups of 32 along K, q in 0..15.
// packed (N/16, K/32, 4, 16, 4) uint8: output rows in blocks of 16; for group g, chunk c, row r, byte i, the low
// nibble is q[r, 32g + 4c + i] and the high nibble q[r, 32g + 16 + 4c + i]. d, m (N/16, K/32, 16) float.
torch::Tensor q4_q8_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor d, torch::Tensor m) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.dim() == 2 && x.size(1) % 32 == 0, "x: (T, K) float32, K % 32 == 0");
  const int64_t T = x.size(0), K = x.size(1), N = d.size(0) * 16, G = K / 32;
  auto xc = x.contiguous();
  auto xq = torch::empty({T, K}, torch::kInt8);
  auto scale = torch::empty({T, G}, torch::kFloat), scaled_sum = torch::empty({T, G}, torch::kFloat);
  quantize_groups(xc.data_ptr<float>(), T, K, xq.data_ptr<int8_t>(), scale.data_ptr<float>(),
                  scaled_sum.data_ptr<float>());
  auto y = torch::empty({T, N}, torch::kFloat);
  const uint8_t* W = packed.data_ptr<uint8_t>();
  const float *D = d.data_ptr<float>(), *M = m.data_ptr<float>();
  const int8_t* XQ = xq.data_ptr<int8_t>();
  const float *S = scale.data_ptr<float>(), *SS = scaled_sum.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N / 16, 1, [&](int64_t b0, int64_t b1) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    constexpr int TILE = 8;  // tokens sharing one unpacking of the weights
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t t0 = 0; t0 < T; t0 += TILE) {
        const int64_t tn = std::min<int64_t>(TILE, T - t0);
        __m512 acc[TILE];
        for (int t = 0; t < TILE; ++t) acc[t] = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
          const uint8_t* w = W + (b * G + g) * 256;
          __m512i q[8];  // q[j]: row r's values 4j..4j+3 of the group in lane r
          for (int c = 0; c < 4; ++c) {
            __m512i v = _mm512_loadu_si512(w + 64 * c);
            q[c] = _mm512_and_si512(v, low);
            q[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
          }
          const __m512 dv = _mm512_loadu_ps(D + (b * G + g) * 16), mv = _mm512_loadu_ps(M + (b * G + g) * 16);
          for (int t = 0; t < tn; ++t) {
            const int32_t* xg = (const int32_t*)(XQ + (t0 + t) * K + g * 32);
            __m512i dot = _mm512_setzero_si512();
            for (int j = 0; j < 8; ++j) dot = _mm512_dpbusd_epi32(dot, q[j], _mm512_set1_epi32(xg[j]));
            const int64_t i = (t0 + t) * G + g;
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), dv), _mm512_set1_ps(S[i]), acc[t]);
            acc[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(SS[i]), acc[t]);
          }
        }
        for (int t = 0; t < tn; ++t) _mm512_storeu_ps(Y + (t0 + t) * N + b * 16, acc[t]);
      }
    }
  });
  return y;
}
"""


def build_kernel():
    flags = Path("/proc/cpuinfo").read_text()
    if "avx512_vnni" not in flags:
        raise SystemExit("This prototype needs AVX-512 VNNI (avx512_vnni in /proc/cpuinfo); this CPU lacks it.")
    return load_inline("gpt4_q4_q8_prototype", cpp_sources=KERNEL, functions=["q4_q8_matmul"],
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])


def to_prototype_layout(layer: Int4Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's own q, scales and zeros (PyTorch's packing undone) in the kernel's layout: w = d * q + m."""
    n, k = layer.out_features, layer.in_features
    q = _unpack_kernel_layout_t(layer.packed, n, k).t()  # (n, k) in 0..15
    # (q - 8) * scale + zero == scale * q + (zero - 8 * scale)
    scale_zero = layer.scales_and_zeros.float()  # (k / 32, n, 2)
    d, m = scale_zero[..., 0].t(), (scale_zero[..., 1] - 8 * scale_zero[..., 0]).t()  # (n, k / 32)
    groups = q.reshape(n // 16, 16, k // 32, 32).permute(0, 2, 1, 3)  # (n/16, k/32, 16 rows, 32)
    low = groups[..., :16].reshape(n // 16, k // 32, 16, 4, 4)  # (.., row, chunk, byte)
    high = groups[..., 16:].reshape(n // 16, k // 32, 16, 4, 4)
    packed = (low | (high << 4)).permute(0, 1, 3, 2, 4).contiguous()  # (.., chunk, row, byte)

    def per_block(t):  # (n, k/32) -> (n/16, k/32, 16)
        return t.reshape(n // 16, 16, k // 32).permute(0, 2, 1).contiguous()

    return packed, per_block(d), per_block(m)


def layer_inputs(model, prompt: str) -> dict[str, torch.Tensor]:
    """Each int4 layer's input at the first decode step after `prompt` (float32, one row)."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: seen.__setitem__(name, args[0].reshape(-1, mod.in_features)[-1:].float())))
    ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return seen


def time_call(fn, calls: int) -> float:
    for _ in range(min(100, calls)):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6  # microseconds


def perplexity_with(model, layers: dict[str, Int4Linear], kernel, tokens: int) -> float:
    """The model's perplexity on the first pydoc topics with every int4 layer run by the prototype (kernel given)
    or by PyTorch's kernels (None: the layers' own forward)."""
    from pydoc_data.topics import topics

    ids = model.tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics)[:8]))[:tokens]
    text = model.tokenizer.decode(ids)
    originals = {}
    if kernel is not None:
        for name, layer in layers.items():
            proto = to_prototype_layout(layer)

            def forward(x, layer=layer, proto=proto):
                y = kernel.q4_q8_matmul(x.reshape(-1, layer.in_features).float(), *proto)
                y = y.reshape(*x.shape[:-1], layer.out_features)
                return (y if layer.bias is None else y + layer.bias).to(x.dtype)

            originals[name], layer.forward = layer.forward, forward
    try:
        return perplexity(model, text, window=512, stride=512, progress=False)["ppl"]
    finally:
        for name, forward in originals.items():
            layers[name].forward = forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--perplexity-tokens", type=int, default=4096, help="0: skip the perplexity comparison")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    kernel = build_kernel()
    model = GPT4LMHeadModel.from_pretrained("gpt4", dtype="bfloat16", quant="int4")
    inputs = layer_inputs(model, "The history of the Roman Empire spans more than a thousand years, from")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear)}

    tiny = Int4Linear(torch.randint(0, 16, (64, 64)), torch.rand(64, 2) / 100, torch.zeros(64, 2), 32, None)
    tiny_proto, x64 = to_prototype_layout(tiny), torch.randn(1, 64)
    fixed = {"prototype": time_call(lambda: kernel.q4_q8_matmul(x64, *tiny_proto), args.calls),
             "pytorch": time_call(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                 x64.bfloat16(), tiny.packed, 32, tiny.scales_and_zeros), args.calls)}
    print(f"fixed cost of a call (64 x 64): prototype {fixed['prototype']:.1f} us, PyTorch {fixed['pytorch']:.1f} us")

    rows, step = [], {t: {"prototype": 0.0, "pytorch": 0.0} for t in args.tokens}
    by_shape: dict[tuple, list] = {}
    for name, layer in layers.items():
        proto = to_prototype_layout(layer)
        weight = layer.dequantized().float()  # (n, k): both kernels' weights exactly
        for tokens in args.tokens:
            # the layer's real input, with small perturbations for the other rows of a multi-token call
            x = inputs[name].repeat(tokens, 1)
            if tokens > 1:
                x[1:] += 0.05 * x[0].std() * torch.randn_like(x[1:])
            reference = x @ weight.t()
            xb = x.bfloat16()
            ours = kernel.q4_q8_matmul(x, *proto)
            theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, layer.packed, 32, layer.scales_and_zeros).float()
            shape = (layer.out_features, layer.in_features, tokens)
            if shape not in by_shape:  # time each shape once: the 30 layers of a shape cost the same
                by_shape[shape] = [
                    time_call(lambda: kernel.q4_q8_matmul(x, *proto), args.calls),
                    time_call(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                        xb, layer.packed, 32, layer.scales_and_zeros), args.calls)]
            ours_us, theirs_us = by_shape[shape]
            step[tokens]["prototype"] += ours_us
            step[tokens]["pytorch"] += theirs_us
            rows.append({"layer": name, "out": shape[0], "in": shape[1], "tokens": tokens,
                         "prototype_us": round(ours_us, 2), "pytorch_us": round(theirs_us, 2),
                         "prototype_rel_err": float((ours - reference).norm() / reference.norm()),
                         "pytorch_rel_err": float((theirs - reference).norm() / reference.norm())})
    print(f"{'out x in':>12} {'tokens':>6} {'prototype us':>13} {'PyTorch us':>11} {'ratio':>6} "
          f"{'err prototype':>14} {'err PyTorch':>12}")
    for (n, k, tokens), (ours_us, theirs_us) in by_shape.items():
        errs = [(r["prototype_rel_err"], r["pytorch_rel_err"]) for r in rows
                if (r["out"], r["in"], r["tokens"]) == (n, k, tokens)]
        e_ours = sum(e[0] for e in errs) / len(errs)
        e_theirs = sum(e[1] for e in errs) / len(errs)
        print(f"{f'{n} x {k}':>12} {tokens:>6} {ours_us:>13.1f} {theirs_us:>11.1f} {theirs_us / ours_us:>6.2f} "
              f"{e_ours:>14.4f} {e_theirs:>12.4f}")
    n_calls = len(layers)
    for tokens, total in step.items():
        less_fixed = {k: v - n_calls * fixed[k] for k, v in total.items()}
        print(f"one decode step, {tokens} token(s), {n_calls} layer calls: prototype {total['prototype'] / 1000:.2f} "
              f"ms, PyTorch {total['pytorch'] / 1000:.2f} ms ({total['pytorch'] / total['prototype']:.2f}x); less the "
              f"fixed cost of the calls: {less_fixed['prototype'] / 1000:.2f} vs {less_fixed['pytorch'] / 1000:.2f} ms "
              f"({less_fixed['pytorch'] / less_fixed['prototype']:.2f}x)")
    ppl = {}
    if args.perplexity_tokens:
        ppl = {"pytorch": perplexity_with(model, layers, None, args.perplexity_tokens),
               "prototype": perplexity_with(model, layers, kernel, args.perplexity_tokens)}
        print(f"perplexity, {args.perplexity_tokens} tokens of pydoc topics in windows of 512: PyTorch's int4 kernel "
              f"{ppl['pytorch']:.3f}, the prototype {ppl['prototype']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                        "fixed_us": fixed, "step_us": step, "perplexity": ppl, "layers": rows},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
