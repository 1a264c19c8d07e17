// Weight-streaming products of the decode step (tensorpar.layers.fused): y = x W^T for a few rows
// of x, W read once, row by row, by one parallel region over the output rows. Float32 and
// bfloat16 weights [N, K], and weights as integer codes in groups with a float16 scale and zero
// each, W[n, k] = scale[n, g] c[n, k] + zero[n, g], so that
//   y[t, n] = sum_g scale[n, g] * dot(c[n, g], x[t, g]) + zero[n, g] * sum(x[t, g]),
// codes signed 8-bit, or 4-bit packed two to a byte (per group of 32: byte j holds element j in
// its low nibble and element j + 16 in its high one, as GGUF's Q4 blocks do).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include "kernels.h"

#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t MAX_ROWS = 8;  // rows of x a pass keeps accumulators for

#if defined(__AVX512F__)
constexpr int V = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vload(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline vec vload_i8(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vset(float v) { return _mm512_set1_ps(v); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
// the lane sums of V vectors as one vector (in an order ``hsums`` undoes): a tree per vector,
// lanes i + 8, then i + 4, i + 2, i + 1, whatever vectors share the batch
inline vec vsums(const vec* v) {
  vec w[8], x[4], y[2];
  for (int p = 0; p < 8; ++p)
    w[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0x44), _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0xEE));
  for (int p = 0; p < 4; ++p)
    x[p] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * p], w[2 * p + 1], 0x88), _mm512_shuffle_f32x4(w[2 * p], w[2 * p + 1], 0xDD));
  for (int p = 0; p < 2; ++p)
    y[p] = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(x[2 * p]), _mm512_castps_pd(x[2 * p + 1]))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(x[2 * p]), _mm512_castps_pd(x[2 * p + 1]))));
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
// 16 codes of a 32-group: the low nibbles of 16 bytes, or their high nibbles
inline void vload_nibbles(const uint8_t* p, vec& lo, vec& hi) {
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
#elif defined(__AVX2__)
constexpr int V = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline vec vload_i8(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vset(float v) { return _mm256_set1_ps(v); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
// the lane sums of V vectors as one vector (in an order ``hsums`` undoes): a tree per vector,
// lanes i + 4, then i + 2, i + 1, whatever vectors share the batch
inline vec vsums(const vec* v) {
  vec w[4], x[2];
  for (int p = 0; p < 4; ++p)
    w[p] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * p], v[2 * p + 1], 0x20), _mm256_permute2f128_ps(v[2 * p], v[2 * p + 1], 0x31));
  for (int p = 0; p < 2; ++p)
    x[p] = _mm256_add_ps(
        _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(w[2 * p]), _mm256_castps_pd(w[2 * p + 1]))),
        _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(w[2 * p]), _mm256_castps_pd(w[2 * p + 1]))));
  return _mm256_add_ps(_mm256_shuffle_ps(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)), _mm256_shuffle_ps(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
#else
#error "the fused CPU kernels need AVX2 or AVX-512"
#endif

template <typename T>
inline float scalar(const T* p, int64_t i) { return static_cast<float>(p[i]); }

inline float half_to_float(c10::Half h) { return _cvtsh_ss(h.x); }  // F16C, not c10's bit-twiddling

// where each vector's sum lands in ``vsums``' result (found once, by probing)
inline const std::array<int, V>& vsums_slots() {
  static const std::array<int, V> slots = [] {
    alignas(64) float probe[V][V] = {};
    vec v[V];
    for (int i = 0; i < V; ++i) {
      probe[i][0] = static_cast<float>(i + 1);
      v[i] = vload(probe[i]);
    }
    alignas(64) float got[V];
    vstore(got, vsums(v));
    std::array<int, V> at{};
    for (int k = 0; k < V; ++k) at[static_cast<int>(got[k]) - 1] = k;
    return at;
  }();
  return slots;
}

// out[i] = the sum of v[i]'s lanes, i < count: V vectors at a time, each summed by one fixed tree
inline void hsums(const vec* v, int count, float* out) {
  const auto& slots = vsums_slots();
  for (int b = 0; b < count; b += V) {
    vec batch[V];
    for (int i = 0; i < V; ++i) batch[i] = b + i < count ? v[b + i] : vzero();
    alignas(64) float got[V];
    vstore(got, vsums(batch));
    for (int i = 0; i < V && b + i < count; ++i) out[b + i] = got[slots[i]];
  }
}

// rows [n0, n1) of y [T, N] = x [T, K] W^T (W [N, K] float or bfloat16), T <= MAX_ROWS (a
// template argument, so that the accumulators live in registers). Each y[t, n] is a dot product
// in one order: two chains of V lanes along K (even and odd blocks of V), each chain's lanes
// summed by one fixed tree (``hsums``), the two added, then the columns past the last whole
// block one by one; independent of T, of the rows [n0, n1) and of the outputs computed beside
// it (NB output rows at a time: about V accumulators, their lane sums batched).
// (``ld``: the distance between rows of x and of W, K unless a product over K of wider rows)
template <int T, typename W>
void dense_rows(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t ld = -1) {
  if (ld < 0) ld = K;
  constexpr int NB = T >= V / 2 ? 1 : V / 2 / T;
  const int64_t body = K / V * V;
  for (int64_t n = n0; n < n1; n += NB) {
    const W* row[NB];
    for (int j = 0; j < NB; ++j) row[j] = w + std::min(n + j, n1 - 1) * ld;  // (past n1: a repeat, unused)
    vec acc[2 * NB * T];  // [j][chain][t]
    for (int i = 0; i < 2 * NB * T; ++i) acc[i] = vzero();
    int64_t k = 0;
    for (; k + 2 * V <= body; k += 2 * V) {  // two chains per row of x: FMA latency hidden
      for (int j = 0; j < NB; ++j) {
        const vec a = vload(row[j] + k), b = vload(row[j] + k + V);
        for (int t = 0; t < T; ++t) {
          acc[(2 * j) * T + t] = vfma(a, vload(x + t * ld + k), acc[(2 * j) * T + t]);
          acc[(2 * j + 1) * T + t] = vfma(b, vload(x + t * ld + k + V), acc[(2 * j + 1) * T + t]);
        }
      }
    }
    for (; k < body; k += V) {
      for (int j = 0; j < NB; ++j) {
        const vec a = vload(row[j] + k);
        for (int t = 0; t < T; ++t) acc[(2 * j) * T + t] = vfma(a, vload(x + t * ld + k), acc[(2 * j) * T + t]);
      }
    }
    float sums[2 * NB * T];
    hsums(acc, 2 * NB * T, sums);
    for (int j = 0; j < NB && n + j < n1; ++j) {
      for (int t = 0; t < T; ++t) {
        float s = sums[(2 * j) * T + t] + sums[(2 * j + 1) * T + t];
        for (int64_t c = body; c < K; ++c) s += scalar(row[j], c) * x[t * ld + c];
        y[t * N + n + j] = s;
      }
    }
  }
}

// rows [n0, n1) of y = x W^T for W as codes in groups (see the file's comment); sums [T, K / g]
// holds each group's sum of x (for the zero terms). Independent accumulator chains (low and high
// nibbles, even and odd groups or vectors) keep several FMAs in flight: one chain would wait out
// the FMA latency on every 16 codes.
template <int T>
void codes_rows(const float* x, const void* codes, int64_t bits, const c10::Half* scale, const c10::Half* zero,
                const float* sums, float* y, int64_t K, int64_t N, int64_t g, int64_t n0, int64_t n1) {
  constexpr int P = T <= 4 ? 2 : 1;  // chains per row of x and nibble half, as registers allow
  const int64_t groups = K / g;
  for (int64_t n = n0; n < n1; ++n) {
    const c10::Half* sc = scale + n * groups;
    vec acc[P][2][T];
    for (int p = 0; p < P; ++p)
      for (int64_t t = 0; t < T; ++t) acc[p][0][t] = acc[p][1][t] = vzero();
    if (bits == 8) {
      const int8_t* row = static_cast<const int8_t*>(codes) + n * K;
      int64_t i = 0;
      for (int64_t q = 0; q < groups; ++q) {
        const vec s = vset(half_to_float(sc[q]));
        for (int64_t k = q * g; k < (q + 1) * g; k += V, ++i) {
          const vec c = vmul(vload_i8(row + k), s);
          vec* a = acc[(i >> 1) % P][i & 1];
          for (int64_t t = 0; t < T; ++t) a[t] = vfma(c, vload(x + t * K + k), a[t]);
        }
      }
    } else {
      const uint8_t* row = static_cast<const uint8_t*>(codes) + n * (K / 2);
      int64_t i = 0;
      for (int64_t q = 0; q < groups; ++q) {
        const vec s = vset(half_to_float(sc[q]));
        for (int64_t k = q * g; k < (q + 1) * g; k += 32) {
          const uint8_t* b = row + k / 2;
          for (int64_t h = 0; h < 16; h += V, ++i) {  // 16 bytes: elements k + h.. (low) and k + 16 + h.. (high)
            vec lo, hi;
#if defined(__AVX512F__)
            vload_nibbles(b + h, lo, hi);
#else
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(b + h)));
            lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
            hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
#endif
            lo = vmul(lo, s);
            hi = vmul(hi, s);
            vec(&a)[2][T] = acc[i % P];
            for (int64_t t = 0; t < T; ++t) {
              a[0][t] = vfma(lo, vload(x + t * K + k + h), a[0][t]);
              a[1][t] = vfma(hi, vload(x + t * K + k + 16 + h), a[1][t]);
            }
          }
        }
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      vec total = vzero();
      for (int p = 0; p < P; ++p) total = vadd(total, vadd(acc[p][0][t], acc[p][1][t]));
      float s = vsum(total);
      if (zero != nullptr) {
        const c10::Half* z = zero + n * groups;
        const float* sx = sums + t * groups;
        for (int64_t q = 0; q < groups; ++q) s += half_to_float(z[q]) * sx[q];
      }
      y[t * N + n] = s;
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool VNNI = true;
// The order a pair of 32-groups of 4-bit codes unpacks to (low nibbles of both, then high ones):
// b0[0:16] b1[0:16] b0[16:32] b1[16:32]; each int32 lane of a VNNI dot product sums 4 of them, so
// lanes 0-3 and 8-11 belong to b0, 4-7 and 12-15 to b1.
const __m512i PAIR_LANES = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);

// x [T, K] -> xq [T, K] int8 (pairs of 32-blocks in the unpacked codes' order) and dx [T, K / 64, 16]
// (each block's scale d = max|x_b| / 127, spread over its lanes): x_b ~ d q_b, as llama.cpp's Q8 blocks.
void quantize_pairs(const float* x, int64_t T, int64_t K, int8_t* xq, float* dx) {
  const int64_t pairs = K / 64;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t p = 0; p < pairs; ++p) {
      const float* b = x + t * K + p * 64;
      float d[2], inv[2];
      for (int j = 0; j < 2; ++j) {
        const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(b + 32 * j)), c = _mm512_abs_ps(_mm512_loadu_ps(b + 32 * j + 16));
        d[j] = _mm512_reduce_max_ps(_mm512_max_ps(a, c)) / 127.f;
        inv[j] = d[j] > 0.f ? 1.f / d[j] : 0.f;
      }
      int8_t* o = xq + t * K + p * 64;
      for (int j = 0; j < 2; ++j) {  // block j: elements 0-15 to o[16 j..], 16-31 to o[32 + 16 j..]
        for (int h = 0; h < 2; ++h) {
          const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(b + 32 * j + 16 * h), _mm512_set1_ps(inv[j])));
          _mm_storeu_si128((__m128i*)(o + 32 * h + 16 * j), _mm512_cvtsepi32_epi8(q));
        }
      }
      _mm512_storeu_ps(dx + (t * pairs + p) * 16, _mm512_permutexvar_ps(PAIR_LANES, _mm512_castps128_ps512(_mm_setr_ps(d[0], d[1], 0.f, 0.f))));
    }
  }
}

// rows [n0, n1) of y = x W^T for 4-bit codes in groups of 32 or of a multiple of 64, x as quantize_pairs
// gives it: per pair of blocks one VNNI dot product (u8 codes x s8 activations) per row of x, its
// int32 sums scaled by the weights' and the activations' block scales.
template <int T>
void codes4_rows_vnni(const int8_t* xq, const float* dx, const uint8_t* codes, const c10::Half* scale,
                      const c10::Half* zero, const float* sums, float* y, int64_t K, int64_t N, int64_t g, int64_t n0,
                      int64_t n1) {
  const int64_t groups = K / g, pairs = K / 64;
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * (K / 2);
    const c10::Half* sc = scale + n * groups;
    __m512 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(row + p * 32));
      const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low)),
                                           _mm256_and_si256(_mm256_srli_epi16(v, 4), low), 1);
      __m512 sw;
      if (g == 32) {
        int32_t two;
        std::memcpy(&two, sc + 2 * p, 4);
        sw = _mm512_permutexvar_ps(PAIR_LANES, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(two))));
      } else {
        sw = _mm512_set1_ps(half_to_float(sc[p * 64 / g]));
      }
      for (int t = 0; t < T; ++t) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(xq + t * K + p * 64));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sw, _mm512_loadu_ps(dx + (t * pairs + p) * 16)),
                                 acc[t]);
      }
    }
    for (int t = 0; t < T; ++t) {
      float s = _mm512_reduce_add_ps(acc[t]);
      if (zero != nullptr) {
        const c10::Half* z = zero + n * groups;
        const float* sx = sums + t * groups;
        for (int64_t q = 0; q < groups; ++q) s += half_to_float(z[q]) * sx[q];
      }
      y[t * N + n] = s;
    }
  }
}
#else
constexpr bool VNNI = false;
#endif

// f.template operator()<T>() for T = rows (1..MAX_ROWS)
template <typename F>
void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// the output rows each task takes: whole cache lines of y, about 64 KiB of weights
int64_t grain(int64_t N, int64_t row_bytes) { return std::max<int64_t>(16, (65536 / std::max<int64_t>(row_bytes, 1)) / 16 * 16); }

at::Tensor finish(at::Tensor y, const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (bias.has_value()) y.add_(*bias);
  return y.to(x.scalar_type());
}

}  // namespace

namespace tensorpar {

// x [T, K] (float32 or bfloat16) -> x W^T + b [T, N] in x's dtype, W [N, K] float32 or bfloat16
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "dense_linear: x [T, K], W [N, K]");
  TORCH_CHECK(weight.is_contiguous(), "dense_linear: W must be contiguous [N, K]");
  const auto xf = x.to(at::kFloat).contiguous();
  const int64_t T = x.size(0), K = x.size(1), N = weight.size(0);
  auto y = at::empty({T, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = K * weight.element_size();
  at::parallel_for(0, N, grain(N, row_bytes), [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = 0; t0 < T; t0 += MAX_ROWS) {
      with_rows(std::min(MAX_ROWS, T - t0), [&](auto rows) {
        constexpr int R = decltype(rows)::value;
        if (weight.scalar_type() == at::kFloat) {
          dense_rows<R>(xp + t0 * K, weight.data_ptr<float>(), yp + t0 * N, K, N, n0, n1);
        } else {
          dense_rows<R>(xp + t0 * K, weight.data_ptr<c10::BFloat16>(), yp + t0 * N, K, N, n0, n1);
        }
      });
    }
  });
  return finish(y, bias, x);
}


// x [T, K], W [N, K] float32, spans [C, 2] (int64 column ranges) -> [C, T, N]: each span's partial
// product x[:, a:b] W[:, a:b]^T, every value summed in the order dense_linear sums a product over
// b - a columns (deterministic mode's reduction grid)
at::Tensor chunk_products(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& spans) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "chunk_products: x [T, K], W [N, K]");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kFloat, "chunk_products: W float32 [N, K]");
  TORCH_CHECK(spans.dim() == 2 && spans.size(1) == 2 && spans.scalar_type() == at::kLong, "chunk_products: spans [C, 2]");
  const auto xf = x.to(at::kFloat).contiguous();
  const auto sp = spans.contiguous();
  const int64_t T = x.size(0), K = x.size(1), N = weight.size(0), C = spans.size(0);
  auto y = at::empty({C, T, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const int64_t* bp = sp.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(N, K * 4), [&](int64_t n0, int64_t n1) {
    for (int64_t nb = n0; nb < n1; nb += 16) {  // 16 rows of W, read from memory once for every chunk
      const int64_t ne = std::min(n1, nb + 16);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t a = bp[2 * c], len = bp[2 * c + 1] - a;
        for (int64_t t0 = 0; t0 < T; t0 += MAX_ROWS) {
          with_rows(std::min(MAX_ROWS, T - t0), [&](auto rows) {
            dense_rows<decltype(rows)::value>(xp + t0 * K + a, wp + a, yp + (c * T + t0) * N, len, N, nb, ne, K);
          });
        }
      }
    }
  });
  return y;
}

// q [B, h, S, d], keys and values [B, h, L, d] float32, visible [B or 1, S, L] bool, scale ->
// softmax(q k^T * scale, over the visible keys) v [B, h, S, d]. Every sum runs over its terms
// in one order that no shape changes: a score is a chain of FMAs over d (V keys at a time, one
// per lane, from the head's keys transposed); e = exp(score - max) (the max is exact in any
// order); the output and the normalizer add key after key, so a query's result does not depend
// on how many keys follow it (masked), rows share its step, or heads a rank holds.
at::Tensor grid_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                          const at::Tensor& visible, double scale) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.sizes() == keys.sizes() && q.size(3) == keys.size(3) &&
                  q.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat,
              "grid_attention: float32 q [B, h, S, d], keys and values [B, h, L, d]");
  const auto qc = q.contiguous(), kc = keys.contiguous(), vc = values.contiguous();
  const auto mc = visible.to(at::kBool).contiguous();
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), L = keys.size(2);
  TORCH_CHECK(mc.dim() == 3 && mc.size(1) == S && mc.size(2) == L && (mc.size(0) == 1 || mc.size(0) == B),
              "grid_attention: visible [B or 1, S, L]");
  auto out = at::empty_like(qc);
  const float* qp = qc.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  const bool* mp = mc.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t Lp = (L + V - 1) / V * V;
  at::parallel_for(0, B * H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> kt(D * Lp), e(Lp);
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / H;
      const float* kb = kp + bh * L * D;
      const float* vb = vp + bh * L * D;
      for (int64_t c = 0; c < D; ++c) {  // the head's keys transposed [d, Lp], zero past L
        for (int64_t l = 0; l < L; ++l) kt[c * Lp + l] = kb[l * D + c];
        for (int64_t l = L; l < Lp; ++l) kt[c * Lp + l] = 0.f;
      }
      for (int64_t s = 0; s < S; ++s) {
        const int64_t r = bh * S + s;
        const float* qi = qp + r * D;
        const bool* m = mp + ((mc.size(0) == 1 ? 0 : b) * S + s) * L;
        int64_t last = L;  // past the last visible key
        while (last > 0 && !m[last - 1]) --last;
        for (int64_t l0 = 0; l0 < last; l0 += V) {
          vec acc = vzero();
          for (int64_t c = 0; c < D; ++c) acc = vfma(vset(qi[c]), vload(kt.data() + c * Lp + l0), acc);
          vstore(e.data() + l0, acc);
        }
        float best = -INFINITY;
        for (int64_t l = 0; l < last; ++l) {
          e[l] = m[l] ? e[l] * sc : -INFINITY;
          best = std::max(best, e[l]);
        }
        float* o = op + r * D;
        for (int64_t c = 0; c < D; ++c) o[c] = 0.f;
        float total = 0.f;
        for (int64_t l = 0; l < last; ++l) {
          if (!m[l]) continue;
          const float w = std::exp(e[l] - best);
          total += w;
          for (int64_t c = 0; c < D; ++c) o[c] += w * vb[l * D + c];
        }
        for (int64_t c = 0; c < D; ++c) o[c] /= total;
      }
    }
  });
  return out;
}

// the gradients of grid_attention: (dq, dkeys, dvalues) from grad_out [B, h, S, d]. Each head
// runs on one thread, query after query: the probabilities p are recomputed as the forward
// computes them; dp[l] = grad_out . v_l; ds = p (dp - sum_l p dp) * scale; dq sums key after key,
// dkeys and dvalues query after query: one order that no shape or thread count changes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> grid_attention_backward(const at::Tensor& q, const at::Tensor& keys,
                                                                      const at::Tensor& values, const at::Tensor& visible,
                                                                      double scale, const at::Tensor& grad) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.sizes() == keys.sizes() && grad.sizes() == q.sizes() &&
                  q.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat && grad.scalar_type() == at::kFloat,
              "grid_attention_backward: float32 q and grad [B, h, S, d], keys and values [B, h, L, d]");
  const auto qc = q.contiguous(), kc = keys.contiguous(), vc = values.contiguous(), gc = grad.contiguous();
  const auto mc = visible.to(at::kBool).contiguous();
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), L = keys.size(2);
  TORCH_CHECK(mc.dim() == 3 && mc.size(1) == S && mc.size(2) == L && (mc.size(0) == 1 || mc.size(0) == B),
              "grid_attention_backward: visible [B or 1, S, L]");
  auto dq = at::zeros_like(qc), dk = at::zeros_like(kc), dv = at::zeros_like(vc);
  const float *qp = qc.data_ptr<float>(), *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>(), *gp = gc.data_ptr<float>();
  const bool* mp = mc.data_ptr<bool>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> e(L), dp(L);
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / H;
      const float* kb = kp + bh * L * D;
      const float* vb = vp + bh * L * D;
      float* dkb = dkp + bh * L * D;
      float* dvb = dvp + bh * L * D;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t r = bh * S + s;
        const float* qi = qp + r * D;
        const float* gi = gp + r * D;
        float* dqi = dqp + r * D;
        const bool* m = mp + ((mc.size(0) == 1 ? 0 : b) * S + s) * L;
        float best = -INFINITY;
        for (int64_t l = 0; l < L; ++l) {
          float dot = 0.f;
          for (int64_t c = 0; c < D; ++c) dot += qi[c] * kb[l * D + c];
          e[l] = m[l] ? dot * sc : -INFINITY;
          best = std::max(best, e[l]);
        }
        float total = 0.f;
        for (int64_t l = 0; l < L; ++l) {
          e[l] = m[l] ? std::exp(e[l] - best) : 0.f;
          total += e[l];
        }
        float rowdot = 0.f;
        for (int64_t l = 0; l < L; ++l) {
          if (!m[l]) continue;
          float g = 0.f;
          for (int64_t c = 0; c < D; ++c) g += gi[c] * vb[l * D + c];
          dp[l] = g;
          rowdot += (e[l] / total) * g;
        }
        for (int64_t l = 0; l < L; ++l) {
          if (!m[l]) continue;
          const float p = e[l] / total, ds = p * (dp[l] - rowdot) * sc;
          for (int64_t c = 0; c < D; ++c) {
            dqi[c] += ds * kb[l * D + c];
            dkb[l * D + c] += ds * qi[c];
            dvb[l * D + c] += p * gi[c];
          }
        }
      }
    }
  });
  return {dq, dk, dv};
}

// parts [C, ...] -> parts[0] + parts[1] + ... + parts[C - 1], added in that order
at::Tensor ordered_sum(const at::Tensor& parts) {
  TORCH_CHECK(parts.dim() >= 1 && parts.size(0) >= 1 && parts.scalar_type() == at::kFloat, "ordered_sum: float32 [C, ...]");
  const auto p = parts.contiguous();
  const int64_t C = p.size(0), M = p.numel() / C;
  auto y = p[0].clone();
  float* yp = y.data_ptr<float>();
  const float* pp = p.data_ptr<float>();
  at::parallel_for(0, M, 4096, [&](int64_t m0, int64_t m1) {
    for (int64_t c = 1; c < C; ++c)
      for (int64_t m = m0; m < m1; ++m) yp[m] += pp[c * M + m];
  });
  return y;
}


// x [T, K] -> x W^T [T, N] for W as ``codes`` (int8 [N, K], or uint8 [N, K / 2] of 4-bit codes),
// ``scale`` and optional ``zero`` [N, K / group] float16
at::Tensor codes_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                        const c10::optional<at::Tensor>& zero, int64_t group, int64_t bits, bool quantize_x) {
  const int64_t T = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(x.dim() == 2 && (bits == 8 || bits == 4), "codes_linear: x [T, K], 8- or 4-bit codes");
  TORCH_CHECK(K % group == 0 && group % (bits == 4 ? 32 : V) == 0, "codes_linear: groups of a multiple of ",
              bits == 4 ? 32 : V, " dividing K");
  TORCH_CHECK(codes.is_contiguous() && codes.size(1) == (bits == 4 ? K / 2 : K) &&
                  codes.scalar_type() == (bits == 4 ? at::kByte : at::kChar),
              "codes_linear: codes must be int8 [N, K] or uint8 [N, K / 2]");
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kHalf && scale.numel() == N * (K / group),
              "codes_linear: scale float16 [N, K / group]");
  const auto xf = x.to(at::kFloat).contiguous();
  at::Tensor sums;
  if (zero.has_value()) {
    TORCH_CHECK(zero->is_contiguous() && zero->scalar_type() == at::kHalf && zero->numel() == N * (K / group),
                "codes_linear: zero float16 [N, K / group]");
    sums = xf.view({T, K / group, group}).sum(-1).contiguous();
  }
  auto y = at::empty({T, N}, xf.options());
  const int64_t row_bytes = bits == 4 ? K / 2 : K;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (quantize_x && bits == 4 && K % 64 == 0 && (group == 32 || group % 64 == 0)) {
    auto xq = at::empty({T, K}, xf.options().dtype(at::kChar));
    auto dx = at::empty({T, K / 64, 16}, xf.options());
    quantize_pairs(xf.data_ptr<float>(), T, K, xq.data_ptr<int8_t>(), dx.data_ptr<float>());
    at::parallel_for(0, N, grain(N, row_bytes), [&](int64_t n0, int64_t n1) {
      for (int64_t t0 = 0; t0 < T; t0 += MAX_ROWS) {
        with_rows(std::min(MAX_ROWS, T - t0), [&](auto rows) {
          codes4_rows_vnni<decltype(rows)::value>(xq.data_ptr<int8_t>() + t0 * K, dx.data_ptr<float>() + t0 * (K / 4),
                                                  codes.data_ptr<uint8_t>(), scale.data_ptr<c10::Half>(),
                                                  zero.has_value() ? zero->data_ptr<c10::Half>() : nullptr,
                                                  zero.has_value() ? sums.data_ptr<float>() + t0 * (K / group) : nullptr,
                                                  y.data_ptr<float>() + t0 * N, K, N, group, n0, n1);
        });
      }
    });
    return y.to(x.scalar_type());
  }
#endif
  at::parallel_for(0, N, grain(N, row_bytes), [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = 0; t0 < T; t0 += MAX_ROWS) {
      with_rows(std::min(MAX_ROWS, T - t0), [&](auto rows) {
        codes_rows<decltype(rows)::value>(xf.data_ptr<float>() + t0 * K, codes.data_ptr(), bits,
                                          scale.data_ptr<c10::Half>(),
                                          zero.has_value() ? zero->data_ptr<c10::Half>() : nullptr,
                                          zero.has_value() ? sums.data_ptr<float>() + t0 * (K / group) : nullptr,
                                          y.data_ptr<float>() + t0 * N, K, N, group, n0, n1);
      });
    }
  });
  return y.to(x.scalar_type());
}

}  // namespace tensorpar


TORCH_LIBRARY_FRAGMENT(tensorpar, m) {
  m.def("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("chunk_products(Tensor x, Tensor weight, Tensor spans) -> Tensor");
  m.def("ordered_sum(Tensor parts) -> Tensor");
  m.def("grid_attention(Tensor q, Tensor keys, Tensor values, Tensor visible, float scale) -> Tensor");
  m.def("grid_attention_backward(Tensor q, Tensor keys, Tensor values, Tensor visible, float scale, Tensor grad) -> (Tensor, Tensor, Tensor)");
  m.def("codes_linear(Tensor x, Tensor codes, Tensor scale, Tensor? zero, int group, int bits, bool quantize_x) -> Tensor");
  m.def("vnni() -> bool", []() { return VNNI; });
}

TORCH_LIBRARY_IMPL(tensorpar, CPU, m) {
  m.impl("dense_linear", tensorpar::dense_linear);
  m.impl("chunk_products", tensorpar::chunk_products);
  m.impl("ordered_sum", tensorpar::ordered_sum);
  m.impl("grid_attention", tensorpar::grid_attention);
  m.impl("grid_attention_backward", tensorpar::grid_attention_backward);
  m.impl("codes_linear", tensorpar::codes_linear);
}
