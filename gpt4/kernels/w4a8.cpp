// w4a8: 4-bit weights (groups of 32 along the input, w = d * q + m, q in 0..15) times activations quantized to
// int8 in the same groups of 32, multiplied in integers with AVX-512 VNNI (vpdpbusd: 64 u8 x s8 products an
// instruction), as llama.cpp multiplies its Q4 blocks by Q8 activations. Registered as gpt4_kernels::w4a8_matmul.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t BLOCK_BYTES = 320;  // 16 output rows x 32 inputs: 256 bytes of nibbles, 16 fp16 d, 16 fp16 m

// 32 values as two vectors of 16 floats.
inline void load32(const float* v, __m512& a0, __m512& a1) {
  a0 = _mm512_loadu_ps(v);
  a1 = _mm512_loadu_ps(v + 16);
}

inline __m512 bf16_to_float(const void* v) {  // bf16 is the top half of a float
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

inline void load32(const at::BFloat16* v, __m512& a0, __m512& a1) {
  a0 = bf16_to_float(v);
  a1 = bf16_to_float(v + 16);
}

inline __m512 half16(const uint8_t* v) {  // 16 float16 values
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
}

inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }

// Rounded to nearest even, as PyTorch converts (NaN stays NaN); written without AVX512-BF16, which VNNI CPUs
// before Cooper Lake lack.
inline void store16(at::BFloat16* out, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(rounded));
}

// Each row of x (T, K) in groups of 32: q = round(x / s), s = max|x| / 127, and s * sum(q) (the term a group's
// weight offset m multiplies).
template <typename T>
void quantize_groups(const T* x, int64_t count, int8_t* xq, float* scale, float* scaled_sum) {
  for (int64_t i = 0; i < count; ++i) {
    __m512 a0, a1;
    load32(x + i * 32, a0, a1);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
    const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.f / amax : 0.f);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + i * 32), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + i * 32 + 16), _mm512_cvtsepi32_epi8(q1));
    scale[i] = amax / 127.f;
    scaled_sum[i] = scale[i] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
  }
}

template <typename T>
void matmul(const T* x, int64_t rows_total, int64_t K, const uint8_t* blocks, int64_t N, T* y) {
  const int64_t G = K / 32;
  // The quantized activations, reused from call to call: a decode step makes 120 of these calls.
  thread_local std::vector<int8_t> xq_buffer;
  thread_local std::vector<float> scale_buffer;
  xq_buffer.resize(rows_total * K);
  scale_buffer.resize(2 * rows_total * G);
  int8_t* XQ = xq_buffer.data();
  float *S = scale_buffer.data(), *SS = S + rows_total * G;
  quantize_groups(x, rows_total * G, XQ, S, SS);
  at::parallel_for(0, N / 16, 1, [&](int64_t begin, int64_t end) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    constexpr int TILE = 8;  // token rows sharing one unpacking of the weights
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t t0 = 0; t0 < rows_total; t0 += TILE) {
        const int64_t rows = std::min<int64_t>(TILE, rows_total - t0);
        __m512 acc[TILE];
        for (int t = 0; t < TILE; ++t) acc[t] = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
          const uint8_t* w = blocks + (b * G + g) * BLOCK_BYTES;
          __m512i q[8];  // q[j], lane r: row r's values 4j..4j+3 of the group
          for (int c = 0; c < 4; ++c) {
            const __m512i v = _mm512_loadu_si512(w + 64 * c);
            q[c] = _mm512_and_si512(v, low);
            q[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
          }
          const __m512 dv = half16(w + 256), mv = half16(w + 288);
          for (int64_t t = 0; t < rows; ++t) {
            const int32_t* xg = reinterpret_cast<const int32_t*>(XQ + (t0 + t) * K + g * 32);
            __m512i dot = _mm512_setzero_si512();
            for (int j = 0; j < 8; ++j) dot = _mm512_dpbusd_epi32(dot, q[j], _mm512_set1_epi32(xg[j]));
            const int64_t i = (t0 + t) * G + g;
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), dv), _mm512_set1_ps(S[i]), acc[t]);
            acc[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(SS[i]), acc[t]);
          }
        }
        for (int64_t t = 0; t < rows; ++t) store16(y + (t0 + t) * N + b * 16, acc[t]);
      }
    }
  });
}

// y (T, N) = x (T, K) @ w.T, read and written in x's dtype (float32 or bfloat16), accumulated in float32.
// blocks (N/16, K/32, 320) uint8, one per 16 output rows and group of 32 inputs, read in one stream:
//   bytes 0..255: 4 chunks of 64; chunk c holds 4 bytes per row r (bytes 4r..4r+3), whose low nibbles are
//                 q[r, 32g + 4c + i] and high nibbles q[r, 32g + 16 + 4c + i], i = 0..3;
//   bytes 256..287: d of the 16 rows (float16); bytes 288..319: m of the 16 rows (float16).
at::Tensor w4a8_matmul(const at::Tensor& x, const at::Tensor& blocks) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 32 == 0, "w4a8_matmul: x must be (T, K) with K a multiple of 32");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "w4a8_matmul: x must be float32 or bfloat16");
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.dim() == 3 &&
                  blocks.size(1) * 32 == K && blocks.size(2) == BLOCK_BYTES,
              "w4a8_matmul: blocks must be contiguous uint8 (N/16, K/32, 320)");
  const int64_t N = blocks.size(0) * 16;
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({T, N}, x.options());
  if (x.scalar_type() == at::kFloat) {
    matmul(xc.data_ptr<float>(), T, K, blocks.data_ptr<uint8_t>(), N, y.data_ptr<float>());
  } else {
    matmul(xc.data_ptr<at::BFloat16>(), T, K, blocks.data_ptr<uint8_t>(), N, y.data_ptr<at::BFloat16>());
  }
  return y;
}

template <typename T>
void dequantize(const uint8_t* blocks, int64_t N, int64_t K, T* w_t) {
  const int64_t G = K / 32;
  at::parallel_for(0, N / 16 * G, 16, [&](int64_t begin, int64_t end) {
    const __m512i low = _mm512_set1_epi32(0x0F);
    for (int64_t bg = begin; bg < end; ++bg) {  // block b, group g
      const int64_t b = bg / G, g = bg % G;
      const uint8_t* w = blocks + bg * BLOCK_BYTES;
      const __m512 dv = half16(w + 256), mv = half16(w + 288);
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(w + 64 * c);  // lane r: row r's 4 bytes
        for (int i = 0; i < 4; ++i) {
          for (int h = 0; h < 2; ++h) {  // input 32 g + 16 h + 4 c + i: the 16 rows' values, one per lane
            const __m512i q = _mm512_and_si512(_mm512_srli_epi32(v, 8 * i + 4 * h), low);
            const __m512 value = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), dv, mv);
            store16(w_t + (32 * g + 16 * h + 4 * c + i) * N + 16 * b, value);
          }
        }
      }
    }
  });
}

// The weight transposed, (K, N), in dtype (float32 or bfloat16): d * q + m in float32, rounded once. For prompt
// chunks, multiplied in bf16 (AMX) rather than in integers.
at::Tensor w4a8_dequantize(const at::Tensor& blocks, at::ScalarType dtype) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.dim() == 3 &&
                  blocks.size(2) == BLOCK_BYTES, "w4a8_dequantize: blocks must be contiguous uint8 (N/16, K/32, 320)");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "w4a8_dequantize: dtype must be float32 or bfloat16");
  const int64_t N = blocks.size(0) * 16, K = blocks.size(1) * 32;
  at::Tensor w_t = at::empty({K, N}, blocks.options().dtype(dtype));
  if (dtype == at::kFloat) {
    dequantize(blocks.data_ptr<uint8_t>(), N, K, w_t.data_ptr<float>());
  } else {
    dequantize(blocks.data_ptr<uint8_t>(), N, K, w_t.data_ptr<at::BFloat16>());
  }
  return w_t;
}

}  // namespace

TORCH_LIBRARY(gpt4_kernels, lib) {
  lib.def("w4a8_matmul(Tensor x, Tensor blocks) -> Tensor");
  lib.def("w4a8_dequantize(Tensor blocks, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt4_kernels, CPU, lib) {
  lib.impl("w4a8_matmul", &w4a8_matmul);
  lib.impl("w4a8_dequantize", &w4a8_dequantize);
}
