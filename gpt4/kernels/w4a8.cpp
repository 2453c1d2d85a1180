// w4a8: 4-bit weights (groups of 32 along the input, w = d * q + m, q in 0..15) times activations quantized to
// int8 in the same groups of 32, multiplied in integers with AVX-512 VNNI (vpdpbusd: 64 u8 x s8 products an
// instruction), as llama.cpp multiplies its Q4 blocks by Q8 activations. Registered as gpt4_kernels::w4a8_matmul.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>

namespace {

// Each row of x (T, K) in groups of 32: q = round(x / s), s = max|x| / 127, and s * sum(q) (the term a group's
// weight offset m multiplies).
void quantize_groups(const float* x, int64_t count, int8_t* xq, float* scale, float* scaled_sum) {
  for (int64_t i = 0; i < count; ++i) {
    const float* v = x + i * 32;
    const __m512 a0 = _mm512_loadu_ps(v), a1 = _mm512_loadu_ps(v + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
    const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.f / amax : 0.f);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + i * 32), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + i * 32 + 16), _mm512_cvtsepi32_epi8(q1));
    scale[i] = amax / 127.f;
    scaled_sum[i] = scale[i] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
  }
}

// y (T, N) = x (T, K) @ w.T in x's dtype (float32 or bfloat16).
// packed (N/16, K/32, 4, 64) uint8: output rows in blocks of 16; in group g, chunk c holds 4 bytes per row r
// (bytes 4r..4r+3), whose low nibbles are q[r, 32g + 4c + i] and high nibbles q[r, 32g + 16 + 4c + i], i = 0..3.
// d, m (N/16, K/32, 16) float32: each group's scale and offset, per row of the block.
at::Tensor w4a8_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& d, const at::Tensor& m) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 32 == 0, "w4a8_matmul: x must be (T, K) with K a multiple of 32");
  const int64_t T = x.size(0), K = x.size(1), G = K / 32, N = d.size(0) * 16;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == N * K / 2,
              "w4a8_matmul: packed must be contiguous uint8 (N/16, K/32, 4, 64)");
  TORCH_CHECK(d.scalar_type() == at::kFloat && m.scalar_type() == at::kFloat && d.is_contiguous() &&
              m.is_contiguous() && d.size(1) == G && d.sizes() == m.sizes(), "w4a8_matmul: d, m (N/16, K/32, 16)");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor xq = at::empty({T, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({T, G}, x.options().dtype(at::kFloat));
  at::Tensor scaled_sum = at::empty({T, G}, x.options().dtype(at::kFloat));
  quantize_groups(xf.data_ptr<float>(), T * G, xq.data_ptr<int8_t>(), scale.data_ptr<float>(),
                  scaled_sum.data_ptr<float>());
  at::Tensor y = at::empty({T, N}, x.options().dtype(at::kFloat));
  const uint8_t* W = packed.data_ptr<uint8_t>();
  const float *D = d.data_ptr<float>(), *M = m.data_ptr<float>();
  const int8_t* XQ = xq.data_ptr<int8_t>();
  const float *S = scale.data_ptr<float>(), *SS = scaled_sum.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N / 16, 1, [&](int64_t begin, int64_t end) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    constexpr int TILE = 8;  // token rows sharing one unpacking of the weights
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t t0 = 0; t0 < T; t0 += TILE) {
        const int64_t rows = std::min<int64_t>(TILE, T - t0);
        __m512 acc[TILE];
        for (int t = 0; t < TILE; ++t) acc[t] = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
          const uint8_t* w = W + (b * G + g) * 256;
          __m512i q[8];  // q[j], lane r: row r's values 4j..4j+3 of the group
          for (int c = 0; c < 4; ++c) {
            const __m512i v = _mm512_loadu_si512(w + 64 * c);
            q[c] = _mm512_and_si512(v, low);
            q[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
          }
          const __m512 dv = _mm512_loadu_ps(D + (b * G + g) * 16), mv = _mm512_loadu_ps(M + (b * G + g) * 16);
          for (int64_t t = 0; t < rows; ++t) {
            const int32_t* xg = reinterpret_cast<const int32_t*>(XQ + (t0 + t) * K + g * 32);
            __m512i dot = _mm512_setzero_si512();
            for (int j = 0; j < 8; ++j) dot = _mm512_dpbusd_epi32(dot, q[j], _mm512_set1_epi32(xg[j]));
            const int64_t i = (t0 + t) * G + g;
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), dv), _mm512_set1_ps(S[i]), acc[t]);
            acc[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(SS[i]), acc[t]);
          }
        }
        for (int64_t t = 0; t < rows; ++t) _mm512_storeu_ps(Y + (t0 + t) * N + b * 16, acc[t]);
      }
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(gpt4_kernels, lib) {
  lib.def("w4a8_matmul(Tensor x, Tensor packed, Tensor d, Tensor m) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt4_kernels, CPU, lib) {
  lib.impl("w4a8_matmul", &w4a8_matmul);
}
