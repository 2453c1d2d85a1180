// w4a8: 4-bit weights (groups of 32 along the input, w = d * q + m, q in 0..15) times activations quantized to
// int8 in the same groups of 32, multiplied in integers with AVX-512 VNNI (vpdpbusd: 64 u8 x s8 products an
// instruction), as llama.cpp multiplies its Q4 blocks by Q8 activations. Registered as gpt4_kernels::w4a8_matmul.
// q8: the same for 8-bit weights (w = d * q, q in -128..127, GGUF's Q8_0 groups: an LM head), gpt4_kernels::q8_matmul.
// decode_attention: one decode step's attention over the KV cache (AVX-512F), which w4a8 models use with them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <optional>
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

inline __m512 load16(const float* v) { return _mm512_loadu_ps(v); }
inline __m512 load16(const at::BFloat16* v) { return bf16_to_float(v); }

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

// exp(x) for 16 floats x <= 0 (scores minus their maximum): x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor
// polynomial of degree 7 (error below 1e-8 there), times 2^n; 0 below -104 (under float's smallest subnormal).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts: r exact enough
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068203094173e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(p, n);
}

constexpr int64_t SLOTS_PER_CHUNK = 64;  // cache slots a task attends to (partial softmax, merged afterwards)
constexpr int64_t MAX_ROWS = 16, MAX_DIM = 256;

// One task: G query rows (q, float32, scaled) of one KV head over slots start..stop-1. Writes the rows' maxima of
// the scores, their sums of exp(score - max), and (G, D) sums of exp(score - max) * v over the unmasked slots.
template <typename KV>
void attend_chunk(const float* q, int64_t G, int64_t D, const KV* k, const KV* v, int64_t k_stride, int64_t v_stride,
                  const bool* mask, int64_t mask_stride, int64_t start, int64_t stop, float* max, float* sum,
                  float* acc) {
  const int64_t n = stop - start, vectors = D / 16;
  float scores[MAX_ROWS][SLOTS_PER_CHUNK];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = start + i;
    if (mask != nullptr && !mask[t * mask_stride]) {
      for (int64_t g = 0; g < G; ++g) scores[g][i] = -INFINITY;
      continue;
    }
    __m512 key[MAX_DIM / 16];
    for (int64_t j = 0; j < vectors; ++j) key[j] = load16(k + t * k_stride + 16 * j);
    for (int64_t g = 0; g < G; ++g) {
      __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(q + g * D), key[0]);
      for (int64_t j = 1; j < vectors; ++j) dot = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + 16 * j), key[j], dot);
      scores[g][i] = _mm512_reduce_add_ps(dot);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float top = -INFINITY;
    for (int64_t i = 0; i < n; ++i) top = std::max(top, scores[g][i]);
    max[g] = top;
    __m512 total = _mm512_setzero_ps();
    if (top != -INFINITY) {  // (-inf: every slot of the chunk is masked, and every weight 0)
      for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 lanes = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
        const __m512 s = _mm512_maskz_loadu_ps(lanes, scores[g] + i);
        const __m512 e = _mm512_maskz_mov_ps(lanes, exp_nonpositive(_mm512_sub_ps(s, _mm512_set1_ps(top))));
        _mm512_mask_storeu_ps(scores[g] + i, lanes, e);
        total = _mm512_add_ps(total, e);
      }
    }
    sum[g] = _mm512_reduce_add_ps(total);
    // The weighted values, D / 16 accumulators in registers; the chunk's values (16 KB for D = 64 in fp32) stay in
    // L1 from one query row to the next.
    __m512 out[MAX_DIM / 16];
    for (int64_t j = 0; j < vectors; ++j) out[j] = _mm512_setzero_ps();
    if (top != -INFINITY) {
      for (int64_t i = 0; i < n; ++i) {
        const __m512 weight = _mm512_set1_ps(scores[g][i]);  // 0 for a masked slot
        const KV* value = v + (start + i) * v_stride;
        for (int64_t j = 0; j < vectors; ++j) out[j] = _mm512_fmadd_ps(weight, load16(value + 16 * j), out[j]);
      }
    }
    for (int64_t j = 0; j < vectors; ++j) _mm512_storeu_ps(acc + g * D + 16 * j, out[j]);
  }
}

template <typename KV>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mask,
                           int64_t mask_batch_stride, int64_t mask_stride, float scale, at::Tensor& y) {
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), slots = k.size(2);
  const int64_t chunks = (slots + SLOTS_PER_CHUNK - 1) / SLOTS_PER_CHUNK, tasks = B * H * chunks;
  const KV* Q = q.data_ptr<KV>();  // (contiguous)
  const KV* K = k.data_ptr<KV>();
  const KV* V = v.data_ptr<KV>();
  // Each task's maxima (G), sums (G) and weighted values (G x D), uninitialized: every task writes all of its own.
  thread_local std::vector<float> partial_buffer;
  partial_buffer.resize(tasks * G * (D + 2));
  float* partials = partial_buffer.data();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    float queries[MAX_ROWS * MAX_DIM];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks, c = task % chunks, b = bh / H, h = bh % H;
      for (int64_t e = 0; e < G * D; e += 16) {  // the KV head's query rows in float32, scaled once
        _mm512_storeu_ps(queries + e, _mm512_mul_ps(load16(Q + bh * G * D + e), _mm512_set1_ps(scale)));
      }
      float* part = partials + task * G * (D + 2);
      attend_chunk(queries, G, D, K + b * k.stride(0) + h * k.stride(1), V + b * v.stride(0) + h * v.stride(1),
                   k.stride(2), v.stride(2), mask == nullptr ? nullptr : mask + b * mask_batch_stride, mask_stride,
                   c * SLOTS_PER_CHUNK, std::min(slots, (c + 1) * SLOTS_PER_CHUNK), part, part + G, part + 2 * G);
    }
  });
  KV* Y = y.data_ptr<KV>();
  for (int64_t bh = 0; bh < B * H; ++bh) {  // merge the chunks: the softmax over all slots
    const float* first = partials + bh * chunks * G * (D + 2);
    for (int64_t g = 0; g < G; ++g) {
      float top = -INFINITY;
      for (int64_t c = 0; c < chunks; ++c) top = std::max(top, first[c * G * (D + 2) + g]);
      __m512 out[MAX_DIM / 16];
      for (int64_t j = 0; j < D / 16; ++j) out[j] = _mm512_setzero_ps();
      float total = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* part = first + c * G * (D + 2);
        if (part[g] == -INFINITY) continue;
        const float w = std::exp(part[g] - top);
        total += w * part[G + g];
        for (int64_t j = 0; j < D / 16; ++j) {
          out[j] = _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_loadu_ps(part + 2 * G + g * D + 16 * j), out[j]);
        }
      }
      const __m512 inverse = _mm512_set1_ps(total > 0.f ? 1.f / total : 0.f);  // (no slot at all: zeros)
      for (int64_t j = 0; j < D / 16; ++j) store16(Y + (bh * G + g) * D + 16 * j, _mm512_mul_ps(out[j], inverse));
    }
  }
}

// One decode step's attention per KV head: q (B, H, G, D), the G query rows of each of the B x H KV heads (the query
// heads that share it); k, v (B, H, T, D), the first T cache slots (any strides but the last); mask None or bool
// (B or 1, 1, 1, T), true where a slot may be attended. softmax(q k^T * scale) v, (B, H, G, D) in q's dtype; q, k and
// v float32 or bfloat16 (one dtype), computed in float32. The slots are split into chunks of 64 that the threads
// share (one sequence's 3 KV heads would keep only 3 tasks), merged at the end.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "decode_attention: q must be (B, H, G, D) and k, v (B, H, T, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "decode_attention: q, k and v must all be float32 or all bfloat16");
  const int64_t G = q.size(2), D = q.size(3), T = k.size(2);
  TORCH_CHECK(G >= 1 && G <= MAX_ROWS && D % 16 == 0 && D <= MAX_DIM && T >= 1,
              "decode_attention: at most ", MAX_ROWS, " query rows per head, a head size that is a multiple of 16 up "
              "to ", MAX_DIM, ", and at least one slot");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v rows must be contiguous");
  const bool* mask_data = nullptr;
  int64_t mask_batch_stride = 0, mask_stride = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && (m.size(0) == 1 || m.size(0) == q.size(0)) &&
                    m.size(1) == 1 && m.size(2) == 1 && m.size(3) == T,
                "decode_attention: mask must be bool (B or 1, 1, 1, T)");
    mask_data = m.data_ptr<bool>();
    mask_batch_stride = m.size(0) == 1 ? 0 : m.stride(0);
    mask_stride = m.stride(3);
  }
  const at::Tensor queries = q.contiguous();
  at::Tensor y = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.scalar_type() == at::kFloat) {
    decode_attention_impl<float>(queries, k, v, mask_data, mask_batch_stride, mask_stride, scale, y);
  } else {
    decode_attention_impl<at::BFloat16>(queries, k, v, mask_data, mask_batch_stride, mask_stride, scale, y);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(gpt4_kernels, lib) {
  lib.def("w4a8_matmul(Tensor x, Tensor blocks) -> Tensor");
  lib.def("w4a8_dequantize(Tensor blocks, ScalarType dtype) -> Tensor");
  lib.def("q8_matmul(Tensor x, Tensor blocks) -> Tensor");
  lib.def("q8_dequantize(Tensor blocks, ScalarType dtype) -> Tensor");
  lib.def("q8_rows(Tensor blocks, Tensor ids, ScalarType dtype) -> Tensor");
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt4_kernels, CPU, lib) {
  lib.impl("w4a8_matmul", &w4a8_matmul);
  lib.impl("w4a8_dequantize", &w4a8_dequantize);
  lib.impl("q8_matmul", &q8_matmul);
  lib.impl("q8_dequantize", &q8_dequantize);
  lib.impl("q8_rows", &q8_rows);
  lib.impl("decode_attention", &decode_attention);
}
