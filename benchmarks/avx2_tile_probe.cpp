// What bounds the AVX2 4-bit tile (gpt4/kernels/w4a8.cpp's tile<Q4Block>, the 8-row and prompt matmuls) on a CPU:
// the issue rates of its instructions alone, then the tile's inner loop rebuilt alone and altered one way at a time.
// Single-threaded, everything in L1/L2, so only the core's instruction issue is measured. Variants C, D, F and G
// compute wrong sums on purpose: they time a loop without an instruction class, as bounds (docs/performance.md, "What
// the AVX2 tile's instructions cost"). G and H time the epilogue of a format with integer group scales (as GGUF's
// K-quants have under a float scale per super-block), which would need one activation scale per 9 groups.
//
//     g++ -O3 -mavx2 -mfma -mf16c benchmarks/avx2_tile_probe.cpp -o /tmp/probe && /tmp/probe
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// ---- issue rates: 8 independent chains, so latency does not bound them
#define KEEP8(p) \
  asm volatile("" ::"x"(p##0), "x"(p##1), "x"(p##2), "x"(p##3), "x"(p##4), "x"(p##5), "x"(p##6), "x"(p##7))
// (distinct starting values: equal chains would be merged into one by the compiler)
#define DECL8(p, v) \
  __m256i p##0 = v(0), p##1 = v(1), p##2 = v(2), p##3 = v(3), p##4 = v(4), p##5 = v(5), p##6 = v(6), p##7 = v(7)
#define EACH8(S) S(0) S(1) S(2) S(3) S(4) S(5) S(6) S(7)
constexpr long ISSUES = 200000000;

double rate_maddubs(__m256i w) {  // vpmaddubsw alone
#define START(k) _mm256_add_epi8(w, _mm256_set1_epi8(k))
  DECL8(a, START);
  const auto start = std::chrono::steady_clock::now();
  for (long i = 0; i < ISSUES / 8; ++i) {
#define S(k) a##k = _mm256_maddubs_epi16(a##k, w);
    EACH8(S)
#undef S
    KEEP8(a);
  }
  return ISSUES / seconds_since(start);
}

double rate_maddubs_broadcast_add(__m256i w, const int32_t* x) {  // the tile's triple: broadcast, multiply, add
  DECL8(a, START);
  const auto start = std::chrono::steady_clock::now();
  for (long i = 0; i < ISSUES / 8; ++i) {
    asm volatile("" : "+r"(x));
#define S(k) a##k = _mm256_add_epi16(a##k, _mm256_maddubs_epi16(w, _mm256_set1_epi32(x[k])));
    EACH8(S)
#undef S
    KEEP8(a);
  }
  return ISSUES / seconds_since(start);
}

double rate_add_chain() {  // one dependent scalar add a cycle: the clock, where the vCPU has the core to itself
  long v = 0;
  const auto start = std::chrono::steady_clock::now();
  for (long i = 0; i < ISSUES; ++i) asm volatile("add $1, %0" : "+r"(v));
  return ISSUES / seconds_since(start);
}

// ---- the tile: T token rows x one block row (16 weight rows, 2 parts of 8 lanes) x K inputs, weights unpacked
constexpr int G = 18, K = 32 * G, T = 64;  // the default model's 576 inputs
struct Group {  // one part's group of 32 inputs as the kernel unpacks it: q[j] lane r = row r's inputs 4j..4j+3
  __m256i q[8];
  __m256 d, m;
  __m256i scale;  // (G, H) each row's scale as an integer, twice in each 32-bit lane
};
alignas(64) Group W[2][G];
alignas(64) int8_t X[T * K];
alignas(64) __m256i XB[T * G * 8];  // X's 4-byte pieces broadcast ahead of time (variant C)
alignas(64) float S[T * G], SS[T * G], OUT[T * 16];

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// A: the kernel's structure. B: one broadcast for both parts. C: no broadcasts. D: no float epilogue.
// E: the eight products summed as a tree instead of a chain. F: no m term. G: integer scales (vpmaddwd by each row's
// scale instead of by ones, int32 sums turned to float once per 9 groups), no m term. H: G with the m term in float.
template <char V, int R>
void tile(int t0, int part) {
  __m256 acc[R], off[R];
  __m256i iacc[R];
  for (int t = 0; t < R; ++t) acc[t] = off[t] = _mm256_setzero_ps(), iacc[t] = _mm256_setzero_si256();
  for (int g = 0; g < G; ++g) {
    const Group& w = W[part][g];
    const Group& w2 = W[1][g];
    for (int t = 0; t < R; ++t) {
      const int i = (t0 + t) * G + g;
      const int8_t* xg = X + i * 32;
      __m256i m[8], m2[8];
      for (int j = 0; j < 8; ++j) {
        const __m256i x = V == 'C' ? XB[i * 8 + j] : broadcast4(xg + 4 * j);
        m[j] = _mm256_maddubs_epi16(w.q[j], x);
        if (V == 'B') m2[j] = _mm256_maddubs_epi16(w2.q[j], x);
      }
      __m256i pairs = m[0], pairs2 = m2[0];
      if (V == 'E') {
        pairs = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(m[0], m[1]), _mm256_add_epi16(m[2], m[3])),
                                 _mm256_add_epi16(_mm256_add_epi16(m[4], m[5]), _mm256_add_epi16(m[6], m[7])));
      } else {
        for (int j = 1; j < 8; ++j) pairs = _mm256_add_epi16(pairs, m[j]);
      }
      if (V == 'B') {
        for (int j = 1; j < 8; ++j) pairs2 = _mm256_add_epi16(pairs2, m2[j]);
      }
      if (V == 'G' || V == 'H') {
        iacc[t] = _mm256_add_epi32(iacc[t], _mm256_madd_epi16(pairs, w.scale));
        if (V == 'H') off[t] = _mm256_fmadd_ps(w.m, _mm256_set1_ps(SS[i]), off[t]);
        if (g % 9 == 8) {
          acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[t]), _mm256_mul_ps(w.d, _mm256_set1_ps(S[i])), acc[t]);
          iacc[t] = _mm256_setzero_si256();
        }
        continue;
      }
      const __m256i dot = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
      if (V == 'D') {
        iacc[t] = _mm256_add_epi32(iacc[t], dot);
        continue;
      }
      const __m256 s = _mm256_set1_ps(S[i]), ss = _mm256_set1_ps(SS[i]);
      acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), w.d), s, acc[t]);
      if (V != 'F') off[t] = _mm256_fmadd_ps(w.m, ss, off[t]);
      if (V == 'B') {  // the second part's sums, in the first part's second accumulator
        const __m256i dot2 = _mm256_madd_epi16(pairs2, _mm256_set1_epi16(1));
        off[t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot2), w2.d), s, _mm256_fmadd_ps(w2.m, ss, off[t]));
      }
    }
  }
  for (int t = 0; t < R; ++t) {
    const __m256 y = V == 'D' ? _mm256_cvtepi32_ps(iacc[t]) : _mm256_add_ps(acc[t], off[t]);
    _mm256_storeu_ps(OUT + (t0 + t) * 16 + part * 8, y);
  }
}

template <char V, int R>
double tile_rate() {  // products a second over the T rows and both parts, best of 7 rounds
  double best = 1e30;
  for (int round = 0; round < 7; ++round) {
    const auto start = std::chrono::steady_clock::now();
    for (int repeat = 0; repeat < 2000; ++repeat) {
      for (int t = 0; t < T; t += R) {
        if (V == 'B') {
          tile<V, R>(t, 0);
        } else {
          tile<V, R>(t, 0), tile<V, R>(t, 1);
        }
      }
    }
    best = std::min(best, seconds_since(start));
  }
  return 2000.0 * T * K * 16 / best;
}

}  // namespace

int main(int argc, char**) {
  srand(1);
  for (auto& part : W) {
    for (Group& w : part) {
      auto* bytes = reinterpret_cast<uint8_t*>(w.q);
      for (int k = 0; k < 256; ++k) bytes[k] = rand() & 15;
      w.d = _mm256_set1_ps(0.01f), w.m = _mm256_set1_ps(-0.05f), w.scale = _mm256_set1_epi16(1000);
    }
  }
  for (int i = 0; i < T * K; ++i) X[i] = static_cast<int8_t>(rand() % 255 - 127);
  for (int i = 0; i < T * G * 8; ++i) XB[i] = broadcast4(X + 4 * i);
  for (int i = 0; i < T * G; ++i) S[i] = 0.02f, SS[i] = 0.3f;

  // The VM's vCPU is sometimes shared: rates are printed per second and against vpmaddubsw's own issue rate,
  // measured in the same process, rather than per cycle.
  const int32_t pieces[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  const __m256i w = _mm256_set1_epi8(static_cast<char>(argc));
  const double maddubs = rate_maddubs(w), triples = rate_maddubs_broadcast_add(w, pieces);
  printf("clock by dependent adds: %.2f GHz\n", rate_add_chain() / 1e9);
  printf("vpmaddubsw alone: %.2f G/s\n", maddubs / 1e9);
  printf("vpbroadcastd + vpmaddubsw + vpaddw: %.2f G/s (%.2f of vpmaddubsw alone)\n", triples / 1e9,
         triples / maddubs);
  printf("\n| tile variant | rows | GMAC/s | vpmaddubsw issued, share of its rate alone |\n|---|---:|---:|---:|\n");
  const struct {
    const char* name;
    int rows;
    double (*rate)();
  } variants[] = {
      {"A: as the kernel", 4, tile_rate<'A', 4>},       {"A: as the kernel", 2, tile_rate<'A', 2>},
      {"B: one broadcast, both parts", 2, tile_rate<'B', 2>}, {"C: no broadcasts (bound)", 4, tile_rate<'C', 4>},
      {"D: no float epilogue (bound)", 4, tile_rate<'D', 4>}, {"E: products summed as a tree", 4, tile_rate<'E', 4>},
      {"F: no m term (bound)", 4, tile_rate<'F', 4>},        {"F: no m term (bound)", 2, tile_rate<'F', 2>},
      {"G: integer scales, no m term (bound)", 4, tile_rate<'G', 4>},
      {"G: integer scales, no m term (bound)", 2, tile_rate<'G', 2>},
      {"H: integer scales, m term in float", 4, tile_rate<'H', 4>},
      {"H: integer scales, m term in float", 2, tile_rate<'H', 2>},
  };
  for (const auto& v : variants) {
    const double macs = v.rate();
    printf("| %s | %d | %.1f | %.2f |\n", v.name, v.rows, macs / 1e9, macs / 32 / maddubs);
  }
  printf("(A checksum %g)\n", OUT[5]);
}
