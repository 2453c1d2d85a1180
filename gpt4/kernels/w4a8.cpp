// w4a8: 4-bit weights (groups of 32 along the input, w = d * q + m, q in 0..15) times activations quantized to
// int8 in the same groups of 32, multiplied in integers, as llama.cpp multiplies its Q4 blocks by Q8 activations:
// with AVX-512 VNNI (vpdpbusd: 64 u8 x s8 products an instruction), or where the CPU lacks AVX-512, with AVX2
// (vpmaddubsw and vpmaddwd: 32 products in two instructions). Registered as gpt4_kernels::w4a8_matmul.
// q8: the same for 8-bit weights (w = d * q, q in -128..127, GGUF's Q8_0 groups: an LM head), gpt4_kernels::q8_matmul;
// q5 for GGUF's Q5_0 groups (w = d * (q - 16), q in 0..31), gpt4_kernels::q5_matmul; q5k for Q5_K's sub-blocks of 32
// (w = d * q + m), gpt4_kernels::q5k_matmul; q6 for Q6_K's, gpt4_kernels::q6_matmul.
// decode_attention: one decode step's attention over the KV cache, which w4a8 models use with them; prefill_attention
// a prompt chunk's.
// One source for both instruction sets: the kernels work on vectors of LANES floats or int32 (one register: 16 lanes
// with AVX-512, 8 with AVX2), and on a block's 16 rows in PARTS parts of LANES rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Vectors: Vf holds LANES floats, Vi LANES int32 (or 4 LANES bytes, 4 a lane).

// The sums of four 8-float vectors at once: in each 128-bit half, a pair of hadds leaves the half's four sums; the
// halves are then added (5 instructions for 4 sums, against 6 for one sum alone). Both ISAs' vsum4.
inline __m128 sums_of_4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
}

#if defined(__AVX512F__)
constexpr int LANES = 16;
using Vf = __m512;
using Vi = __m512i;

inline Vf vset(float v) { return _mm512_set1_ps(v); }
inline Vf vzero() { return _mm512_setzero_ps(); }
inline Vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vf v) { _mm512_storeu_ps(p, v); }
inline Vf vadd(Vf a, Vf b) { return _mm512_add_ps(a, b); }
inline Vf vsub(Vf a, Vf b) { return _mm512_sub_ps(a, b); }
inline Vf vmul(Vf a, Vf b) { return _mm512_mul_ps(a, b); }
inline Vf vdiv(Vf a, Vf b) { return _mm512_div_ps(a, b); }
inline Vf vmax(Vf a, Vf b) { return _mm512_max_ps(a, b); }
inline Vf vfmadd(Vf a, Vf b, Vf c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c
inline Vf vfnmadd(Vf a, Vf b, Vf c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline Vf vabs(Vf a) { return _mm512_abs_ps(a); }
inline float vsum(Vf a) { return _mm512_reduce_add_ps(a); }
inline __m256 vsum_halves(Vf a) {  // lanes i and i + 8 added
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}
inline __m128 vsum4(Vf a, Vf b, Vf c, Vf d) {  // the four vectors' sums
  return sums_of_4(vsum_halves(a), vsum_halves(b), vsum_halves(c), vsum_halves(d));
}
inline float vmaxval(Vf a) { return _mm512_reduce_max_ps(a); }
inline Vf vfloat(Vi a) { return _mm512_cvtepi32_ps(a); }
inline Vi vround_int(Vf a) { return _mm512_cvtps_epi32(a); }
inline Vf vround(Vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vf vselect_negative(Vf key, Vf if_negative, Vf otherwise) {  // per lane: key < 0 ? if_negative : otherwise
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(key, _mm512_setzero_ps(), _CMP_LT_OQ), otherwise, if_negative);
}
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }
inline Vf vload_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }  // others 0
inline Vf vkeep_first(Vf v, int64_t n) { return _mm512_maskz_mov_ps(first_lanes(n), v); }
inline void vstore_first(float* p, Vf v, int64_t n) { _mm512_mask_storeu_ps(p, first_lanes(n), v); }
// p * 2^n for whole numbers n; exp_nonpositive's last step
inline Vf vscale_pow2(Vf p, Vf n) { return _mm512_scalef_ps(p, n); }
constexpr float EXP_FLOOR = -104.f;  // exp_nonpositive is 0 below (under float's smallest subnormal)
inline Vf vzero_below_floor(Vf x, Vf e) { return e; }  // (scalef's result is 0 there already)
inline Vf vhalf(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void vstore(at::Half* out, Vf v) {  // rounded to nearest even, as PyTorch converts
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline Vf vbf16(const at::BFloat16* p) {  // bf16 is the top half of a float
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline Vi vnan_to(Vf v, Vi bits, int32_t nan_bits) {  // bits, or nan_bits in the lanes where v is NaN
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), bits, _mm512_set1_epi32(nan_bits));
}
inline void store_low_halves(at::BFloat16* out, Vi v) {  // the low 16 bits of each lane
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(v));
}

inline Vi iset32(int32_t v) { return _mm512_set1_epi32(v); }
inline Vi iset8(int8_t v) { return _mm512_set1_epi8(v); }
inline Vi izero() { return _mm512_setzero_si512(); }
inline Vi iload(const uint8_t* p) { return _mm512_loadu_si512(p); }  // 4 LANES bytes
inline Vi iand(Vi a, Vi b) { return _mm512_and_si512(a, b); }
inline Vi iadd32(Vi a, Vi b) { return _mm512_add_epi32(a, b); }
inline Vi isrl16(Vi a, int n) { return _mm512_srli_epi16(a, n); }
inline Vi isrl32(Vi a, int n) { return _mm512_srli_epi32(a, n); }
inline Vi isll32(Vi a, int n) { return _mm512_slli_epi32(a, n); }
inline Vf icast_float(Vi a) { return _mm512_castsi512_ps(a); }
inline Vi fcast_int(Vf a) { return _mm512_castps_si512(a); }
inline int32_t isum(Vi a) { return _mm512_reduce_add_epi32(a); }
// q + 2^to in the bytes whose byte of plane has bit `from` set.
inline Vi iadd_plane_bit(Vi q, Vi plane, int from, int to) {
  return _mm512_mask_add_epi8(q, _mm512_test_epi8_mask(plane, iset8(static_cast<int8_t>(1 << from))), q,
                              iset8(static_cast<int8_t>(1 << to)));
}
// acc + in each lane the sums of its byte products u x s over q[0..n-1]: q[j]'s unsigned weights (at most 63) times
// 4 signed activation bytes, xg[j], broadcast. (SUMS: the AVX2 version's.)
template <int SUMS>
inline Vi dot_bytes(Vi acc, const Vi* q, const int32_t* xg, int n) {
  for (int j = 0; j < n; ++j) acc = _mm512_dpbusd_epi32(acc, q[j], _mm512_set1_epi32(xg[j]));
  return acc;
}
// The same for any u in 0..255 (Q8Block's q + 128). WIDE_DOT_OFFSET: where it gives the sum of (u - 128) x s instead.
inline Vi dot4_wide(Vi acc, Vi u, Vi s) { return _mm512_dpbusd_epi32(acc, u, s); }
constexpr bool WIDE_DOT_OFFSET = false;
inline Vf vload(const int8_t* p) {  // LANES bytes as floats
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void store_int8(int8_t* out, Vi v) {  // LANES int32 in -128..127 as bytes
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(v));
}
inline int32_t sum16_int8(const int8_t* p) {
  return _mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#else  // AVX2, FMA and F16C
constexpr int LANES = 8;
using Vf = __m256;
using Vi = __m256i;

inline Vf vset(float v) { return _mm256_set1_ps(v); }
inline Vf vzero() { return _mm256_setzero_ps(); }
inline Vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vf v) { _mm256_storeu_ps(p, v); }
inline Vf vadd(Vf a, Vf b) { return _mm256_add_ps(a, b); }
inline Vf vsub(Vf a, Vf b) { return _mm256_sub_ps(a, b); }
inline Vf vmul(Vf a, Vf b) { return _mm256_mul_ps(a, b); }
inline Vf vdiv(Vf a, Vf b) { return _mm256_div_ps(a, b); }
inline Vf vmax(Vf a, Vf b) { return _mm256_max_ps(a, b); }
inline Vf vfmadd(Vf a, Vf b, Vf c) { return _mm256_fmadd_ps(a, b, c); }
inline Vf vfnmadd(Vf a, Vf b, Vf c) { return _mm256_fnmadd_ps(a, b, c); }
inline Vf vabs(Vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
inline float vsum(Vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline __m128 vsum4(Vf a, Vf b, Vf c, Vf d) { return sums_of_4(a, b, c, d); }  // the four vectors' sums
inline float vmaxval(Vf a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline Vf vfloat(Vi a) { return _mm256_cvtepi32_ps(a); }
inline Vi vround_int(Vf a) { return _mm256_cvtps_epi32(a); }
inline Vf vround(Vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vf vselect_negative(Vf key, Vf if_negative, Vf otherwise) {  // (blendv reads the sign bit: -0 takes
  return _mm256_blendv_ps(otherwise, if_negative, key);            // if_negative, where exp_nonpositive's callers
}                                                                    // get the same value either way)
inline Vi first_lanes(int64_t n) {  // all bits set in lanes 0..n-1
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Vf vload_first(const float* p, int64_t n) { return _mm256_maskload_ps(p, first_lanes(n)); }
inline Vf vkeep_first(Vf v, int64_t n) { return _mm256_and_ps(v, _mm256_castsi256_ps(first_lanes(n))); }
inline void vstore_first(float* p, Vf v, int64_t n) { _mm256_maskstore_ps(p, first_lanes(n), v); }
// 2^n built in the exponent bits, which hold n >= -126: exp_nonpositive stops at EXP_FLOOR and gives 0 below it.
inline Vf vscale_pow2(Vf p, Vf n) {
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}
constexpr float EXP_FLOOR = -87.f;  // e^-87 > 2^-126, float's smallest normal number
inline Vf vzero_below_floor(Vf x, Vf e) { return _mm256_and_ps(e, _mm256_cmp_ps(x, vset(EXP_FLOOR), _CMP_GE_OQ)); }
inline Vf vhalf(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void vstore(at::Half* out, Vf v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline Vf vbf16(const at::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline Vi vnan_to(Vf v, Vi bits, int32_t nan_bits) {
  return _mm256_blendv_epi8(bits, _mm256_set1_epi32(nan_bits), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
inline void store_low_halves(at::BFloat16* out, Vi v) {  // (lanes hold 0..65535: packus keeps them as they are)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}

inline Vi iset32(int32_t v) { return _mm256_set1_epi32(v); }
inline Vi iset8(int8_t v) { return _mm256_set1_epi8(v); }
inline Vi izero() { return _mm256_setzero_si256(); }
inline Vi iload(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline Vi iand(Vi a, Vi b) { return _mm256_and_si256(a, b); }
inline Vi iadd32(Vi a, Vi b) { return _mm256_add_epi32(a, b); }
inline Vi isrl16(Vi a, int n) { return _mm256_srli_epi16(a, n); }
inline Vi isrl32(Vi a, int n) { return _mm256_srli_epi32(a, n); }
inline Vi isll32(Vi a, int n) { return _mm256_slli_epi32(a, n); }
inline Vf icast_float(Vi a) { return _mm256_castsi256_ps(a); }
inline Vi fcast_int(Vf a) { return _mm256_castps_si256(a); }
inline int32_t isum(Vi a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}
inline Vi iadd_plane_bit(Vi q, Vi plane, int from, int to) {  // (the bit moved to its place: 3 instructions)
  // A shift of the 16-bit lanes by to - from puts each byte's bit `from` on its bit `to` (it carries other bits across
  // the bytes' boundary too, which the and drops).
  const __m256i moved = from < to ? _mm256_slli_epi16(plane, to - from) : _mm256_srli_epi16(plane, from - to);
  return _mm256_add_epi8(q, _mm256_and_si256(moved, iset8(static_cast<int8_t>(1 << to))));
}
// vpmaddubsw sums pairs of u x s in int16 with saturation, exact for u <= 127 (2 x 127 x 127 < 2^15); SUMS of its
// results are added in int16 before each widening (vpmaddwd): as many as int16 holds for the block's largest u
// (4-bit weights: 8 x 2 x 15 x 127 < 2^15).
template <int SUMS>
inline Vi dot_bytes(Vi acc, const Vi* q, const int32_t* xg, int n) {
  for (int j = 0; j < n; j += SUMS) {
    __m256i pairs = _mm256_maddubs_epi16(q[j], _mm256_set1_epi32(xg[j]));
    for (int k = 1; k < SUMS; ++k) {
      pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(q[j + k], _mm256_set1_epi32(xg[j + k])));
    }
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  return acc;
}
// u in 0..255 as the signed u - 128 (the sign moved onto s: |u - 128| <= 128 keeps the pairs exact).
inline Vi dot4_wide(Vi acc, Vi u, Vi s) {
  const __m256i q = _mm256_xor_si256(u, _mm256_set1_epi8(static_cast<char>(0x80)));
  return _mm256_add_epi32(
      acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(s, q)), _mm256_set1_epi16(1)));
}
constexpr bool WIDE_DOT_OFFSET = true;
inline Vf vload(const int8_t* p) {  // LANES bytes as floats
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void store_int8(int8_t* out, Vi v) {
  const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packs_epi16(words, words));
}
inline int32_t sum16_int8(const int8_t* p) {  // (8-byte loads: nothing read past p + 15)
  return isum(_mm256_add_epi32(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))),
                               _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)))));
}
#endif
constexpr int PARTS = 16 / LANES;  // a block's 16 rows in parts of LANES rows
constexpr int PART_BYTES = 4 * LANES;  // a part's bytes in each 64-byte chunk and in a bit plane

inline Vf vload(const at::BFloat16* p) { return vbf16(p); }
inline Vf vload(const at::Half* p) { return vhalf(reinterpret_cast<const uint8_t*>(p)); }

// ---------------------------------------------------------------------------------------------------------------
// The block formats, each 16 output rows x 32 inputs. unpack(w, part, ...): q[j], lane r: row (LANES part + r)'s
// weights 4j..4j+3 of the group as unsigned bytes u, and w = d * u + m for each row.

// The part's rows in a block's first 256 bytes, 4 chunks of 64 nibble pairs (see w4a8_matmul), as q[0..7].
inline void unpack_nibbles(const uint8_t* w, int part, Vi q[8]) {
  const Vi low = iset8(0x0F);
  for (int c = 0; c < 4; ++c) {
    const Vi v = iload(w + 64 * c + PART_BYTES * part);
    q[c] = iand(v, low);
    q[c + 4] = iand(isrl16(v, 4), low);
  }
}

// Adds 2^to to q[j]'s byte 4r + i where bit j of the bit plane at w + start's byte 4r + i is set (64 bytes: row r's
// input 4j + i, the same place in q[j]).
inline void add_plane(const uint8_t* w, int start, int part, Vi q[8], int to) {
  const Vi plane = iload(w + start + PART_BYTES * part);
  for (int j = 0; j < 8; ++j) q[j] = iadd_plane_bit(q[j], plane, j, to);
}

// The part's rows' values of the 16 fp16 ones at w + start.
inline Vf part_halves(const uint8_t* w, int start, int part) { return vhalf(w + start + 2 * LANES * part); }

struct Q4Block {  // 256 bytes of nibbles, 16 fp16 d, 16 fp16 m
  static constexpr int64_t BYTES = 320;
  static constexpr bool HALVES = false;  // (one d and m a group; see Q6Block)
  static constexpr bool WIDE = false;    // (u at most 63; see Q8Block)
  static constexpr int SUMS = 8;         // dot_bytes' int16 sums: u at most 15
  static constexpr int64_t UNPACK_TILES = 16;  // (see UnpackedGroup)
  static void unpack(const uint8_t* w, int part, Vi q[8], Vf& dv, Vf& mv) {
    unpack_nibbles(w, part, q);
    dv = part_halves(w, 256, part);
    mv = part_halves(w, 288, part);
  }
};

struct Q5Block {  // GGUF's Q5_0: 256 bytes of low nibbles as Q4Block's, a plane of fifth bits, 16 fp16 d
  static constexpr int64_t BYTES = 352;
  static constexpr bool HALVES = false;
  static constexpr bool WIDE = false;
  static constexpr int SUMS = 4;  // u at most 31
  static constexpr int64_t UNPACK_TILES = 4;
  static void unpack(const uint8_t* w, int part, Vi q[8], Vf& dv, Vf& mv) {
    unpack_nibbles(w, part, q);
    add_plane(w, 256, part, q, 4);  // the fifth bits
    dv = part_halves(w, 320, part);
    mv = vmul(dv, vset(-16.f));  // w = d * (u - 16)
  }
};

struct Q5MBlock {  // GGUF's Q5_K sub-blocks: Q5Block's bytes, then 16 fp16 m: w = d * q + m
  static constexpr int64_t BYTES = 384;
  static constexpr bool HALVES = false;
  static constexpr bool WIDE = false;
  static constexpr int SUMS = 4;
  static constexpr int64_t UNPACK_TILES = 4;
  static void unpack(const uint8_t* w, int part, Vi q[8], Vf& dv, Vf& mv) {
    Q5Block::unpack(w, part, q, dv, mv);
    mv = part_halves(w, 352, part);
  }
};

// GGUF's Q6_K in groups of 32, each two of its sub-blocks of 16: 256 bytes of low nibbles as Q4Block's, a plane of the
// fifth bits and one of the sixth (the kernel adds 16 and 32 under them), then the 16 rows' d for inputs 0..15 of the
// group and their d for inputs 16..31 (fp16): w = d * (q - 32), q in 0..63. unpack gives the two d as dv and mv.
struct Q6Block {
  static constexpr int64_t BYTES = 448;
  static constexpr bool HALVES = true;
  static constexpr bool WIDE = false;
  static constexpr int SUMS = 2;  // u at most 63
  static constexpr int64_t UNPACK_TILES = 2;
  static void unpack(const uint8_t* w, int part, Vi q[8], Vf& dv, Vf& mv) {
    unpack_nibbles(w, part, q);
    add_plane(w, 256, part, q, 4);
    add_plane(w, 320, part, q, 5);
    dv = part_halves(w, 384, part);
    mv = part_halves(w, 416, part);
  }
};

struct Q8Block {  // 512 bytes u = q + 128, 16 fp16 d: w = d * (u - 128)
  static constexpr int64_t BYTES = 544;
  static constexpr bool HALVES = false;
  static constexpr bool WIDE = true;  // u up to 255: dot4_wide
  static constexpr int SUMS = 1;
  static constexpr int64_t UNPACK_TILES = 0;  // never: its unpacking is its loads
  static void unpack(const uint8_t* w, int part, Vi q[8], Vf& dv, Vf& mv) {
    for (int j = 0; j < 8; ++j) q[j] = iload(w + 64 * j + PART_BYTES * part);
    dv = part_halves(w, 512, part);
    mv = vmul(dv, vset(-128.f));
  }
};

// LANES floats rounded to bfloat16, in the low halves of 32-bit lanes: to nearest even, as PyTorch converts (NaN stays
// NaN); written without AVX512-BF16, which VNNI CPUs before Cooper Lake lack.
inline Vi bf16_bits(Vf v) {
  const Vi bits = fcast_int(v);
  const Vi odd = iand(isrl32(bits, 16), iset32(1));
  const Vi rounded = isrl32(iadd32(bits, iadd32(odd, iset32(0x7FFF))), 16);
  return vnan_to(v, rounded, 0x7FC0);
}

inline void vstore(at::BFloat16* out, Vf v) { store_low_halves(out, bf16_bits(v)); }

// v as a tensor of T holds it: what PyTorch's eager operators round each result to.
template <typename T>
inline Vf held_as(Vf v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return icast_float(isll32(bf16_bits(v), 16));
  }
}

// Each row of x (T, K) in groups of 32: q = round(x / s), s = max|x| / 127, the sum of q, and s times it (the term a
// group's weight offset m multiplies).
template <typename T>
void quantize_groups(const T* x, int64_t count, int8_t* xq, float* scale, float* scaled_sum, int32_t* sum) {
  constexpr int V = 32 / LANES;
  for (int64_t i = 0; i < count; ++i) {
    Vf a[V];
    Vf top = vzero();
    for (int v = 0; v < V; ++v) {
      a[v] = vload(x + i * 32 + v * LANES);
      top = vmax(top, vabs(a[v]));
    }
    const float amax = vmaxval(top);
    const Vf inv = vset(amax > 0 ? 127.f / amax : 0.f);
    Vi total = izero();
    for (int v = 0; v < V; ++v) {
      const Vi q = vround_int(vmul(a[v], inv));
      store_int8(xq + i * 32 + v * LANES, q);
      total = iadd32(total, q);
    }
    scale[i] = amax / 127.f;
    sum[i] = isum(total);
    scaled_sum[i] = scale[i] * static_cast<float>(sum[i]);
  }
}

// A matmul's activations quantized by quantize_groups: rows of G groups of 32 int8, each group's scale, scale x sum,
// sum and (HALVES blocks) its halves' sums.
struct QuantizedRows {
  const int8_t* q;
  const float *scale, *scaled_sum;
  const int32_t *sum, *half_sums;
  int64_t G;
};

constexpr int TILE = LANES == 16 ? 8 : 4;  // token rows sharing one unpacking of the weights (in registers)

// How far ahead, in groups, a block row's first pass (part 0 of the first tile) asks for the lines it will read: the
// hardware prefetchers alone left one-row decoding at ~0.8 of a plain read's pace on the AVX2 EPYC; these requests
// made the default model's one-row decoding 1.06-1.11x faster and 8 rows' 1.06-1.08x (docs/performance.md, run 28).
// Whole block rows ahead (earlier sessions) were slower.
constexpr int64_t PREFETCH_GROUPS = 8;
template <typename Block>
struct Unpacked;
template <typename Block>
constexpr bool streamed = true;  // blocks read from the model's weights, not from an unpacked copy in L1
template <typename Block>
constexpr bool streamed<Unpacked<Block>> = false;

// ROWS token rows from t0 times one part of a row of blocks, written to out (row t at out + t N). ROWS is a constant
// so that the accumulators stay in registers: in memory, each group's additions to them would wait for the last
// group's stores (a single row's chain of store, reload and two multiply-adds bounded its speed).
template <typename Block, int ROWS, typename T>
inline void tile(const QuantizedRows& a, int64_t t0, const uint8_t* block_row, int part, T* out, int64_t N) {
  Vf acc[ROWS], offsets[ROWS];  // the m terms (Q6: the second half's) in sums of their own: two shorter chains
  for (int t = 0; t < ROWS; ++t) acc[t] = offsets[t] = vzero();
  const bool first_pass = streamed<Block> && part == 0 && t0 == 0;
  for (int64_t g = 0; g < a.G; ++g) {
    if (first_pass) {  // (past the tensor's end near its last rows: a prefetch never faults)
      const char* ahead = reinterpret_cast<const char*>(block_row + (g + PREFETCH_GROUPS) * Block::BYTES);
      for (int64_t line = 0; line < Block::BYTES; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    }
    Vi q[8];
    Vf dv, mv;
    Block::unpack(block_row + g * Block::BYTES, part, q, dv, mv);
    for (int t = 0; t < ROWS; ++t) {
      const int64_t i = (t0 + t) * a.G + g;
      const int32_t* xg = reinterpret_cast<const int32_t*>(a.q + i * 32);
      const Vf s = vset(a.scale[i]);
      if constexpr (Block::HALVES) {  // each half's own d: d * sum (q - 32) x = d * (dot - 32 sum x), exactly
        Vi lo = iset32(-32 * a.half_sums[2 * i]), hi = iset32(-32 * a.half_sums[2 * i + 1]);
        lo = dot_bytes<Block::SUMS>(lo, q, xg, 4);
        hi = dot_bytes<Block::SUMS>(hi, q + 4, xg + 4, 4);
        acc[t] = vfmadd(vmul(vfloat(lo), dv), s, acc[t]);
        offsets[t] = vfmadd(vmul(vfloat(hi), mv), s, offsets[t]);
      } else {
        Vi dot;
        if constexpr (Block::WIDE) {
          dot = iset32(WIDE_DOT_OFFSET ? 128 * a.sum[i] : 0);  // sum u x = sum (u - 128) x + 128 sum x
          for (int j = 0; j < 8; ++j) dot = dot4_wide(dot, q[j], iset32(xg[j]));
        } else {
          dot = dot_bytes<Block::SUMS>(izero(), q, xg, 8);
        }
        acc[t] = vfmadd(vmul(vfloat(dot), dv), s, acc[t]);
        offsets[t] = vfmadd(mv, vset(a.scaled_sum[i]), offsets[t]);
      }
    }
  }
  for (int t = 0; t < ROWS; ++t) vstore(out + (t0 + t) * N, vadd(acc[t], offsets[t]));
}

// One group of a block row's part as Block::unpack gives it, stored. From Block::UNPACK_TILES tiles of rows on, matmul
// unpacks each part's groups once into these and its tiles read them back (from L1) instead of each unpacking them
// again: on the AVX2 EPYC (bench_kernels.py, 3072 x 576) Q6 blocks 1.15x faster at 8 rows and 1.37x at 64 and 256,
// Q5 1.1x at 16 and 1.2x at 128, Q4 1.05x at 64 and 1.07x at 256 (at 8 rows up to 5% slower), Q8 no faster.
struct UnpackedGroup {
  Vi q[8];
  Vf dv, mv;
};

template <typename Block>
struct Unpacked {  // a Block whose groups are UnpackedGroups (part: 0, the one part unpacked)
  static constexpr int64_t BYTES = sizeof(UnpackedGroup);
  static constexpr bool HALVES = Block::HALVES;
  static constexpr bool WIDE = Block::WIDE;
  static constexpr int SUMS = Block::SUMS;
  static void unpack(const uint8_t* w, int, Vi q[8], Vf& dv, Vf& mv) {
    const UnpackedGroup& group = *reinterpret_cast<const UnpackedGroup*>(w);
    for (int j = 0; j < 8; ++j) q[j] = group.q[j];
    dv = group.dv;
    mv = group.mv;
  }
};

// rows_total token rows from t0 on in tiles of TILE (then 4 with AVX-512, 2, 1) times one part of a block row.
template <typename Block, typename T>
inline void tiles(const QuantizedRows& a, int64_t rows_total, const uint8_t* block_row, int part, T* out, int64_t N) {
  int64_t t = 0;
  for (; t + TILE <= rows_total; t += TILE) tile<Block, TILE>(a, t, block_row, part, out, N);
  if constexpr (TILE > 4) {
    if (rows_total - t >= 4) tile<Block, 4>(a, t, block_row, part, out, N), t += 4;
  }
  if (rows_total - t >= 2) tile<Block, 2>(a, t, block_row, part, out, N), t += 2;
  if (rows_total - t >= 1) tile<Block, 1>(a, t, block_row, part, out, N);
}

template <typename Block, typename T>
void matmul(const T* x, int64_t rows_total, int64_t K, const uint8_t* blocks, int64_t N, T* y) {
  const int64_t G = K / 32;
  // The quantized activations, reused from call to call: a decode step makes 120 of these calls.
  thread_local std::vector<int8_t> xq_buffer;
  thread_local std::vector<float> scale_buffer;
  thread_local std::vector<int32_t> sums;  // each group's sum of q, then (HALVES blocks) its two sums of 16
  xq_buffer.resize(rows_total * K);
  scale_buffer.resize(2 * rows_total * G);
  sums.resize(3 * rows_total * G);
  int8_t* XQ = xq_buffer.data();
  float *S = scale_buffer.data(), *SS = S + rows_total * G;
  int32_t *GS = sums.data(), *HS = GS + rows_total * G;
  // A prompt chunk's rows are quantized by every thread (a decode step's few on the caller's: below the grain).
  at::parallel_for(0, rows_total * G, 2048, [&](int64_t begin, int64_t end) {
    quantize_groups(x + begin * 32, end - begin, XQ + begin * 32, S + begin, SS + begin, GS + begin);
  });
  if constexpr (Block::HALVES) {
    for (int64_t h = 0; h < 2 * rows_total * G; ++h) HS[h] = sum16_int8(XQ + 16 * h);
  }
  const QuantizedRows a{XQ, S, SS, GS, HS, G};
  at::parallel_for(0, N / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* block_row = blocks + b * G * Block::BYTES;
      for (int part = 0; part < PARTS; ++part) {
        T* out = y + b * 16 + part * LANES;
        if constexpr (Block::UNPACK_TILES > 0) {
          if (rows_total >= Block::UNPACK_TILES * TILE) {
            thread_local std::vector<UnpackedGroup> unpacked;
            unpacked.resize(G);
            for (int64_t g = 0; g < G; ++g) {
              Block::unpack(block_row + g * Block::BYTES, part, unpacked[g].q, unpacked[g].dv, unpacked[g].mv);
            }
            tiles<Unpacked<Block>>(a, rows_total, reinterpret_cast<const uint8_t*>(unpacked.data()), 0, out, N);
            continue;
          }
        }
        tiles<Block>(a, rows_total, block_row, part, out, N);
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

// The same with blocks (N/16, K/32, 352), GGUF's Q5_0 groups: bytes 0..255 as w4a8's (the low 4 bits), bytes 256..319
// a bit plane, byte 4r + i's bit j the fifth bit of row r's input 32g + 4j + i; bytes 320..351 d of the 16 rows
// (float16). w = d * (q - 16), q in 0..31.
at::Tensor q5_matmul(const at::Tensor& x, const at::Tensor& blocks) {
  return blocks_matmul<Q5Block>(x, blocks, "q5_matmul");
}

// The same with blocks (N/16, K/32, 384): bytes 0..351 as q5's, then m of the 16 rows (float16). w = d * q + m, q in
// 0..31 (GGUF's Q5_K: d = its d times a sub-block's scale, m = -dmin times its min).
at::Tensor q5k_matmul(const at::Tensor& x, const at::Tensor& blocks) {
  return blocks_matmul<Q5MBlock>(x, blocks, "q5k_matmul");
}

// The same with blocks (N/16, K/32, 448), GGUF's Q6_K (see Q6Block). w = d * (q - 32), q in 0..63, each half group's d.
at::Tensor q6_matmul(const at::Tensor& x, const at::Tensor& blocks) {
  return blocks_matmul<Q6Block>(x, blocks, "q6_matmul");
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
    const Vi byte = iset32(0xFF);
    for (int64_t bg = begin; bg < end; ++bg) {  // block b, group g
      const int64_t b = bg / G, g = bg % G;
      for (int part = 0; part < PARTS; ++part) {
        Vi q[8];
        Vf dv, mv;
        Block::unpack(blocks + bg * Block::BYTES, part, q, dv, mv);
        for (int j = 0; j < 8; ++j) {
          Vf scale = dv, offset = mv;
          if constexpr (Block::HALVES) {  // w = d * (q - 32), d of the group's half
            scale = j < 4 ? dv : mv;
            offset = vmul(scale, vset(-32.f));
          }
          for (int i = 0; i < 4; ++i) {  // input 32 g + 4 j + i: the part's rows' values, one per lane
            const Vi u = iand(isrl32(q[j], 8 * i), byte);
            vstore(w_t + (32 * g + 4 * j + i) * N + 16 * b + LANES * part, vfmadd(vfloat(u), scale, offset));
          }
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

at::Tensor q5_dequantize(const at::Tensor& blocks, at::ScalarType dtype) {
  return blocks_dequantize<Q5Block>(blocks, dtype, "q5_dequantize");
}

at::Tensor q5k_dequantize(const at::Tensor& blocks, at::ScalarType dtype) {
  return blocks_dequantize<Q5MBlock>(blocks, dtype, "q5k_dequantize");
}

at::Tensor q6_dequantize(const at::Tensor& blocks, at::ScalarType dtype) {
  return blocks_dequantize<Q6Block>(blocks, dtype, "q6_dequantize");
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

// exp(x) for LANES floats x <= 0 (scores minus their maximum): x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor
// polynomial of degree 7 (error below 1e-8 there), times 2^n; 0 below EXP_FLOOR (where e^x is under 2^-125).
inline Vf exp_nonpositive(Vf x) {
  const Vf clamped = vmax(x, vset(EXP_FLOOR));
  const Vf n = vround(vmul(clamped, vset(1.4426950408889634f)));
  Vf r = vfnmadd(n, vset(0.693145751953125f), clamped);  // ln2 in two parts: r exact enough
  r = vfnmadd(n, vset(1.4286068203094173e-06f), r);
  Vf p = vset(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = vfmadd(p, r, vset(c));
  return vzero_below_floor(x, vscale_pow2(p, n));
}

// An int8 KV cache (`--kv-dtype int8`, as llama.cpp's q8_0 cache): each slot's row of a head holds D int8 values q,
// then a float32 scale s for each group of 32 of them, x = s q (s = max|x| / 127 over the group, as the activations'
// groups): 72 bytes for D = 64, against float16's 128. (One scale for a key's 64 values cost 0.28% of perplexity
// over 4096 tokens, groups of 32 0.08%: keys have a few large channels; Qwen2.5's key biases make them large enough
// that groups of 32 cost 2.2%, docs/performance.md, run 32.) The kernels take such caches as int8 tensors
// (B, H, T, D + D / 8) and read a row's values through slot_values; store_slot writes a row.
constexpr int64_t SLOT_GROUP = 32;
static_assert(SLOT_GROUP % LANES == 0, "a vector's values share one scale");

template <typename KV>
constexpr int64_t slot_row_size(int64_t D) {  // a slot's row, in KVs: D values, and an int8 row's scales
  return std::is_same_v<KV, int8_t> ? D + D / SLOT_GROUP * static_cast<int64_t>(sizeof(float)) : D;
}

template <typename KV>
inline Vf slot_values(const KV* row, int64_t d, int64_t D) {  // a slot's values d..d + LANES - 1 as floats
  if constexpr (std::is_same_v<KV, int8_t>) {
    float scale;
    std::memcpy(&scale, row + D + d / SLOT_GROUP * static_cast<int64_t>(sizeof(float)), sizeof scale);
    return vmul(vload(row + d), vset(scale));
  } else {
    return vload(row + d);
  }
}

// The head size of a cache tensor (B, H, T, row) in a dtype the kernels take.
int64_t cache_head_size(const at::Tensor& cache) {
  constexpr int64_t scale_bytes = sizeof(float);
  return cache.scalar_type() == at::kChar ? cache.size(3) * SLOT_GROUP / (SLOT_GROUP + scale_bytes) : cache.size(3);
}

constexpr int64_t SLOTS_PER_CHUNK = 64;  // cache slots a task attends to (partial softmax, merged afterwards)
constexpr int64_t MAX_ROWS = 16, MAX_DIM = 256;

// One task: G query rows (q, float32, scaled) of one KV head over slots start..stop-1. Writes the rows' maxima of
// the scores, their sums of exp(score - max), and (G, D) sums of exp(score - max) * v over the unmasked slots.
// Both products run in register tiles of up to 3 query rows, so that a key's or a value's vectors are loaded (and a
// half or bf16 cache's converted) once for 3 rows rather than once a row: scores 3 rows x 4 keys (their sums
// reduced 4 at a time by vsum4), weighted values 3 rows x 4 vectors of D. Against one row and one key at a time,
// the default model's 30 layers (fp16 cache, 3 KV heads of 3 rows) in one process, alternating: 1.13x over 512
// slots in cache, no faster from memory; with the values' prefetch (below) 1.05-1.14x over 512 slots and 1.16-1.20x
// over 4096 (docs/performance.md, run 31).
template <typename KV, int ROWS>
inline void slot_score_tile(const float* q, int64_t D, const KV* const key[4], float* const out[ROWS]) {
  Vf acc[ROWS][4];
  for (int g = 0; g < ROWS; ++g) {
    for (int i = 0; i < 4; ++i) acc[g][i] = vzero();
  }
  for (int64_t j = 0; j < D; j += LANES) {
    // A key at a time, 12 sums, the ROWS query vectors and the key in 16 registers: with the 4 keys held and a query
    // vector loaded a row, a 17th spilled one sum to the stack, whose store and reload every iteration chained the
    // loop (1.08x over 4096 slots, 1.14x over 512 in cache, with the maxima below taken in vectors).
    for (int i = 0; i < 4; ++i) {
      const Vf k = slot_values(key[i], j, D);
      for (int g = 0; g < ROWS; ++g) acc[g][i] = vfmadd(vload(q + g * D + j), k, acc[g][i]);
    }
  }
  for (int g = 0; g < ROWS; ++g) _mm_storeu_ps(out[g], vsum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]));
}

// out[g][j] (VECTORS vectors of D from j0 on, for ROWS rows) = sum over the n slots of weight[g][i] * value_i. (Each
// value vector is loaded once and used for the ROWS rows; prefill_attention's value_tile, with more rows than vectors,
// holds the vectors and broadcasts each row's weight instead.)
template <typename KV, int ROWS, int VECTORS>
inline void slot_value_tile(const float* const weight[ROWS], const KV* v, int64_t v_stride, int64_t n, int64_t D,
                            int64_t j0, float* const out[ROWS]) {
  Vf acc[ROWS][VECTORS];
  for (int g = 0; g < ROWS; ++g) {
    for (int j = 0; j < VECTORS; ++j) acc[g][j] = vzero();
  }
  for (int64_t i = 0; i < n; ++i) {
    Vf w[ROWS];
    for (int g = 0; g < ROWS; ++g) w[g] = vset(weight[g][i]);  // 0 for a masked slot
    for (int j = 0; j < VECTORS; ++j) {
      const Vf value = slot_values(v + i * v_stride, j0 + LANES * j, D);
      for (int g = 0; g < ROWS; ++g) acc[g][j] = vfmadd(w[g], value, acc[g][j]);
    }
  }
  for (int g = 0; g < ROWS; ++g) {
    for (int j = 0; j < VECTORS; ++j) vstore(out[g] + j0 + LANES * j, acc[g][j]);
  }
}

// f(R) for R = rows, 1 to 3, as a type (std::integral_constant): a tile's rows, a constant.
template <typename F>
inline void with_rows(int64_t rows, const F& f) {
  if (rows == 3) {
    f(std::integral_constant<int, 3>{});
  } else if (rows == 2) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

template <typename KV>
void attend_chunk(const float* q, int64_t G, int64_t D, const KV* k, const KV* v, int64_t k_stride, int64_t v_stride,
                  const bool* mask, int64_t mask_stride, int64_t start, int64_t stop, float* max, float* sum,
                  float* acc) {
  const int64_t n = stop - start;
  // (4 columns to spare: a tile of 4 keys stores 4 scores, past n in the last one)
  alignas(64) float scores[MAX_ROWS][SLOTS_PER_CHUNK + 4];
  for (int64_t i = 0; i < n; i += 4) {
    const int64_t end = std::min(i + 4, n);
    bool visible[4] = {true, true, true, true};
    if (mask != nullptr) {
      for (int64_t slot = i; slot < end; ++slot) visible[slot - i] = mask[(start + slot) * mask_stride];
    }
    if (std::any_of(visible, visible + (end - i), [](bool seen) { return seen; })) {  // (else nothing to score)
      const KV* key[4];  // past the chunk's last slot, its last key again (scores beyond n are never read)
      for (int c = 0; c < 4; ++c) key[c] = k + (start + std::min(i + c, n - 1)) * k_stride;
      // The keys 16 slots on are asked for now (past the chunk: the next one's, this thread's next task as a rule;
      // over 4096 slots 1.07-1.08x), and the values of these slots, while the scores are computed, so that they
      // arrive alongside the keys instead of after them (over 512 / 4096 slots read from memory, the tiles alone ran
      // 0.99x / 1.04-1.06x the previous kernel's pace, with this 1.08-1.14x / 1.16-1.20x).
      const auto request = [D](const KV* slot_row) {  // a slot's row into L1 (past the cache's end: dropped, no fault)
        const char* row = reinterpret_cast<const char*>(slot_row);
        for (int64_t line = 0; line < slot_row_size<KV>(D) * static_cast<int64_t>(sizeof(KV)); line += 64) {
          _mm_prefetch(row + line, _MM_HINT_T0);
        }
      };
      for (int64_t slot = i; slot < i + 4; ++slot) request(k + (start + slot + 16) * k_stride);
      for (int64_t slot = i; slot < end; ++slot) request(v + (start + slot) * v_stride);
      for (int64_t g0 = 0; g0 < G; g0 += 3) {
        with_rows(std::min<int64_t>(3, G - g0), [&](auto rows) {
          constexpr int R = decltype(rows)::value;
          float* out[R];
          for (int g = 0; g < R; ++g) out[g] = scores[g0 + g] + i;
          slot_score_tile<KV, R>(q + g0 * D, D, key, out);
        });
      }
    }
    for (int64_t slot = i; slot < end; ++slot) {  // a masked slot's score: -inf (weight 0)
      if (!visible[slot - i]) {
        for (int64_t g = 0; g < G; ++g) scores[g][slot] = -INFINITY;
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {  // the softmax's weights in place of the scores
    Vf tops = vset(-INFINITY);  // (one scalar max after another: a chain of n dependent instructions)
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) tops = vmax(tops, vload(scores[g] + i));
    float top = vmaxval(tops);
    for (; i < n; ++i) top = std::max(top, scores[g][i]);
    max[g] = top;
    Vf total = vzero();
    if (top == -INFINITY) {  // every slot of the chunk is masked: every weight 0
      std::fill_n(scores[g], n, 0.f);
    } else {
      for (int64_t i = 0; i < n; i += LANES) {
        const Vf s = vload_first(scores[g] + i, n - i);
        const Vf e = vkeep_first(exp_nonpositive(vsub(s, vset(top))), n - i);
        vstore_first(scores[g] + i, e, n - i);
        total = vadd(total, e);
      }
    }
    sum[g] = vsum(total);
  }
  const int64_t vectors = D / LANES;
  for (int64_t g0 = 0; g0 < G; g0 += 3) {
    with_rows(std::min<int64_t>(3, G - g0), [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      const float* weight[R];
      float* out[R];
      for (int g = 0; g < R; ++g) weight[g] = scores[g0 + g], out[g] = acc + (g0 + g) * D;
      int64_t j = 0;  // (the chunk's values, 8 KB for D = 64 in fp16, stay in L1 from one tile to the next)
      const KV* chunk_values = v + start * v_stride;
      for (; j + 4 <= vectors; j += 4) slot_value_tile<KV, R, 4>(weight, chunk_values, v_stride, n, D, LANES * j, out);
      for (; j + 2 <= vectors; j += 2) slot_value_tile<KV, R, 2>(weight, chunk_values, v_stride, n, D, LANES * j, out);
      for (; j < vectors; ++j) slot_value_tile<KV, R, 1>(weight, chunk_values, v_stride, n, D, LANES * j, out);
    });
  }
}

// The queries and results of attention over a cache of KV: float32 over a float16 or int8 cache (its keys and values
// rounded for fewer bytes, the queries not), else KV, as the eager step's q.to(k.dtype).
template <typename KV>
using Query = std::conditional_t<std::is_same_v<KV, at::Half> || std::is_same_v<KV, int8_t>, float, KV>;

// One decode step's attention (see decode_attention): the tensors as pointers and strides (in elements).
template <typename KV>
struct AttentionArgs {
  int64_t B, H, G, D, slots;
  const Query<KV>* q;                            // (B, H, G, D) contiguous
  const KV *k, *v;                               // (B, H, slots, D), rows contiguous
  int64_t k_batch, k_head, k_slot, v_batch, v_head, v_slot;
  const bool* mask;                              // nullptr, or one row of slots per batch row
  int64_t mask_batch, mask_slot;
  float scale;
  Query<KV>* y;                                  // (B, H, G, D) contiguous
};

template <typename KV>
void decode_attention_impl(const AttentionArgs<KV>& a) {
  const int64_t B = a.B, H = a.H, G = a.G, D = a.D, slots = a.slots;
  const int64_t chunks = (slots + SLOTS_PER_CHUNK - 1) / SLOTS_PER_CHUNK, tasks = B * H * chunks;
  // Each task's maxima (G), sums (G) and weighted values (G x D), uninitialized: every task writes all of its own.
  thread_local std::vector<float> partial_buffer;
  partial_buffer.resize(tasks * G * (D + 2));
  float* partials = partial_buffer.data();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    float queries[MAX_ROWS * MAX_DIM];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks, c = task % chunks, b = bh / H, h = bh % H;
      for (int64_t e = 0; e < G * D; e += LANES) {  // the KV head's query rows in float32, scaled once
        vstore(queries + e, vmul(vload(a.q + bh * G * D + e), vset(a.scale)));
      }
      float* part = partials + task * G * (D + 2);
      attend_chunk<KV>(queries, G, D, a.k + b * a.k_batch + h * a.k_head, a.v + b * a.v_batch + h * a.v_head,
                       a.k_slot, a.v_slot, a.mask == nullptr ? nullptr : a.mask + b * a.mask_batch, a.mask_slot,
                       c * SLOTS_PER_CHUNK, std::min(slots, (c + 1) * SLOTS_PER_CHUNK), part, part + G, part + 2 * G);
    }
  });
  for (int64_t bh = 0; bh < B * H; ++bh) {  // merge the chunks: the softmax over all slots
    const float* first = partials + bh * chunks * G * (D + 2);
    for (int64_t g = 0; g < G; ++g) {
      float top = -INFINITY;
      for (int64_t c = 0; c < chunks; ++c) top = std::max(top, first[c * G * (D + 2) + g]);
      Vf out[MAX_DIM / LANES];
      for (int64_t j = 0; j < D / LANES; ++j) out[j] = vzero();
      float total = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* part = first + c * G * (D + 2);
        if (part[g] == -INFINITY) continue;
        const float w = std::exp(part[g] - top);
        total += w * part[G + g];
        for (int64_t j = 0; j < D / LANES; ++j) {
          out[j] = vfmadd(vset(w), vload(part + 2 * G + g * D + LANES * j), out[j]);
        }
      }
      const Vf inverse = vset(total > 0.f ? 1.f / total : 0.f);  // (no slot at all: zeros)
      for (int64_t j = 0; j < D / LANES; ++j) vstore(a.y + (bh * G + g) * D + LANES * j, vmul(out[j], inverse));
    }
  }
}

template <typename KV>
void attention_of_tensors(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mask,
                          int64_t mask_batch, int64_t mask_slot, float scale, at::Tensor& y) {
  decode_attention_impl(AttentionArgs<KV>{q.size(0), q.size(1), q.size(2), q.size(3), k.size(2),
                                          q.data_ptr<Query<KV>>(), k.data_ptr<KV>(), v.data_ptr<KV>(),
                                          k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
                                          v.stride(2), mask, mask_batch, mask_slot, scale, y.data_ptr<Query<KV>>()});
}

// One decode step's attention per KV head: q (B, H, G, D), the G query rows of each of the B x H KV heads (the query
// heads that share it); k, v (B, H, T, D), the first T cache slots (any strides but the last); mask None or bool
// (B or 1, 1, 1, T), true where a slot may be attended. softmax(q k^T * scale) v, (B, H, G, D) in q's dtype; q, k and
// v float32 or bfloat16 (one dtype), or k and v float16 or int8 rows (slot_values) and q float32; computed in
// float32. The slots are split into chunks of 64 that the threads share (one sequence's 3 KV heads would keep only 3
// tasks), merged at the end.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(1) == k.size(1) && q.size(3) == cache_head_size(k),
              "decode_attention: q must be (B, H, G, D) and k, v (B, H, T, D), or int8 rows (B, H, T, D + D / 8)");
  const at::ScalarType kv_dtype = k.scalar_type();
  TORCH_CHECK(v.scalar_type() == kv_dtype &&
                  ((q.scalar_type() == kv_dtype && (kv_dtype == at::kFloat || kv_dtype == at::kBFloat16)) ||
                   (q.scalar_type() == at::kFloat && (kv_dtype == at::kHalf || kv_dtype == at::kChar))),
              "decode_attention: q, k and v must all be float32 or all bfloat16, or q float32 and k, v float16 or "
              "int8");
  const int64_t G = q.size(2), D = q.size(3), T = k.size(2);
  TORCH_CHECK(G >= 1 && G <= MAX_ROWS && D % 16 == 0 && D <= MAX_DIM && T >= 1,
              "decode_attention: at most ", MAX_ROWS, " query rows per head, a head size that is a multiple of 16 up "
              "to ", MAX_DIM, ", and at least one slot");
  TORCH_CHECK(kv_dtype != at::kChar || (D % SLOT_GROUP == 0 && k.size(3) == slot_row_size<int8_t>(D)),
              "decode_attention: int8 rows need a head size that is a multiple of ", SLOT_GROUP);
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
  if (kv_dtype == at::kFloat) {
    attention_of_tensors<float>(queries, k, v, mask_data, mask_batch_stride, mask_stride, scale, y);
  } else if (kv_dtype == at::kHalf) {
    attention_of_tensors<at::Half>(queries, k, v, mask_data, mask_batch_stride, mask_stride, scale, y);
  } else if (kv_dtype == at::kChar) {
    attention_of_tensors<int8_t>(queries, k, v, mask_data, mask_batch_stride, mask_stride, scale, y);
  } else {
    attention_of_tensors<at::BFloat16>(queries, k, v, mask_data, mask_batch_stride, mask_stride, scale, y);
  }
  return y;
}

// ---------------------------------------------------------------------------------------------------------------
// prefill_attention: a prompt chunk's attention in float32, flash style (one pass over the keys in blocks, the
// softmax kept online), per KV head with the query heads that share it stacked as its query rows. PyTorch's CPU flash
// kernel computes a causal chunk's masked half whenever it has at most 512 keys and multiplies small blocks through
// sgemm calls; here a block of keys none of a task's queries may see is skipped, and the products run in register
// tiles: the default model's 512-token prompt spent 118 ms of 560 in SDPA.

constexpr int64_t PREFILL_ROWS = 48;  // query rows a task takes: 48 / G positions of the G query heads of a KV head
constexpr int64_t PREFILL_KEYS = 64;  // keys a block (a multiple of 2 LANES)

enum class Visible : uint8_t { NONE, ALL, SOME };  // which of a block's keys its query rows may see

// One prompt chunk's attention (see prefill_attention): the tensors as pointers and strides (in elements).
template <typename KV>
struct PrefillArgs {
  int64_t B, Hq, Hkv, S, T, D;
  int64_t positions;                             // query positions a task takes (PREFILL_ROWS / G, at least 1)
  const float* q;                                // (B, Hq, S, D), rows contiguous
  int64_t q_batch, q_head, q_row;
  const KV *k, *v;                               // (B, Hkv, T, D), rows contiguous
  int64_t k_batch, k_head, k_slot, v_batch, v_head, v_slot;
  const bool* mask;                              // nullptr: causal (S == T), else (1 or B, 1, S, T)
  int64_t mask_rows, mask_batch, mask_row, mask_slot;
  float scale;
  float* y;                                      // (B, S, Hq, D) contiguous
};

// Scores of ROWS query rows (q, rows of D) against 2 LANES keys (keys_t: D rows of them, `keys` floats apart), into
// out[r * stride + 0..2 LANES - 1].
template <int ROWS>
inline void score_tile(const float* q, const float* keys_t, int64_t keys, int64_t D, float* out, int64_t stride) {
  Vf acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = vzero(), acc[r][1] = vzero();
  for (int64_t d = 0; d < D; ++d) {
    const Vf low = vload(keys_t + d * keys), high = vload(keys_t + d * keys + LANES);
    for (int r = 0; r < ROWS; ++r) {
      const Vf query = vset(q[r * D + d]);
      acc[r][0] = vfmadd(query, low, acc[r][0]);
      acc[r][1] = vfmadd(query, high, acc[r][1]);
    }
  }
  for (int r = 0; r < ROWS; ++r) vstore(out + r * stride, acc[r][0]), vstore(out + r * stride + LANES, acc[r][1]);
}

// o[r] = o[r] * correction[r] + sum over n keys of p[r][t] v[t] (values: rows `stride` floats apart), for ROWS rows
// and CV vectors of columns.
template <int ROWS, int CV>
inline void value_tile(const float* p, int64_t p_stride, const float* values, int64_t stride, int64_t n, int64_t D,
                       const float* correction, float* o) {
  Vf acc[ROWS][CV];
  for (int r = 0; r < ROWS; ++r) {
    for (int c = 0; c < CV; ++c) acc[r][c] = vmul(vload(o + r * D + c * LANES), vset(correction[r]));
  }
  for (int64_t t = 0; t < n; ++t) {
    Vf value[CV];
    for (int c = 0; c < CV; ++c) value[c] = vload(values + t * stride + c * LANES);
    for (int r = 0; r < ROWS; ++r) {
      const Vf weight = vset(p[r * p_stride + t]);
      for (int c = 0; c < CV; ++c) acc[r][c] = vfmadd(weight, value[c], acc[r][c]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int c = 0; c < CV; ++c) vstore(o + r * D + c * LANES, acc[r][c]);
  }
}

// Which keys of each block (PREFILL_KEYS of them) the query rows of each task's positions (a.positions) may see:
// (mask rows, query blocks, key blocks); the same for every head (and, in prefill_layers, every layer).
template <typename KV>
std::vector<Visible> visible_blocks(const PrefillArgs<KV>& a) {
  const int64_t query_blocks = (a.S + a.positions - 1) / a.positions;
  const int64_t key_blocks = (a.T + PREFILL_KEYS - 1) / PREFILL_KEYS;
  std::vector<Visible> kinds(a.mask_rows * query_blocks * key_blocks);
  for (int64_t m = 0; m < a.mask_rows; ++m) {
    for (int64_t qb = 0; qb < query_blocks; ++qb) {
      const int64_t s0 = qb * a.positions, s1 = std::min(a.S, s0 + a.positions);
      for (int64_t kb = 0; kb < key_blocks; ++kb) {
        const int64_t t0 = kb * PREFILL_KEYS, t1 = std::min(a.T, t0 + PREFILL_KEYS);
        int64_t seen = 0;
        if (a.mask == nullptr) {  // causal: position s sees keys 0..s
          for (int64_t s = s0; s < s1; ++s) seen += std::clamp(s + 1 - t0, int64_t{0}, t1 - t0);
        } else {
          for (int64_t s = s0; s < s1; ++s) {
            const bool* row = a.mask + m * a.mask_batch + s * a.mask_row;
            for (int64_t t = t0; t < t1; ++t) seen += row[t * a.mask_slot];
          }
        }
        kinds[(m * query_blocks + qb) * key_blocks + kb] =
            seen == 0 ? Visible::NONE : seen == (s1 - s0) * (t1 - t0) ? Visible::ALL : Visible::SOME;
      }
    }
  }
  return kinds;
}

// A task's buffers: its rows' scaled queries, weighted values, running maxima, sums and corrections, a block's scores.
struct PrefillScratch {
  std::vector<float> q, o, max, sum, correction, scores;
  void resize(int64_t rows, int64_t D) {
    q.resize(rows * D), o.resize(rows * D), max.resize(rows), sum.resize(rows), correction.resize(rows);
    scores.resize(rows * PREFILL_KEYS);
  }
};

// Rows 0..rows-1 in tiles of TILE rows, then the rest one at a time: tile(first row, std::integral_constant<ROWS>).
template <int TILE, typename Body>
inline void in_row_tiles(int64_t rows, const Body& tile) {
  int64_t r = 0;
  for (; r + TILE <= rows; r += TILE) tile(r, std::integral_constant<int, TILE>{});
  for (; r < rows; ++r) tile(r, std::integral_constant<int, 1>{});
}

// One task: the G query heads of KV head h at positions s0..s0 + a.positions - 1 of row b, over every key block they
// may see (kinds: the task's row of visible_blocks). keys_t: the head's keys transposed (D rows of `keys` floats,
// zeros past T), values: its values (T rows of D, `value_stride` floats apart), both float32. Rows r = i G + g
// (position s0 + i, query head h G + g).
template <typename KV, int CV>
void prefill_task(const PrefillArgs<KV>& a, const Visible* kinds, const float* keys_t, int64_t keys,
                  const float* values, int64_t value_stride, int64_t b, int64_t h, int64_t qb, PrefillScratch& w) {
  const int64_t G = a.Hq / a.Hkv, D = a.D, s0 = qb * a.positions;
  const int64_t rows = std::min(a.S - s0, a.positions) * G;
  const int64_t key_blocks = (a.T + PREFILL_KEYS - 1) / PREFILL_KEYS;
  float *Q = w.q.data(), *O = w.o.data(), *P = w.scores.data();
  for (int64_t r = 0; r < rows; ++r) {
    const float* query = a.q + b * a.q_batch + (h * G + r % G) * a.q_head + (s0 + r / G) * a.q_row;
    for (int64_t d = 0; d < D; d += LANES) {
      vstore(Q + r * D + d, vmul(vload(query + d), vset(a.scale)));
      vstore(O + r * D + d, vzero());
    }
    w.max[r] = -INFINITY, w.sum[r] = 0.f;
  }
  const bool* mask = a.mask == nullptr ? nullptr : a.mask + (a.mask_rows == 1 ? 0 : b * a.mask_batch);
  for (int64_t kb = 0; kb < key_blocks; ++kb) {
    const Visible kind = kinds[kb];
    if (kind == Visible::NONE) continue;
    const int64_t t0 = kb * PREFILL_KEYS, n = std::min(a.T - t0, PREFILL_KEYS);
    in_row_tiles<6>(rows, [&](int64_t r, auto tile_rows) {
      for (int64_t t = 0; t < PREFILL_KEYS; t += 2 * LANES) {
        score_tile<decltype(tile_rows)::value>(Q + r * D, keys_t + t0 + t, keys, D, P + r * PREFILL_KEYS + t,
                                               PREFILL_KEYS);
      }
    });
    for (int64_t r = 0; r < rows; ++r) {  // the online softmax: each row's maximum so far, its weights, their sum
      float* score = P + r * PREFILL_KEYS;
      const int64_t s = s0 + r / G;
      if (kind == Visible::SOME || n < PREFILL_KEYS) {
        for (int64_t t = 0; t < PREFILL_KEYS; ++t) {
          const bool seen = t < n && (mask == nullptr ? t0 + t <= s : mask[s * a.mask_row + (t0 + t) * a.mask_slot]);
          if (!seen) score[t] = -INFINITY;
        }
      }
      Vf top = vload(score);
      for (int64_t t = LANES; t < PREFILL_KEYS; t += LANES) top = vmax(top, vload(score + t));
      const float block_max = vmaxval(top), previous = w.max[r];
      if (block_max == -INFINITY) {  // no key of this block for this row: weights 0, nothing rescaled
        w.correction[r] = 1.f;
        for (int64_t t = 0; t < PREFILL_KEYS; t += LANES) vstore(score + t, vzero());
        continue;
      }
      const float now = std::max(previous, block_max);
      w.correction[r] = previous == -INFINITY ? 0.f : std::exp(previous - now);
      Vf total = vzero();
      for (int64_t t = 0; t < PREFILL_KEYS; t += LANES) {
        const Vf e = exp_nonpositive(vsub(vload(score + t), vset(now)));
        vstore(score + t, e);
        total = vadd(total, e);
      }
      w.max[r] = now, w.sum[r] = w.sum[r] * w.correction[r] + vsum(total);
    }
    for (int64_t c = 0; c < D; c += CV * LANES) {
      in_row_tiles<6>(rows, [&](int64_t r, auto tile_rows) {
        value_tile<decltype(tile_rows)::value, CV>(P + r * PREFILL_KEYS, PREFILL_KEYS, values + t0 * value_stride + c,
                                                   value_stride, n, D, w.correction.data() + r, O + r * D + c);
      });
    }
  }
  for (int64_t r = 0; r < rows; ++r) {  // y = o / sum (no key seen at all: zeros, as decode_attention's)
    const Vf inverse = vset(w.sum[r] > 0.f ? 1.f / w.sum[r] : 0.f);
    float* out = a.y + ((b * a.S + s0 + r / G) * a.Hq + h * G + r % G) * D;
    for (int64_t d = 0; d < D; d += LANES) vstore(out + d, vmul(vload(O + r * D + d), inverse));
  }
}

template <typename KV>
void prefill_attention_impl(const PrefillArgs<KV>& a, const std::vector<Visible>& kinds) {
  const int64_t G = a.Hq / a.Hkv, D = a.D, query_blocks = (a.S + a.positions - 1) / a.positions;
  const int64_t key_blocks = (a.T + PREFILL_KEYS - 1) / PREFILL_KEYS, keys = key_blocks * PREFILL_KEYS;
  // Each KV head's keys transposed (D rows of `keys`) and, unless they are float32 already, its values (T rows of
  // D) in float32, once for all the tasks that read them: the score tiles then multiply a query by 2 LANES keys at
  // once, with no sums across lanes.
  constexpr bool convert_values = !std::is_same_v<KV, float>;
  std::vector<float> keys_buffer(a.B * a.Hkv * D * keys), values_buffer(convert_values ? a.B * a.Hkv * a.T * D : 0);
  float *keys_t = keys_buffer.data(), *values = values_buffer.data();
  at::parallel_for(0, a.B * a.Hkv * key_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> block(PREFILL_KEYS * D);  // a block's keys as rows, then transposed into keys_t
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / key_blocks, b = bh / a.Hkv, h = bh % a.Hkv, t0 = task % key_blocks * PREFILL_KEYS;
      const int64_t n = std::min(a.T - t0, PREFILL_KEYS);
      const KV* key = a.k + b * a.k_batch + h * a.k_head + t0 * a.k_slot;
      const KV* value = a.v + b * a.v_batch + h * a.v_head + t0 * a.v_slot;
      for (int64_t t = 0; t < PREFILL_KEYS; ++t) {
        for (int64_t d = 0; d < D; d += LANES) {
          vstore(block.data() + t * D + d, t < n ? slot_values(key + t * a.k_slot, d, D) : vzero());
          if (convert_values && t < n) {
            vstore(values + (bh * a.T + t0 + t) * D + d, slot_values(value + t * a.v_slot, d, D));
          }
        }
      }
      float* out = keys_t + bh * D * keys + t0;
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t t = 0; t < PREFILL_KEYS; ++t) out[d * keys + t] = block[t * D + d];
      }
    }
  });
  // Tasks (b, KV head, query block), the costliest first (by visible key blocks), handed to threads as they ask: a
  // causal chunk's last queries see all its keys, its first ones a block.
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (-cost, (b Hkv + h) query_blocks + qb)
  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t qb = 0; qb < query_blocks; ++qb) {
      const Visible* row = kinds.data() + ((a.mask_rows == 1 ? 0 : b) * query_blocks + qb) * key_blocks;
      const int64_t cost = key_blocks - std::count(row, row + key_blocks, Visible::NONE);
      for (int64_t h = 0; h < a.Hkv; ++h) tasks.emplace_back(-cost, (b * a.Hkv + h) * query_blocks + qb);
    }
  }
  std::sort(tasks.begin(), tasks.end());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), tasks.size()), 1, [&](int64_t, int64_t) {
    thread_local PrefillScratch scratch;
    scratch.resize(a.positions * G, D);
    for (int64_t i = next++; i < static_cast<int64_t>(tasks.size()); i = next++) {
      const int64_t task = tasks[i].second, qb = task % query_blocks, bh = task / query_blocks;
      const int64_t b = bh / a.Hkv, h = bh % a.Hkv;
      const Visible* row = kinds.data() + ((a.mask_rows == 1 ? 0 : b) * query_blocks + qb) * key_blocks;
      const float* head_keys = keys_t + bh * D * keys;
      const float* head_values = convert_values ? values + bh * a.T * D
                                                : reinterpret_cast<const float*>(a.v + b * a.v_batch + h * a.v_head);
      const int64_t value_stride = convert_values ? D : a.v_slot;
      if ((D / LANES) % 2 == 0) {
        prefill_task<KV, 2>(a, row, head_keys, keys, head_values, value_stride, b, h, qb, scratch);
      } else {
        prefill_task<KV, 1>(a, row, head_keys, keys, head_values, value_stride, b, h, qb, scratch);
      }
    }
  });
}

template <typename KV>
void prefill_attention_of_tensors(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& mask, float scale, at::Tensor& y,
                                  std::vector<Visible>& kinds) {
  const int64_t G = q.size(1) / k.size(1);
  PrefillArgs<KV> a{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3),
                    std::max<int64_t>(1, PREFILL_ROWS / G), q.data_ptr<float>(), q.stride(0), q.stride(1), q.stride(2),
                    k.data_ptr<KV>(), v.data_ptr<KV>(), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2),
                    nullptr, 1, 0, 0, 0, scale, y.data_ptr<float>()};
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    a.mask = m.data_ptr<bool>();
    a.mask_rows = m.size(0), a.mask_batch = m.stride(0), a.mask_row = m.stride(2), a.mask_slot = m.stride(3);
  }
  if (kinds.empty()) kinds = visible_blocks(a);
  prefill_attention_impl(a, kinds);
}

// A prompt chunk's attention: q (B, Hq, S, D) float32, k and v (B, Hkv, T, D) float32, float16 or bfloat16, or int8
// rows (B, Hkv, T, D + D / 8: slot_values) (a cache's first T slots, or the chunk's own keys and values), Hq a
// multiple of Hkv (query head j uses KV head j / (Hq / Hkv)), each tensor's rows contiguous (any other strides); mask
// None (causal: query s sees keys 0..s, S == T) or bool (B or 1, 1, S, T), true where a key may be attended.
// softmax(q k^T * scale) v in float32, returned as (B, Hq, S, D): a view of a contiguous (B, S, Hq, D), the layout
// the output projection reads. A query that may see no key gets zeros, as from SDPA on CPU. kinds: visible_blocks of
// an earlier call with the same S, T, Hq / Hkv and mask (prefill_layers' layers), or empty, then filled.
at::Tensor prefill_attention_reusing(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const std::optional<at::Tensor>& mask, double scale,
                                     std::vector<Visible>& kinds) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(3) == cache_head_size(k) && k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
              "prefill_attention: q must be (B, Hq, S, D) and k, v (B, Hkv, T, D) (or int8 rows (B, Hkv, T, D + D / "
              "8)), Hq a multiple of Hkv");
  const at::ScalarType kv_dtype = k.scalar_type();
  TORCH_CHECK(q.scalar_type() == at::kFloat && v.scalar_type() == kv_dtype &&
                  (kv_dtype == at::kFloat || kv_dtype == at::kHalf || kv_dtype == at::kBFloat16 ||
                   kv_dtype == at::kChar),
              "prefill_attention: q must be float32 and k, v float32, float16, bfloat16 or int8 rows");
  const int64_t S = q.size(2), D = q.size(3), T = k.size(2);
  TORCH_CHECK(D % 16 == 0 && D <= MAX_DIM && S >= 1 && T >= 1,
              "prefill_attention: a head size that is a multiple of 16 up to ", MAX_DIM, ", a query and a key");
  TORCH_CHECK(kv_dtype != at::kChar || (D % SLOT_GROUP == 0 && k.size(3) == slot_row_size<int8_t>(D)),
              "prefill_attention: int8 rows need a head size that is a multiple of ", SLOT_GROUP);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "prefill_attention: q, k and v rows must be contiguous");
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && (m.size(0) == 1 || m.size(0) == q.size(0)) &&
                    m.size(1) == 1 && m.size(2) == S && m.size(3) == T,
                "prefill_attention: mask must be bool (B or 1, 1, S, T)");
  } else {
    TORCH_CHECK(S == T, "prefill_attention: without a mask (causal) S must equal T");
  }
  at::Tensor y = at::empty({q.size(0), S, q.size(1), D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (kv_dtype == at::kFloat) {
    prefill_attention_of_tensors<float>(q, k, v, mask, static_cast<float>(scale), y, kinds);
  } else if (kv_dtype == at::kHalf) {
    prefill_attention_of_tensors<at::Half>(q, k, v, mask, static_cast<float>(scale), y, kinds);
  } else if (kv_dtype == at::kChar) {
    prefill_attention_of_tensors<int8_t>(q, k, v, mask, static_cast<float>(scale), y, kinds);
  } else {
    prefill_attention_of_tensors<at::BFloat16>(q, k, v, mask, static_cast<float>(scale), y, kinds);
  }
  return y.transpose(1, 2);
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& mask, double scale) {
  std::vector<Visible> kinds;
  return prefill_attention_reusing(q, k, v, mask, scale, kinds);
}


// ---------------------------------------------------------------------------------------------------------------
// decode_layers: one decode step through every layer of a model in blocks (w4a8's 4-bit layers, Q5, Q8 ones) of the
// Llama family (RMSNorm, RoPE, SwiGLU), in one call. The eager step runs the same kernels but spends most of its time
// in Python and operator dispatch around ~20 operators a layer. Each operation here rounds its result to the model's
// dtype T where an eager operator does (the residual stream, the norms, the rotation, SiLU), and the matmuls and the
// attention are the eager step's own kernels, so both paths give the same tokens.

template <typename T>
void blocks_linear(const T* x, int64_t rows, const at::Tensor& blocks, const std::optional<at::Tensor>& bias, T* y) {
  const int64_t K = blocks.size(1) * 32, N = blocks.size(0) * 16;
  if (blocks.size(2) == Q4Block::BYTES) {
    matmul<Q4Block>(x, rows, K, blocks.data_ptr<uint8_t>(), N, y);
  } else if (blocks.size(2) == Q5Block::BYTES) {
    matmul<Q5Block>(x, rows, K, blocks.data_ptr<uint8_t>(), N, y);
  } else if (blocks.size(2) == Q5MBlock::BYTES) {
    matmul<Q5MBlock>(x, rows, K, blocks.data_ptr<uint8_t>(), N, y);
  } else if (blocks.size(2) == Q6Block::BYTES) {
    matmul<Q6Block>(x, rows, K, blocks.data_ptr<uint8_t>(), N, y);
  } else {
    matmul<Q8Block>(x, rows, K, blocks.data_ptr<uint8_t>(), N, y);
  }
  if (bias.has_value()) {
    const T* b = bias->data_ptr<T>();
    for (int64_t t = 0; t < rows; ++t) {
      for (int64_t j = 0; j < N; j += LANES) vstore(y + t * N + j, vadd(vload(y + t * N + j), vload(b + j)));
    }
  }
}

// RMSNorm.forward for rows (rows, H): x / sqrt(mean(x^2) + eps) in float32, rounded to T, times the weight.
template <typename T>
void rms_norm(const T* x, int64_t rows, int64_t H, const T* weight, float eps, T* out) {
  for (int64_t t = 0; t < rows; ++t) {
    const T* row = x + t * H;
    Vf squares = vzero();
    for (int64_t j = 0; j < H; j += LANES) squares = vfmadd(vload(row + j), vload(row + j), squares);
    const Vf inverse = vset(1.f / std::sqrt(vsum(squares) / H + eps));
    for (int64_t j = 0; j < H; j += LANES) {
      vstore(out + t * H + j, vmul(held_as<T>(vmul(vload(row + j), inverse)), vload(weight + j)));
    }
  }
}

// apply_rope on `heads` consecutive heads of D values (pairs i, i + D / 2), in place: x cos + rotate_half(x) sin, each
// product and the sum rounded to T; cos, sin (D / 2) hold one position's angles, rounded to T as rope_cos_sin's are.
template <typename T>
void rotate(T* x, int64_t heads, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    T* head = x + h * D;
    for (int64_t j = 0; j < half; j += LANES) {
      const Vf x1 = vload(head + j), x2 = vload(head + half + j);
      const Vf c = vload(cos + j), s = vload(sin + j);
      vstore(head + j, vsub(held_as<T>(vmul(x1, c)), held_as<T>(vmul(x2, s))));
      vstore(head + half + j, vadd(held_as<T>(vmul(x2, c)), held_as<T>(vmul(x1, s))));
    }
  }
}

// MLP.forward's SwiGLU: rows of h (rows, 2 I) = [gate | up] -> silu(gate) (rounded to T) * up, (rows, I).
template <typename T>
void swiglu(const T* h, int64_t rows, int64_t I, T* out) {
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t j = 0; j < I; j += LANES) {
      const Vf gate = vload(h + t * 2 * I + j), up = vload(h + t * 2 * I + I + j);
      const Vf e = exp_nonpositive(vsub(vzero(), vabs(gate)));  // e^-|gate|
      // sigmoid(gate) = 1 / (1 + e^-gate), or e^gate / (1 + e^gate) for gate < 0: never exp of a positive number
      const Vf numerator = vselect_negative(gate, e, vset(1.f));
      const Vf silu = vmul(gate, vdiv(numerator, vadd(vset(1.f), e)));
      vstore(out + t * I + j, vmul(held_as<T>(silu), up));
    }
  }
}

template <typename From, typename To>
void convert(const From* in, int64_t count, To* out) {  // count: a multiple of 16
  for (int64_t i = 0; i < count; i += LANES) vstore(out + i, vload(in + i));
}

// KVCache.update for one head's new key or value x (D of T) into its slot's row: converted, or an int8 row (see
// slot_values) quantized as cache.quantize_slots does, each group of 32: q = round(x * (127 / max|x|)),
// s = max|x| / 127.
template <typename T, typename KV>
void store_slot(const T* x, int64_t D, KV* slot) {
  if constexpr (std::is_same_v<KV, int8_t>) {
    for (int64_t g = 0; g < D; g += SLOT_GROUP) {
      Vf top = vzero();
      for (int64_t d = g; d < g + SLOT_GROUP; d += LANES) top = vmax(top, vabs(vload(x + d)));
      const float amax = vmaxval(top), scale = amax / 127.f;
      const Vf inverse = vset(amax > 0 ? 127.f / amax : 0.f);
      for (int64_t d = g; d < g + SLOT_GROUP; d += LANES) {
        store_int8(slot + d, vround_int(vmul(vload(x + d), inverse)));
      }
      std::memcpy(slot + D + g / SLOT_GROUP * static_cast<int64_t>(sizeof scale), &scale, sizeof scale);
    }
  } else {
    convert(x, D, slot);
  }
}

template <typename T>
void add_into(T* x, const T* y, int64_t count) {  // the residual stream: x + y, rounded to T
  for (int64_t i = 0; i < count; i += LANES) vstore(x + i, vadd(vload(x + i), vload(y + i)));
}

// Rows begin..end-1's rotation angles (rope_cos_sin): position * inverse frequency in float32, cos and sin (half
// each a row) rounded to T.
template <typename T>
void rotation_angles(const int64_t* positions, int64_t begin, int64_t end, const float* inv_freq, int64_t half,
                     float* cos, float* sin) {
  for (int64_t t = begin; t < end; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(positions[t]) * inv_freq[i];
      cos[t * half + i] = static_cast<float>(static_cast<T>(std::cos(angle)));
      sin[t * half + i] = static_cast<float>(static_cast<T>(std::sin(angle)));
    }
  }
}

template <typename T, typename KV>
void decode_layers_impl(T* X, int64_t B, int64_t H, const int64_t* positions, const bool* mask, int64_t mask_batch,
                        int64_t mask_slot, at::TensorList keys, at::TensorList values, int64_t kv_length,
                        at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                        const float* inv_freq, int64_t Hq, float eps) {
  const int64_t layers = keys.size(), Hkv = keys[0].size(1), D = cache_head_size(keys[0]), half = D / 2;
  const int64_t NQ = Hq * D, NQKV = (Hq + 2 * Hkv) * D, I = weights[4].size(0) * 8;
  std::vector<float> cos(B * half), sin(B * half);
  rotation_angles<T>(positions, 0, B, inv_freq, half, cos.data(), sin.data());
  std::vector<T> h(B * H), qkv(B * NQKV), y(B * NQ), out(B * H), up(B * 2 * I), act(B * I);
  std::vector<Query<KV>> q_kv(B * NQ), y_kv(B * NQ);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = &weights[6 * l];  // attention norm, qkv, o, MLP norm, up (gate and up), down
    rms_norm(X, B, H, w[0].data_ptr<T>(), eps, h.data());
    blocks_linear(h.data(), B, w[1], biases.get(4 * l), qkv.data());
    KV *k_cache = keys[l].data_ptr<KV>(), *v_cache = values[l].data_ptr<KV>();
    for (int64_t b = 0; b < B; ++b) {
      T* row = qkv.data() + b * NQKV;  // q heads, k heads, v heads
      rotate(row, Hq + Hkv, D, cos.data() + b * half, sin.data() + b * half);
      for (int64_t kv = 0; kv < Hkv; ++kv) {  // KVCache.update: slot positions[b] of row b
        store_slot(row + NQ + kv * D, D, k_cache + b * keys[l].stride(0) + kv * keys[l].stride(1) +
                                             positions[b] * keys[l].stride(2));
        store_slot(row + NQ + (Hkv + kv) * D, D, v_cache + b * values[l].stride(0) + kv * values[l].stride(1) +
                                                     positions[b] * values[l].stride(2));
      }
      convert(row, NQ, q_kv.data() + b * NQ);  // (Hq, D) = (Hkv, G, D): each KV head's query rows
    }
    decode_attention_impl(AttentionArgs<KV>{B, Hkv, Hq / Hkv, D, kv_length, q_kv.data(), k_cache, v_cache,
                                            keys[l].stride(0), keys[l].stride(1), keys[l].stride(2),
                                            values[l].stride(0), values[l].stride(1), values[l].stride(2), mask,
                                            mask_batch, mask_slot, scale, y_kv.data()});
    convert(y_kv.data(), B * NQ, y.data());
    blocks_linear(y.data(), B, w[2], biases.get(4 * l + 1), out.data());
    add_into(X, out.data(), B * H);
    rms_norm(X, B, H, w[3].data_ptr<T>(), eps, h.data());
    blocks_linear(h.data(), B, w[4], biases.get(4 * l + 2), up.data());
    swiglu(up.data(), B, I, act.data());
    blocks_linear(act.data(), B, w[5], biases.get(4 * l + 3), out.data());
    add_into(X, out.data(), B * H);
  }
}

// A linear layer's blocks (either kind) for an (N, K) weight, and its bias.
void check_layer(const char* op, const at::Tensor& blocks, const std::optional<at::Tensor>& bias, int64_t N,
                 int64_t K, at::ScalarType dtype, int64_t layer) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.dim() == 3 &&
                  (blocks.size(2) == Q4Block::BYTES || blocks.size(2) == Q5Block::BYTES ||
                   blocks.size(2) == Q5MBlock::BYTES || blocks.size(2) == Q6Block::BYTES ||
                   blocks.size(2) == Q8Block::BYTES) &&
                  blocks.size(0) * 16 == N && blocks.size(1) * 32 == K,
              op, ": layer ", layer, " has blocks of shape ", blocks.sizes(), " where (", N / 16, ", ",
              K / 32, ", ", Q4Block::BYTES, ", ", Q5Block::BYTES, ", ", Q5MBlock::BYTES, ", ", Q6Block::BYTES, " or ",
              Q8Block::BYTES, ") uint8 were expected");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == dtype && bias->is_contiguous() && bias->numel() == N),
              op, ": layer ", layer, " has a bias that is not ", N, " values of x's dtype");
}

// Checks shared by decode_layers and prefill_layers (`op`): L layers' caches for B rows of x's hidden size H in dtype,
// their weights, biases and rotation frequencies. Returns the MLP's width.
int64_t check_layers(const char* op, at::ScalarType dtype, int64_t B, int64_t H, at::TensorList keys,
                     at::TensorList values, int64_t kv_length, at::TensorList weights,
                     const c10::List<std::optional<at::Tensor>>& biases, const at::Tensor& inv_freq, int64_t n_heads) {
  const int64_t layers = keys.size();
  TORCH_CHECK(layers >= 1 && values.size() == keys.size() && weights.size() == 6 * keys.size() &&
                  biases.size() == 4 * keys.size(),
              op, ": each layer needs a key cache, a value cache, 6 weights and 4 biases (or None)");
  TORCH_CHECK(keys[0].dim() == 4, op, ": caches must be (B, KV heads, slots, head size)");
  const int64_t Hkv = keys[0].size(1), D = cache_head_size(keys[0]), row = keys[0].size(3);
  const at::ScalarType kv_dtype = keys[0].scalar_type();
  TORCH_CHECK(kv_dtype == at::kFloat || kv_dtype == at::kBFloat16 ||
                  ((kv_dtype == at::kHalf || kv_dtype == at::kChar) && dtype == at::kFloat),
              op, ": caches must be float32 or bfloat16, or float16 or int8 rows for a float32 x");
  TORCH_CHECK(kv_dtype != at::kChar || row == slot_row_size<int8_t>(D),
              op, ": int8 caches' rows must hold a head's values, then a float32 scale for each 32 of them");
  TORCH_CHECK(Hkv >= 1 && n_heads % Hkv == 0 && n_heads / Hkv <= MAX_ROWS && D % 32 == 0 && D <= MAX_DIM,
              op, ": at most ", MAX_ROWS, " query heads per KV head, and a head size that is a multiple of 32 up to ",
              MAX_DIM);
  TORCH_CHECK(kv_length >= 1, op, ": kv_length must be positive");
  for (const at::TensorList caches : {keys, values}) {
    for (const at::Tensor& cache : caches) {
      TORCH_CHECK(cache.dim() == 4 && cache.size(0) >= B && cache.size(1) == Hkv && cache.size(2) >= kv_length &&
                      cache.size(3) == row && cache.stride(3) == 1 && cache.scalar_type() == kv_dtype,
                  op, ": every cache must be (at least ", B, " rows, ", Hkv, ", at least ", kv_length, ", ", row,
                  ") of one dtype, rows contiguous");
    }
  }
  TORCH_CHECK(weights[4].dim() == 3 && weights[4].size(0) % 4 == 0, op, ": up's blocks must be 3-d");
  const int64_t I = weights[4].size(0) * 8;
  TORCH_CHECK(I % 32 == 0, op, ": the MLP's width must be a multiple of 32");
  for (int64_t l = 0; l < layers; ++l) {
    for (const int i : {0, 3}) {
      const at::Tensor& norm = weights[6 * l + i];
      TORCH_CHECK(norm.scalar_type() == dtype && norm.is_contiguous() && norm.numel() == H,
                  op, ": layer ", l, "'s norms must be ", H, " values of x's dtype");
    }
    check_layer(op, weights[6 * l + 1], biases.get(4 * l), (n_heads + 2 * Hkv) * D, H, dtype, l);
    check_layer(op, weights[6 * l + 2], biases.get(4 * l + 1), H, n_heads * D, dtype, l);
    check_layer(op, weights[6 * l + 4], biases.get(4 * l + 2), 2 * I, H, dtype, l);
    check_layer(op, weights[6 * l + 5], biases.get(4 * l + 3), H, I, dtype, l);
  }
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.is_contiguous() && inv_freq.numel() == D / 2,
              op, ": inv_freq must be ", D / 2, " contiguous float32 values");
  return I;
}

// positions (count int64), each a slot below kv_length: (one outside the cache would be written out of bounds).
const int64_t* checked_positions(const char* op, const at::Tensor& positions, int64_t count, int64_t kv_length) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == count && positions.is_contiguous(),
              op, ": positions must be ", count, " contiguous int64 values");
  const int64_t* position = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < count; ++t) {
    TORCH_CHECK(position[t] >= 0 && position[t] < kv_length, op, ": position ", position[t], " is outside the ",
                kv_length, " slots attended");
  }
  return position;
}

// run(T{}, KV{}) for the model's dtype T and the cache's KV (the pairs check_layers admits).
template <typename Run>
void with_types(at::ScalarType dtype, at::ScalarType kv_dtype, const Run& run) {
  if (dtype == at::kFloat) {
    if (kv_dtype == at::kFloat) {
      run(float{}, float{});
    } else if (kv_dtype == at::kHalf) {
      run(float{}, at::Half{});
    } else if (kv_dtype == at::kChar) {
      run(float{}, int8_t{});
    } else {
      run(float{}, at::BFloat16{});
    }
  } else {
    kv_dtype == at::kFloat ? run(at::BFloat16{}, float{}) : run(at::BFloat16{}, at::BFloat16{});
  }
}

// A decode step through all L layers: x (B, hidden), the new tokens' embeddings, float32 or bfloat16 (the model's
// dtype T); positions (B) int64, each below kv_length; mask None or bool (B or 1, 1, 1, kv_length); keys, values: L
// caches (at least B rows, Hkv, at least kv_length slots, D), float32 or bfloat16 (or, under a float32 x, float16 or
// int8 rows of D + D / 8: slot_values),
// whose slot positions[b] of row b each layer writes; weights: per layer the attention norm (hidden), the qkv blocks
// ((n_heads + 2 Hkv) D outputs, q then k then v heads), o's, the MLP norm, up's (gate then up: 2 I outputs), down's;
// biases: per layer qkv's, o's, up's, down's, or None; inv_freq (D / 2) float32. Returns the hidden states after the
// last layer, (B, hidden) in T.
at::Tensor decode_layers(const at::Tensor& x, const at::Tensor& positions, const std::optional<at::Tensor>& mask,
                         at::TensorList keys, at::TensorList values, int64_t kv_length, at::TensorList weights,
                         const c10::List<std::optional<at::Tensor>>& biases, const at::Tensor& inv_freq,
                         int64_t n_heads, double eps) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  x.size(1) % 32 == 0,
              "decode_layers: x must be (B, hidden) float32 or bfloat16, hidden a multiple of 32");
  const int64_t B = x.size(0), H = x.size(1);
  check_layers("decode_layers", x.scalar_type(), B, H, keys, values, kv_length, weights, biases, inv_freq, n_heads);
  const at::Tensor rows_positions = positions.contiguous();
  const int64_t* position = checked_positions("decode_layers", rows_positions, B, kv_length);
  const bool* mask_data = nullptr;
  int64_t mask_batch = 0, mask_slot = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && (m.size(0) == 1 || m.size(0) == B) &&
                    m.size(1) == 1 && m.size(2) == 1 && m.size(3) == kv_length,
                "decode_layers: mask must be bool (B or 1, 1, 1, kv_length)");
    mask_data = m.data_ptr<bool>();
    mask_batch = m.size(0) == 1 ? 0 : m.stride(0);
    mask_slot = m.stride(3);
  }
  at::Tensor hidden = x.clone(at::MemoryFormat::Contiguous);
  with_types(x.scalar_type(), keys[0].scalar_type(), [&](auto model_type, auto cache_type) {
    using T = decltype(model_type);
    using KV = decltype(cache_type);
    decode_layers_impl<T, KV>(hidden.data_ptr<T>(), B, H, position, mask_data, mask_batch, mask_slot, keys, values,
                              kv_length, weights, biases, inv_freq.data_ptr<float>(), n_heads,
                              static_cast<float>(eps));
  });
  return hidden;
}

// body(begin, end) over ranges of `rows` on every thread: a prompt chunk's rows (the grain keeps a few on the
// caller's).
template <typename Body>
void for_rows(int64_t rows, const Body& body) {
  at::parallel_for(0, rows, 16, body);
}

// prefill_layers' work, the eager layers' operations in their order (Block.forward, Attention.forward) on X (B S rows
// of H, T), the matmuls through our kernels and the attention as the eager chunk's: prefill_attention in float32,
// PyTorch's SDPA in bf16.
template <typename T, typename KV>
void prefill_layers_impl(at::Tensor& hidden, const int64_t* positions, const std::optional<at::Tensor>& mask,
                         at::TensorList keys, at::TensorList values, int64_t kv_length, at::TensorList weights,
                         const c10::List<std::optional<at::Tensor>>& biases, const float* inv_freq, int64_t Hq,
                         int64_t I, float eps) {
  const int64_t B = hidden.size(0), S = hidden.size(1), H = hidden.size(2), rows = B * S;
  const int64_t Hkv = keys[0].size(1), D = cache_head_size(keys[0]), half = D / 2;
  const int64_t NQ = Hq * D, NQKV = (Hq + 2 * Hkv) * D;
  const at::ScalarType dtype = hidden.scalar_type(), kv_dtype = keys[0].scalar_type();
  T* X = hidden.data_ptr<T>();
  std::vector<float> cos(rows * half), sin(rows * half);
  for_rows(rows, [&](int64_t begin, int64_t end) {
    rotation_angles<T>(positions, begin, end, inv_freq, half, cos.data(), sin.data());
  });
  const at::TensorOptions options = hidden.options();
  const at::Tensor h = at::empty({rows, H}, options), qkv = at::empty({B, S, NQKV}, options),
                   out = at::empty({rows, H}, options), up = at::empty({rows, 2 * I}, options),
                   act = at::empty({rows, I}, options);
  // (B, Hq + 2 Hkv, S, D): the heads of qkv's rows, as Attention.forward views them
  const at::Tensor heads = qkv.view({B, S, Hq + 2 * Hkv, D}).transpose(1, 2);
  const auto norm = [&](const at::Tensor& weight) {
    for_rows(rows, [&](int64_t begin, int64_t end) {
      rms_norm(X + begin * H, end - begin, H, weight.data_ptr<T>(), eps, h.data_ptr<T>() + begin * H);
    });
  };
  const auto add_out = [&] {  // the residual stream: X += out
    for_rows(rows, [&](int64_t begin, int64_t end) {
      add_into(X + begin * H, out.data_ptr<T>() + begin * H, (end - begin) * H);
    });
  };
  std::vector<Visible> visible;  // the blocks of keys each block of queries sees: the same in every layer
  for (int64_t l = 0; l < static_cast<int64_t>(keys.size()); ++l) {
    const at::Tensor* w = &weights[6 * l];  // attention norm, qkv, o, MLP norm, up (gate and up), down
    norm(w[0]);
    blocks_linear(h.data_ptr<T>(), rows, w[1], biases.get(4 * l), qkv.data_ptr<T>());
    const at::Tensor& key_cache = keys[l];
    const at::Tensor& value_cache = values[l];
    for_rows(rows, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {  // rotate q and k; KVCache.update: slot positions[t] of row t / S
        T* row = qkv.data_ptr<T>() + t * NQKV;
        rotate(row, Hq + Hkv, D, cos.data() + t * half, sin.data() + t * half);
        const int64_t b = t / S;
        for (int64_t kv = 0; kv < Hkv; ++kv) {
          KV* key_slot = key_cache.data_ptr<KV>() + b * key_cache.stride(0) + kv * key_cache.stride(1) +
                         positions[t] * key_cache.stride(2);
          KV* value_slot = value_cache.data_ptr<KV>() + b * value_cache.stride(0) + kv * value_cache.stride(1) +
                           positions[t] * value_cache.stride(2);
          store_slot(row + NQ + kv * D, D, key_slot);
          store_slot(row + NQ + (Hkv + kv) * D, D, value_slot);
        }
      }
    });
    at::Tensor q = heads.narrow(1, 0, Hq), k, v, y;
    if (mask.has_value()) {  // the cache's first kv_length slots
      k = key_cache.narrow(0, 0, B).narrow(2, 0, kv_length);
      v = value_cache.narrow(0, 0, B).narrow(2, 0, kv_length);
    } else {  // a prompt's first chunk: causal over its own keys and values, in T (see Attention.forward)
      k = heads.narrow(1, Hq, Hkv);
      v = heads.narrow(1, Hq + Hkv, Hkv);
    }
    if constexpr (std::is_same_v<T, float>) {  // as Attention.forward: float32 queries through prefill_attention
      y = prefill_attention_reusing(q, k, v, mask, 1.0 / std::sqrt(static_cast<double>(D)), visible).transpose(1, 2);
    } else {  // bf16: SDPA (AMX's where the CPU has it)
      if (kv_dtype == at::kHalf) k = k.to(dtype), v = v.to(dtype);  // a half cache: SDPA in the model's dtype
      y = at::scaled_dot_product_attention(q.to(k.scalar_type()), k, v, mask, 0.0, !mask.has_value(), std::nullopt,
                                           Hkv != Hq)
              .to(dtype)
              .transpose(1, 2)
              .contiguous();
    }  // y: (B, S, Hq, D)
    blocks_linear(y.data_ptr<T>(), rows, w[2], biases.get(4 * l + 1), out.data_ptr<T>());
    add_out();
    norm(w[3]);
    blocks_linear(h.data_ptr<T>(), rows, w[4], biases.get(4 * l + 2), up.data_ptr<T>());
    for_rows(rows, [&](int64_t begin, int64_t end) {
      swiglu(up.data_ptr<T>() + begin * 2 * I, end - begin, I, act.data_ptr<T>() + begin * I);
    });
    blocks_linear(act.data_ptr<T>(), rows, w[5], biases.get(4 * l + 3), out.data_ptr<T>());
    add_out();
  }
}

// A prompt chunk through all L layers, as the eager layers take it: x (B, S, hidden), its tokens' embeddings, float32
// or bfloat16; positions (B, S) int64, each below kv_length, where each token's key and value go; mask None (a
// prompt's first chunk, every row at slots 0..S-1: causal attention over the chunk itself) or bool (B or 1, 1, S,
// kv_length) over the cache's first kv_length slots; keys, values, weights, biases, inv_freq, n_heads and eps as
// decode_layers'. Returns the hidden states after the last layer, (B, S, hidden) in x's dtype.
at::Tensor prefill_layers(const at::Tensor& x, const at::Tensor& positions, const std::optional<at::Tensor>& mask,
                          at::TensorList keys, at::TensorList values, int64_t kv_length, at::TensorList weights,
                          const c10::List<std::optional<at::Tensor>>& biases, const at::Tensor& inv_freq,
                          int64_t n_heads, double eps) {
  TORCH_CHECK(x.dim() == 3 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  x.size(2) % 32 == 0,
              "prefill_layers: x must be (B, S, hidden) float32 or bfloat16, hidden a multiple of 32");
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2);
  const int64_t I = check_layers("prefill_layers", x.scalar_type(), B, H, keys, values, kv_length, weights, biases,
                                 inv_freq, n_heads);
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == B, "prefill_layers: positions must be (B, S)");
  const at::Tensor rows_positions = positions.contiguous();
  const int64_t* position = checked_positions("prefill_layers", rows_positions, B * S, kv_length);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && (m.size(0) == 1 || m.size(0) == B) &&
                    m.size(1) == 1 && m.size(2) == S && m.size(3) == kv_length,
                "prefill_layers: mask must be bool (B or 1, 1, S, kv_length)");
  } else {
    TORCH_CHECK(kv_length == S, "prefill_layers: without a mask the chunk is a prompt's first, kv_length == S");
  }
  at::Tensor hidden = x.clone(at::MemoryFormat::Contiguous);
  with_types(x.scalar_type(), keys[0].scalar_type(), [&](auto model_type, auto cache_type) {
    prefill_layers_impl<decltype(model_type), decltype(cache_type)>(hidden, position, mask, keys, values, kv_length,
                                                                    weights, biases, inv_freq.data_ptr<float>(),
                                                                    n_heads, I, static_cast<float>(eps));
  });
  return hidden;
}

}  // namespace

TORCH_LIBRARY(gpt4_kernels, lib) {
  lib.def("w4a8_matmul(Tensor x, Tensor blocks) -> Tensor");
  lib.def("w4a8_dequantize(Tensor blocks, ScalarType dtype) -> Tensor");
  lib.def("q5_matmul(Tensor x, Tensor blocks) -> Tensor");
  lib.def("q5_dequantize(Tensor blocks, ScalarType dtype) -> Tensor");
  lib.def("q5k_matmul(Tensor x, Tensor blocks) -> Tensor");
  lib.def("q5k_dequantize(Tensor blocks, ScalarType dtype) -> Tensor");
  lib.def("q6_matmul(Tensor x, Tensor blocks) -> Tensor");
  lib.def("q6_dequantize(Tensor blocks, ScalarType dtype) -> Tensor");
  lib.def("q8_matmul(Tensor x, Tensor blocks) -> Tensor");
  lib.def("q8_dequantize(Tensor blocks, ScalarType dtype) -> Tensor");
  lib.def("q8_rows(Tensor blocks, Tensor ids, ScalarType dtype) -> Tensor");
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  lib.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  lib.def(
      "decode_layers(Tensor x, Tensor positions, Tensor? mask, Tensor(a!)[] keys, Tensor(b!)[] values, int kv_length, "
      "Tensor[] weights, Tensor?[] biases, Tensor inv_freq, int n_heads, float eps) -> Tensor");
  lib.def(
      "prefill_layers(Tensor x, Tensor positions, Tensor? mask, Tensor(a!)[] keys, Tensor(b!)[] values, "
      "int kv_length, Tensor[] weights, Tensor?[] biases, Tensor inv_freq, int n_heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt4_kernels, CPU, lib) {
  lib.impl("w4a8_matmul", &w4a8_matmul);
  lib.impl("w4a8_dequantize", &w4a8_dequantize);
  lib.impl("q5_matmul", &q5_matmul);
  lib.impl("q5_dequantize", &q5_dequantize);
  lib.impl("q5k_matmul", &q5k_matmul);
  lib.impl("q5k_dequantize", &q5k_dequantize);
  lib.impl("q6_matmul", &q6_matmul);
  lib.impl("q6_dequantize", &q6_dequantize);
  lib.impl("q8_matmul", &q8_matmul);
  lib.impl("q8_dequantize", &q8_dequantize);
  lib.impl("q8_rows", &q8_rows);
  lib.impl("decode_attention", &decode_attention);
  lib.impl("prefill_attention", &prefill_attention);
  lib.impl("decode_layers", &decode_layers);
  lib.impl("prefill_layers", &prefill_layers);
}
