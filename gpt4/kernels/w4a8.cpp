// w4a8: 4-bit weights (groups of 32 along the input, w = d * q + m, q in 0..15) times activations quantized to
// int8 in the same groups of 32, multiplied in integers with AVX-512 VNNI (vpdpbusd: 64 u8 x s8 products an
// instruction), as llama.cpp multiplies its Q4 blocks by Q8 activations. Registered as gpt4_kernels::w4a8_matmul.
// q8: the same for 8-bit weights (w = d * q, q in -128..127, GGUF's Q8_0 groups: an LM head), gpt4_kernels::q8_matmul.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

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

// The two block formats, each 16 output rows x 32 inputs. unpack: q[j], lane r: row r's weights 4j..4j+3 of the
// group as unsigned bytes u, and w = d * u + m for each row.
struct Q4Block {  // 256 bytes of nibbles, 16 fp16 d, 16 fp16 m
  static constexpr int64_t BYTES = 320;
  static void unpack(const uint8_t* w, __m512i q[8], __m512& dv, __m512& mv) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(w + 64 * c);
      q[c] = _mm512_and_si512(v, low);
      q[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
    dv = half16(w + 256);
    mv = half16(w + 288);
  }
};

struct Q8Block {  // 512 bytes u = q + 128, 16 fp16 d: w = d * (u - 128)
  static constexpr int64_t BYTES = 544;
  static void unpack(const uint8_t* w, __m512i q[8], __m512& dv, __m512& mv) {
    for (int j = 0; j < 8; ++j) q[j] = _mm512_loadu_si512(w + 64 * j);
    dv = half16(w + 512);
    mv = _mm512_mul_ps(dv, _mm512_set1_ps(-128.f));
  }
};

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

template <typename Block, typename T>
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
    constexpr int TILE = 8;  // token rows sharing one unpacking of the weights
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t t0 = 0; t0 < rows_total; t0 += TILE) {
        const int64_t rows = std::min<int64_t>(TILE, rows_total - t0);
        __m512 acc[TILE];
        for (int t = 0; t < TILE; ++t) acc[t] = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
          __m512i q[8];
          __m512 dv, mv;
          Block::unpack(blocks + (b * G + g) * Block::BYTES, q, dv, mv);
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

// Checks shared by the operators: blocks (N/16, K/32, Block::BYTES) contiguous uint8.
template <typename Block>
void check_blocks(const at::Tensor& blocks, const char* op) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.dim() == 3 &&
                  blocks.size(2) == Block::BYTES,
              op, ": blocks must be contiguous uint8 (N/16, K/32, ", Block::BYTES, ")");
}

template <typename Block>
at::Tensor blocks_matmul(const at::Tensor& x, const at::Tensor& blocks, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 32 == 0, op, ": x must be (T, K) with K a multiple of 32");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16");
  check_blocks<Block>(blocks, op);
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(blocks.size(1) * 32 == K, op, ": x has ", K, " inputs, the blocks ", blocks.size(1) * 32);
  const int64_t N = blocks.size(0) * 16;
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({T, N}, x.options());
  if (x.scalar_type() == at::kFloat) {
    matmul<Block>(xc.data_ptr<float>(), T, K, blocks.data_ptr<uint8_t>(), N, y.data_ptr<float>());
  } else {
    matmul<Block>(xc.data_ptr<at::BFloat16>(), T, K, blocks.data_ptr<uint8_t>(), N, y.data_ptr<at::BFloat16>());
  }
  return y;
}

// y (T, N) = x (T, K) @ w.T, read and written in x's dtype (float32 or bfloat16), accumulated in float32.
// blocks (N/16, K/32, 320) uint8, one per 16 output rows and group of 32 inputs, read in one stream:
//   bytes 0..255: 4 chunks of 64; chunk c holds 4 bytes per row r (bytes 4r..4r+3), whose low nibbles are
//                 q[r, 32g + 4c + i] and high nibbles q[r, 32g + 16 + 4c + i], i = 0..3;
//   bytes 256..287: d of the 16 rows (float16); bytes 288..319: m of the 16 rows (float16).
at::Tensor w4a8_matmul(const at::Tensor& x, const at::Tensor& blocks) {
  return blocks_matmul<Q4Block>(x, blocks, "w4a8_matmul");
}

// The same with blocks (N/16, K/32, 544): bytes 0..511, 8 chunks of 64; chunk j holds 4 bytes per row r (bytes
// 4r..4r+3), q[r, 32g + 4j + i] + 128, i = 0..3; bytes 512..543: d of the 16 rows (float16). w = d * q.
at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& blocks) {
  return blocks_matmul<Q8Block>(x, blocks, "q8_matmul");
}

template <typename Block, typename T>
void dequantize(const uint8_t* blocks, int64_t N, int64_t K, T* w_t) {
  const int64_t G = K / 32;
  at::parallel_for(0, N / 16 * G, 16, [&](int64_t begin, int64_t end) {
    const __m512i byte = _mm512_set1_epi32(0xFF);
    for (int64_t bg = begin; bg < end; ++bg) {  // block b, group g
      const int64_t b = bg / G, g = bg % G;
      __m512i q[8];
      __m512 dv, mv;
      Block::unpack(blocks + bg * Block::BYTES, q, dv, mv);
      for (int j = 0; j < 8; ++j) {
        for (int i = 0; i < 4; ++i) {  // input 32 g + 4 j + i: the 16 rows' values, one per lane
          const __m512i u = _mm512_and_si512(_mm512_srli_epi32(q[j], 8 * i), byte);
          store16(w_t + (32 * g + 4 * j + i) * N + 16 * b, _mm512_fmadd_ps(_mm512_cvtepi32_ps(u), dv, mv));
        }
      }
    }
  });
}

template <typename Block>
at::Tensor blocks_dequantize(const at::Tensor& blocks, at::ScalarType dtype, const char* op) {
  check_blocks<Block>(blocks, op);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op, ": dtype must be float32 or bfloat16");
  const int64_t N = blocks.size(0) * 16, K = blocks.size(1) * 32;
  at::Tensor w_t = at::empty({K, N}, blocks.options().dtype(dtype));
  if (dtype == at::kFloat) {
    dequantize<Block>(blocks.data_ptr<uint8_t>(), N, K, w_t.data_ptr<float>());
  } else {
    dequantize<Block>(blocks.data_ptr<uint8_t>(), N, K, w_t.data_ptr<at::BFloat16>());
  }
  return w_t;
}

// The weight transposed, (K, N), in dtype (float32 or bfloat16): d * q + m in float32, rounded once. For prompt
// chunks, multiplied in bf16 (AMX) rather than in integers.
at::Tensor w4a8_dequantize(const at::Tensor& blocks, at::ScalarType dtype) {
  return blocks_dequantize<Q4Block>(blocks, dtype, "w4a8_dequantize");
}

at::Tensor q8_dequantize(const at::Tensor& blocks, at::ScalarType dtype) {
  return blocks_dequantize<Q8Block>(blocks, dtype, "q8_dequantize");
}

template <typename T>
void gather_rows(const uint8_t* blocks, int64_t N, int64_t G, const int64_t* ids, int64_t count, T* out) {
  for (int64_t t = 0; t < count; ++t) {
    TORCH_CHECK(ids[t] >= 0 && ids[t] < N, "q8_rows: id ", ids[t], " is outside the table's ", N, " rows");
    const int64_t b = ids[t] / 16, r = ids[t] % 16;
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* w = blocks + (b * G + g) * Q8Block::BYTES;
      const float d = static_cast<float>(reinterpret_cast<const at::Half*>(w + 512)[r]);
      for (int k = 0; k < 32; ++k) {  // input k of the group: chunk k / 4, row r's byte k % 4 there
        const int q = static_cast<int>(w[64 * (k / 4) + 4 * r + k % 4]) - 128;
        out[(t * G + g) * 32 + k] = static_cast<T>(d * static_cast<float>(q));
      }
    }
  }
}

// Rows `ids` (any shape, int64) of q8 blocks' weight, (..., K) in dtype: d * q in float32, rounded once (a tied
// embedding's lookup). One operator: in a compiled graph, slicing the fp16 d out of the blocks copied all of them.
at::Tensor q8_rows(const at::Tensor& blocks, const at::Tensor& ids, at::ScalarType dtype) {
  check_blocks<Q8Block>(blocks, "q8_rows");
  TORCH_CHECK(ids.scalar_type() == at::kLong, "q8_rows: ids must be int64");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "q8_rows: dtype must be float32 or bfloat16");
  const int64_t N = blocks.size(0) * 16, G = blocks.size(1);
  const at::Tensor flat_ids = ids.contiguous();
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(G * 32);
  at::Tensor out = at::empty(shape, blocks.options().dtype(dtype));
  if (dtype == at::kFloat) {
    gather_rows(blocks.data_ptr<uint8_t>(), N, G, flat_ids.data_ptr<int64_t>(), ids.numel(), out.data_ptr<float>());
  } else {
    gather_rows(blocks.data_ptr<uint8_t>(), N, G, flat_ids.data_ptr<int64_t>(), ids.numel(),
                out.data_ptr<at::BFloat16>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(gpt4_kernels, lib) {
  lib.def("w4a8_matmul(Tensor x, Tensor blocks) -> Tensor");
  lib.def("w4a8_dequantize(Tensor blocks, ScalarType dtype) -> Tensor");
  lib.def("q8_matmul(Tensor x, Tensor blocks) -> Tensor");
  lib.def("q8_dequantize(Tensor blocks, ScalarType dtype) -> Tensor");
  lib.def("q8_rows(Tensor blocks, Tensor ids, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt4_kernels, CPU, lib) {
  lib.impl("w4a8_matmul", &w4a8_matmul);
  lib.impl("w4a8_dequantize", &w4a8_dequantize);
  lib.impl("q8_matmul", &q8_matmul);
  lib.impl("q8_dequantize", &q8_dequantize);
  lib.impl("q8_rows", &q8_rows);
}
