// CPU attention kernels: dlcore::attention_fwd_kernel and attention_bwd_kernel (schemas in
// csrc/dlcore.cpp, contract in dlcore/reference/attention.py).
//
// Flash-style blocking: a task owns a (batch, head, 64-query block) in the forward pass and a
// (batch, kv head, range of 64-key blocks) in the backward pass. Blocks of Q, K, V are converted
// to the accumulation type (float, or double for float64 inputs) in zero-padded scratch buffers,
// the block products QK^T, PV, dO V^T, P^T dO, dS^T Q and dS K run in a register-blocked
// micro-kernel, and the softmax is online, so the extra memory is O(L) (per-row statistics plus
// per-thread block buffers). Key blocks that the causal/window mask hides entirely are skipped.
// Dropout regenerates its mask in the backward pass from Triton's Philox stream
// (tl.rand(seed, offset) with offset ((b*Hq + h)*Lq + i)*Lk + j), so nothing is stored.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/common.h"

namespace dlcore::cpu::attention {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;
constexpr int kTileRows = 4;
constexpr int kTileVecs = 4;
constexpr int64_t kMaxHeadDim = 256;

// 64-byte GCC vectors: one zmm register in the AVX-512 clones. `U` is the unaligned alias used
// to load and store them from plain arrays.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef float U __attribute__((vector_size(64), aligned(4)));
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr int width = 16;
};
template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef double U __attribute__((vector_size(64), aligned(8)));
  static constexpr int width = 8;
};

// C[R x NV*W] (+)= A[R x K] * B[K x NV*W]; A is read through strides (sam, sak) so that the
// same tile serves A and A^T, B and C are row-major. The accumulators stay in registers.
template <typename T, int R, int NV>
__attribute__((always_inline)) inline void gemm_tile(int64_t K, const T* A, int64_t sam,
                                                     int64_t sak, const T* B, int64_t ldb, T* C,
                                                     int64_t ldc, bool accumulate) {
  using V = typename Vec<T>::V;
  using U = typename Vec<T>::U;
  constexpr int W = Vec<T>::width;
  V c[R][NV];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      c[r][v] = accumulate ? *reinterpret_cast<const U*>(C + r * ldc + v * W) : V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const U*>(B + k * ldb + v * W);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const V a = V{} + A[r * sam + k * sak];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(C + r * ldc + v * W) = c[r][v];
}

// C[M x N] (+)= A[M x K] * B[K x N], N a multiple of the vector width.
template <typename T>
__attribute__((always_inline)) inline void gemm_body(int64_t M, int64_t N, int64_t K,
                                                     const T* A, int64_t sam, int64_t sak,
                                                     const T* B, int64_t ldb, T* C, int64_t ldc,
                                                     bool accumulate) {
  constexpr int W = Vec<T>::width;
  for (int64_t n0 = 0; n0 < N; n0 += kTileVecs * W) {
    const int nv = static_cast<int>(std::min<int64_t>(kTileVecs, (N - n0) / W));
    for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
      const int r = static_cast<int>(std::min<int64_t>(kTileRows, M - m0));
      const T* a = A + m0 * sam;
      const T* b = B + n0;
      T* c = C + m0 * ldc + n0;
#define DLCORE_TILE(R_, NV_) \
  case R_ * 8 + NV_:         \
    gemm_tile<T, R_, NV_>(K, a, sam, sak, b, ldb, c, ldc, accumulate); \
    break;
      switch (r * 8 + nv) {
        DLCORE_TILE(1, 1) DLCORE_TILE(1, 2) DLCORE_TILE(1, 3) DLCORE_TILE(1, 4)
        DLCORE_TILE(2, 1) DLCORE_TILE(2, 2) DLCORE_TILE(2, 3) DLCORE_TILE(2, 4)
        DLCORE_TILE(3, 1) DLCORE_TILE(3, 2) DLCORE_TILE(3, 3) DLCORE_TILE(3, 4)
        DLCORE_TILE(4, 1) DLCORE_TILE(4, 2) DLCORE_TILE(4, 3) DLCORE_TILE(4, 4)
        default:
          break;
      }
#undef DLCORE_TILE
    }
  }
}

DLCORE_MULTIVERSION void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sam,
                              int64_t sak, const float* B, int64_t ldb, float* C, int64_t ldc,
                              bool accumulate) {
  gemm_body<float>(M, N, K, A, sam, sak, B, ldb, C, ldc, accumulate);
}

DLCORE_MULTIVERSION void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t sam,
                              int64_t sak, const double* B, int64_t ldb, double* C, int64_t ldc,
                              bool accumulate) {
  gemm_body<double>(M, N, K, A, sam, sak, B, ldb, C, ldc, accumulate);
}

// S[r][j] = <Q[r], K[j]> for a few query rows (decoding): K stays row-major, so the key block
// is copied, not transposed. Dp is a multiple of the vector width.
template <typename T>
__attribute__((always_inline)) inline void dot_rows_body(int64_t rows, int64_t n, int64_t Dp,
                                                         const T* Q, const T* K, int64_t ldk,
                                                         T* S) {
  using V = typename Vec<T>::V;
  using U = typename Vec<T>::U;
  constexpr int W = Vec<T>::width;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < n; ++j) {
      V acc = V{};
      for (int64_t d = 0; d < Dp; d += W)
        acc += *reinterpret_cast<const U*>(Q + r * Dp + d) *
               *reinterpret_cast<const U*>(K + j * ldk + d);
      T sum = 0;
      for (int i = 0; i < W; ++i) sum += acc[i];
      S[r * kBlockK + j] = sum;
    }
    for (int64_t j = n; j < kBlockK; ++j) S[r * kBlockK + j] = T(0);
  }
}

DLCORE_MULTIVERSION void dot_rows(int64_t rows, int64_t n, int64_t Dp, const float* Q,
                                  const float* K, int64_t ldk, float* S) {
  dot_rows_body(rows, n, Dp, Q, K, ldk, S);
}

DLCORE_MULTIVERSION void dot_rows(int64_t rows, int64_t n, int64_t Dp, const double* Q,
                                  const double* K, int64_t ldk, double* S) {
  dot_rows_body(rows, n, Dp, Q, K, ldk, S);
}

// dst[r][c] += src[r][c]. Block products are summed into the running accumulators (O, dQ, dK,
// dV) block by block rather than chained in one FMA sequence over the whole sequence length:
// two-level summation keeps float32 rounding error at the level of a plain matmul.
template <typename T>
__attribute__((always_inline)) inline void add_block_body(T* dst, int64_t ldd, const T* src,
                                                          int64_t lds, int64_t rows,
                                                          int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * ldd + c] += src[r * lds + c];
}

DLCORE_MULTIVERSION void add_block(float* dst, int64_t ldd, const float* src, int64_t lds,
                                   int64_t rows, int64_t cols) {
  add_block_body(dst, ldd, src, lds, rows, cols);
}

DLCORE_MULTIVERSION void add_block(double* dst, int64_t ldd, const double* src, int64_t lds,
                                   int64_t rows, int64_t cols) {
  add_block_body(dst, ldd, src, lds, rows, cols);
}

// exp over a float vector: fast_expf's range reduction and polynomial written with vector
// operations (rounding by the 1.5 * 2^23 trick), so every clone vectorises it.
// (In place, through a reference: 64-byte vectors passed by value trip GCC's -Wpsabi.)
__attribute__((always_inline)) inline void vexp(Vec<float>::V& x) {
  using V = Vec<float>::V;
  using I = Vec<float>::I;
  const V lo = V{} - 87.33654f;
  const V hi = V{} + 88.72283f;
  const auto underflow = x <= lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V magic = V{} + 12582912.0f;
  const V n = (x * 1.44269504088896341f + magic) - magic;
  V r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I e = (__builtin_convertvector(n, I) + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &e, sizeof(scale));
  const V result = p * scale;
  x = underflow ? V{} : result;
}

__attribute__((always_inline)) inline float hmax(const Vec<float>::V& v) {
  float m = v[0];
  for (int i = 1; i < Vec<float>::width; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

__attribute__((always_inline)) inline float hsum(const Vec<float>::V& v) {
  float s = 0.0f;
  for (int i = 0; i < Vec<float>::width; ++i) s += v[i];
  return s;
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Online softmax update of `rows` score rows of width n (a multiple of 16): the running max m and
// sum l advance, S becomes exp(S - m_new), and the output rows O are rescaled by exp(m - m_new).
DLCORE_MULTIVERSION void online_softmax(float* S, int64_t ldS, int64_t rows, int64_t n, float* m,
                                        float* l, float* O, int64_t ldO, int64_t Dp) {
  using V = Vec<float>::V;
  using U = Vec<float>::U;
  constexpr int W = Vec<float>::width;
  for (int64_t r = 0; r < rows; ++r) {
    float* s = S + r * ldS;
    V vmax = V{} + kNegInf;
    for (int64_t j = 0; j < n; j += W) {
      const V x = *reinterpret_cast<const U*>(s + j);
      vmax = x > vmax ? x : vmax;
    }
    const float m_new = std::max(m[r], hmax(vmax));
    if (m_new == kNegInf) {
      for (int64_t j = 0; j < n; ++j) s[j] = 0.0f;
      continue;
    }
    const float alpha = fast_expf(m[r] - m_new);
    V vsum = V{};
    for (int64_t j = 0; j < n; j += W) {
      V p = *reinterpret_cast<const U*>(s + j) - m_new;
      vexp(p);
      *reinterpret_cast<U*>(s + j) = p;
      vsum += p;
    }
    l[r] = l[r] * alpha + hsum(vsum);
    m[r] = m_new;
    if (alpha != 1.0f) {
      float* o = O + r * ldO;
      for (int64_t d = 0; d < Dp; ++d) o[d] *= alpha;
    }
  }
}

void online_softmax(double* S, int64_t ldS, int64_t rows, int64_t n, double* m, double* l,
                    double* O, int64_t ldO, int64_t Dp) {
  for (int64_t r = 0; r < rows; ++r) {
    double* s = S + r * ldS;
    double m_new = m[r];
    for (int64_t j = 0; j < n; ++j) m_new = std::max(m_new, s[j]);
    if (m_new == -std::numeric_limits<double>::infinity()) {
      for (int64_t j = 0; j < n; ++j) s[j] = 0.0;
      continue;
    }
    const double alpha = std::exp(m[r] - m_new);
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - m_new);
      sum += s[j];
    }
    l[r] = l[r] * alpha + sum;
    m[r] = m_new;
    if (alpha != 1.0) {
      for (int64_t d = 0; d < Dp; ++d) O[r * ldO + d] *= alpha;
    }
  }
}

// Backward: S <- exp(S - lse) row by row (0 for rows without a visible key).
DLCORE_MULTIVERSION void probs_from_lse(float* S, int64_t ldS, int64_t rows, int64_t n,
                                        const float* lse) {
  using V = Vec<float>::V;
  using U = Vec<float>::U;
  constexpr int W = Vec<float>::width;
  for (int64_t r = 0; r < rows; ++r) {
    float* s = S + r * ldS;
    if (lse[r] == kNegInf) {
      for (int64_t j = 0; j < n; ++j) s[j] = 0.0f;
      continue;
    }
    for (int64_t j = 0; j < n; j += W) {
      V x = *reinterpret_cast<const U*>(s + j) - lse[r];
      vexp(x);
      *reinterpret_cast<U*>(s + j) = x;
    }
  }
}

void probs_from_lse(double* S, int64_t ldS, int64_t rows, int64_t n, const double* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    double* s = S + r * ldS;
    const bool empty = lse[r] == -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < n; ++j) s[j] = empty ? 0.0 : std::exp(s[j] - lse[r]);
  }
}

// Backward without dropout or softcap: dP <- P * (dP - Delta_row).
DLCORE_MULTIVERSION void softmax_grad(const float* P, float* dP, int64_t ld, int64_t rows,
                                      int64_t n, const float* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    const float dr = delta[r];
    for (int64_t j = 0; j < n; ++j) dP[r * ld + j] = P[r * ld + j] * (dP[r * ld + j] - dr);
  }
}

void softmax_grad(const double* P, double* dP, int64_t ld, int64_t rows, int64_t n,
                  const double* delta) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) dP[r * ld + j] = P[r * ld + j] * (dP[r * ld + j] - delta[r]);
}

// Backward with dropout and/or softcap: dP <- P * (dP_kept - Delta_row) [* (1 - tanh^2)], where
// dP_kept is dP / (1 - p) at kept keys (Pdrop != 0) and 0 at dropped ones (Pdrop null: no
// dropout; tanh_s null: no softcap); columns n..ld are zeroed.
template <typename T>
__attribute__((always_inline)) inline void masked_softmax_grad_body(const T* P, const T* Pdrop,
                                                                    const T* tanh_s, T* dP,
                                                                    int64_t ld, int64_t rows,
                                                                    int64_t n, const T* delta,
                                                                    T inv_keep) {
  for (int64_t r = 0; r < rows; ++r) {
    const T dr = delta[r];
    T* d = dP + r * ld;
    const T* pr = P + r * ld;
    for (int64_t j = 0; j < n; ++j) {
      T dpv = d[j];
      if (Pdrop) dpv = Pdrop[r * ld + j] != T(0) ? dpv * inv_keep : T(0);
      T ds = pr[j] * (dpv - dr);
      if (tanh_s) ds *= T(1) - tanh_s[r * ld + j] * tanh_s[r * ld + j];
      d[j] = ds;
    }
    for (int64_t j = n; j < ld; ++j) d[j] = T(0);
  }
}

DLCORE_MULTIVERSION void masked_softmax_grad(const float* P, const float* Pdrop,
                                             const float* tanh_s, float* dP, int64_t ld,
                                             int64_t rows, int64_t n, const float* delta,
                                             float inv_keep) {
  masked_softmax_grad_body(P, Pdrop, tanh_s, dP, ld, rows, n, delta, inv_keep);
}

void masked_softmax_grad(const double* P, const double* Pdrop, const double* tanh_s, double* dP,
                         int64_t ld, int64_t rows, int64_t n, const double* delta,
                         double inv_keep) {
  masked_softmax_grad_body(P, Pdrop, tanh_s, dP, ld, rows, n, delta, inv_keep);
}

// Triton's tl.rand(seed, offset): Philox4x32-10 keyed by the seed, counter (offset lo, offset hi,
// 0, 0), first word mapped to [0, 1) by uint_to_uniform_float.
inline float philox_uniform_words(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0, c3 = 0;
  for (int round = 0; round < 10; ++round) {
    const uint32_t a = c0, b = c2;
    c0 = static_cast<uint32_t>((uint64_t{0xCD9E8D57u} * b) >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>((uint64_t{0xD2511F53u} * a) >> 32) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * b;
    c3 = 0xD2511F53u * a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = static_cast<int32_t>(c0);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

inline float philox_uniform(uint64_t seed, uint64_t offset) {
  return philox_uniform_words(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                              static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

struct Problem {
  int64_t B, Hq, Hk, Lq, Lk, D, Dp, group;
  double scale, softcap, dropout_p;
  int64_t diag, window_left, window_right;
  uint64_t seed;
  const void* bias = nullptr;
  at::ScalarType bias_dtype = at::kFloat;
  int64_t bias_stride[4] = {0, 0, 0, 0};
  const float* alibi = nullptr;
  int64_t alibi_stride[2] = {0, 0};

  // First and last key visible to query i under the window (before clamping to [0, Lk)).
  int64_t first_key(int64_t i) const {
    return window_left < 0 ? std::numeric_limits<int64_t>::min() / 4 : i + diag - window_left;
  }
  int64_t last_key(int64_t i) const {
    return window_right < 0 ? std::numeric_limits<int64_t>::max() / 4 : i + diag + window_right;
  }
  // Whether every query row of [i0, i0+rows) sees every key of the full block at j0.
  bool block_fully_visible(int64_t i0, int64_t rows, int64_t j0, int64_t n) const {
    return n == kBlockK && j0 >= first_key(i0 + rows - 1) && j0 + kBlockK - 1 <= last_key(i0);
  }
  bool needs_mods() const { return softcap > 0 || bias != nullptr || alibi != nullptr; }
  uint64_t dropout_offset(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return static_cast<uint64_t>(((b * Hq + h) * Lq + i) * Lk + j);
  }
};

template <typename T>
void load_bias_row(const Problem& p, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n,
                   T* dst) {
  const int64_t* s = p.bias_stride;
  const int64_t base = b * s[0] + h * s[1] + i * s[2] + j0 * s[3];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.bias_dtype, "attention_bias", [&] {
    const scalar_t* src = static_cast<const scalar_t*>(p.bias) + base;
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(static_cast<double>(src[j * s[3]]));
  });
}

// Softcap, bias, ALiBi and the window/length mask on a block of raw scores S[rows x kBlockK]
// (queries i0.., keys j0..j0+n). With softcap, tanh(s / softcap) goes to `tanh_out` for backward.
template <typename T>
void apply_score_mods(const Problem& p, T* S, int64_t rows, int64_t b, int64_t h, int64_t i0,
                      int64_t j0, int64_t n, bool mask, T* tanh_out, T* row_buf) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const T cap = static_cast<T>(p.softcap);
  const T slope = p.alibi ? static_cast<T>(p.alibi[b * p.alibi_stride[0] + h * p.alibi_stride[1]])
                          : T(0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    T* s = S + r * kBlockK;
    if (p.softcap > 0) {
      for (int64_t j = 0; j < n; ++j) {
        const T t = std::tanh(s[j] / cap);
        if (tanh_out) tanh_out[r * kBlockK + j] = t;
        s[j] = cap * t;
      }
    }
    if (p.bias) {
      load_bias_row(p, b, h, i, j0, n, row_buf);
      for (int64_t j = 0; j < n; ++j) s[j] += row_buf[j];
    }
    if (p.alibi) {
      for (int64_t j = 0; j < n; ++j)
        s[j] -= slope * static_cast<T>(std::llabs(i + p.diag - (j0 + j)));
    }
    if (mask) {
      const int64_t lo = p.first_key(i) - j0, hi = std::min(p.last_key(i) - j0, n - 1);
      for (int64_t j = 0; j < kBlockK; ++j)
        if (j < lo || j > hi) s[j] = neg_inf;
    }
  }
}

// tl.rand(seed, base + j) for j < n. A loop of its own, cloned per ISA, so that the ten Philox
// rounds vectorise (the 32x32->64-bit products map to vpmuludq): scalar, the random numbers
// cost more than the block's matrix products.
// When the row does not cross a 2^32 boundary of the offset, the counter's high word is constant
// and the loop runs on 32-bit lanes only (twice the lanes of 64-bit offsets).
DLCORE_MULTIVERSION void philox_uniform_row(uint64_t seed, uint64_t base, int64_t n, float* out) {
  const uint32_t lo = static_cast<uint32_t>(base), hi = static_cast<uint32_t>(base >> 32);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  if (uint64_t{lo} + static_cast<uint64_t>(n) <= (uint64_t{1} << 32)) {
    for (int64_t j = 0; j < n; ++j)
      out[j] = philox_uniform_words(lo + static_cast<uint32_t>(j), hi, k0, k1);
    return;
  }
  for (int64_t j = 0; j < n; ++j) out[j] = philox_uniform(seed, base + static_cast<uint64_t>(j));
}

template <typename T>
void apply_dropout(const Problem& p, T* S, int64_t rows, int64_t n, int64_t b, int64_t h,
                   int64_t i0, int64_t j0, T* dst) {
  const float threshold = static_cast<float>(p.dropout_p);
  const T inv_keep = static_cast<T>(1.0 / (1.0 - p.dropout_p));
  alignas(64) float u[kBlockK];
  for (int64_t r = 0; r < rows; ++r) {
    // Keys the window hides have probability 0 and need no random number.
    const int64_t lo = std::clamp<int64_t>(p.first_key(i0 + r) - j0, 0, n);
    const int64_t hi = std::clamp<int64_t>(p.last_key(i0 + r) - j0 + 1, lo, n);
    T* d = dst + r * kBlockK;
    const T* s = S + r * kBlockK;
    philox_uniform_row(p.seed, p.dropout_offset(b, h, i0 + r, j0 + lo), hi - lo, u);
    for (int64_t j = 0; j < lo; ++j) d[j] = T(0);
    for (int64_t j = lo; j < hi; ++j) d[j] = u[j - lo] > threshold ? s[j] * inv_keep : T(0);
    for (int64_t j = hi; j < n; ++j) d[j] = T(0);
  }
}

// dst[r][d] = scale * src[r][d] for r < rows, d < D; columns D..Dp are zero.
template <typename scalar_t, typename T>
void pack_rows(const scalar_t* src, int64_t stride, int64_t rows, int64_t D, int64_t Dp, T mult,
               T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * stride;
    T* d = dst + r * Dp;
    for (int64_t c = 0; c < D; ++c) d[c] = static_cast<T>(s[c]) * mult;
    for (int64_t c = D; c < Dp; ++c) d[c] = T(0);
  }
}

// dst[d][j] = src[j][d] for j < rows, zero elsewhere in the (Dp x kBlockK) block.
template <typename scalar_t, typename T>
void pack_transposed(const scalar_t* src, int64_t stride, int64_t rows, int64_t D, int64_t Dp,
                     T* dst) {
  std::fill(dst, dst + Dp * kBlockK, T(0));
  for (int64_t j = 0; j < rows; ++j) {
    const scalar_t* s = src + j * stride;
    for (int64_t d = 0; d < D; ++d) dst[d * kBlockK + j] = static_cast<T>(s[d]);
  }
}

struct Strides3 {
  int64_t b, h, l;
  explicit Strides3(const at::Tensor& t) : b(t.stride(0)), h(t.stride(1)), l(t.stride(2)) {}
  int64_t offset(int64_t bi, int64_t hi, int64_t li) const { return bi * b + hi * h + li * l; }
};

template <typename scalar_t, typename T>
void forward(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& out, const at::Tensor& lse, T* lse_exact = nullptr) {
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  float* lp = lse.mutable_data_ptr<float>();
  const Strides3 qs(q), ks(k), vs(v), os(out);
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1), ls2 = lse.stride(2);
  const int64_t Dp = p.Dp, D = p.D;
  const int64_t nqb = (p.Lq + kBlockQ - 1) / kBlockQ;
  const T scale = static_cast<T>(p.scale);
  constexpr bool kInPlace = std::is_same_v<scalar_t, T>;

  at::parallel_for(0, p.B * p.Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qbuf(kBlockQ * Dp), kt(Dp * kBlockK), vbuf(kBlockK * Dp);
    std::vector<T> sbuf(kBlockQ * kBlockK), obuf(kBlockQ * Dp), pv(kBlockQ * Dp);
    std::vector<T> m(kBlockQ), l(kBlockQ);
    std::vector<T> row_buf(kBlockK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (p.Hq * nqb), h = (task / nqb) % p.Hq, qb = task % nqb;
      const int64_t hk = h / p.group;
      const int64_t i0 = qb * kBlockQ, mq = std::min(kBlockQ, p.Lq - i0);
      pack_rows(qp + qs.offset(b, h, i0), qs.l, mq, D, Dp, scale, qbuf.data());
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      std::fill(obuf.begin(), obuf.end(), T(0));
      const int64_t jlo = std::max<int64_t>(0, p.first_key(i0));
      const int64_t jhi = std::min<int64_t>(p.Lk - 1, p.last_key(i0 + mq - 1));
      for (int64_t j0 = jlo / kBlockK * kBlockK; j0 <= jhi; j0 += kBlockK) {
        const int64_t n = std::min(kBlockK, p.Lk - j0);
        // Inputs already in the accumulation type with D a multiple of the vector width are read
        // in place where the layout allows; others go through the zero-padded block buffers.
        const T* vblock = vbuf.data();
        int64_t ldv = Dp;
        if (kInPlace && D == Dp) {
          vblock = reinterpret_cast<const T*>(vp + vs.offset(b, hk, j0));
          ldv = vs.l;
        } else {
          pack_rows(vp + vs.offset(b, hk, j0), vs.l, n, D, Dp, T(1), vbuf.data());
        }
        // Score columns actually computed: the keys of the block rounded up to whole vectors (a
        // short last block, e.g. 77 text tokens, costs 16 columns, not 64); the rest is unused.
        constexpr int64_t W = Vec<T>::width;
        const int64_t ncols = (n + W - 1) / W * W;
        if (mq <= kTileRows) {  // decoding: dot products against row-major keys
          if (kInPlace && D == Dp) {
            dot_rows(mq, n, Dp, qbuf.data(), reinterpret_cast<const T*>(kp + ks.offset(b, hk, j0)),
                     ks.l, sbuf.data());
          } else {
            pack_rows(kp + ks.offset(b, hk, j0), ks.l, n, D, Dp, T(1), kt.data());
            dot_rows(mq, n, Dp, qbuf.data(), kt.data(), Dp, sbuf.data());
          }
        } else {
          // The product's inner dimension is the true head dim: padding columns are zero.
          pack_transposed(kp + ks.offset(b, hk, j0), ks.l, n, D, Dp, kt.data());
          gemm(mq, ncols, D, qbuf.data(), Dp, 1, kt.data(), kBlockK, sbuf.data(), kBlockK, false);
        }
        const bool mask = !p.block_fully_visible(i0, mq, j0, n);
        if (mask || p.needs_mods())
          apply_score_mods(p, sbuf.data(), mq, b, h, i0, j0, n, mask, static_cast<T*>(nullptr),
                           row_buf.data());
        online_softmax(sbuf.data(), kBlockK, mq, ncols, m.data(), l.data(), obuf.data(), Dp, Dp);
        if (p.dropout_p > 0) apply_dropout(p, sbuf.data(), mq, n, b, h, i0, j0, sbuf.data());
        gemm(mq, Dp, n, sbuf.data(), kBlockK, 1, vblock, ldv, pv.data(), Dp, false);
        add_block(obuf.data(), Dp, pv.data(), Dp, mq, Dp);
      }
      for (int64_t r = 0; r < mq; ++r) {
        const T inv = l[r] > 0 ? T(1) / l[r] : T(0);
        scalar_t* o = op + os.offset(b, h, i0 + r);
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(obuf[r * Dp + d] * inv);
        const T row_lse = l[r] > 0 ? m[r] + std::log(l[r]) : -std::numeric_limits<T>::infinity();
        lp[b * ls0 + h * ls1 + (i0 + r) * ls2] = static_cast<float>(row_lse);
        if (lse_exact) lse_exact[(b * p.Hq + h) * p.Lq + i0 + r] = row_lse;
      }
    }
  });
}

template <typename scalar_t, typename T>
void backward(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
              const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  const scalar_t* dop = dout.const_data_ptr<scalar_t>();
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  const scalar_t* op = out.const_data_ptr<scalar_t>();
  const float* lp = lse.const_data_ptr<float>();
  const Strides3 dos(dout), qs(q), ks(k), vs(v), os(out), dqs(dq), dks(dk), dvs(dv);
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1), ls2 = lse.stride(2);
  const int64_t Dp = p.Dp, D = p.D, Lq = p.Lq, Lk = p.Lk;
  const T scale = static_cast<T>(p.scale);

  // Delta_i = <dO_i, O_i> (dropout is already inside O) and lse, one value per query row.
  std::vector<T> delta(p.B * p.Hq * Lq), lse_rows(p.B * p.Hq * Lq);
  // The saved lse is float32; float64 gradients (gradcheck) need it exact, so recompute it.
  constexpr bool exact_lse = std::is_same_v<T, double>;
  if (exact_lse)
    forward<scalar_t, T>(p, q, k, v, at::empty_like(q), at::empty_like(lse), lse_rows.data());
  at::parallel_for(0, p.B * p.Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.Hq, h = bh % p.Hq;
      for (int64_t i = 0; i < Lq; ++i) {
        const scalar_t* a = dop + dos.offset(b, h, i);
        const scalar_t* o = op + os.offset(b, h, i);
        T acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += static_cast<T>(a[d]) * static_cast<T>(o[d]);
        delta[bh * Lq + i] = acc;
        if (!exact_lse) lse_rows[bh * Lq + i] = static_cast<T>(lp[b * ls0 + h * ls1 + i * ls2]);
      }
    }
  });

  // dK/dV are owned by (batch, kv head, key-block range) tasks; dQ rows receive contributions
  // from every key block, so each key-block range accumulates into its own dQ slice, summed in a
  // fixed order at the end. When one range per head already keeps the threads busy and dq has
  // the accumulation type, dq itself is the accumulator.
  const int64_t nkb = (Lk + kBlockK - 1) / kBlockK;
  const int64_t heads = p.B * p.Hk;
  const int64_t threads = at::get_num_threads();
  // Extra dQ slices cost B*Hq*Lq*Dp each: at most kSplitBudget bytes of them.
  constexpr int64_t kSplitBudget = int64_t{64} << 20;
  const int64_t slice_bytes = std::max<int64_t>(1, p.B * p.Hq * Lq * Dp * int64_t(sizeof(T)));
  const int64_t nsplit = std::max<int64_t>(
      1, std::min({nkb, (4 * threads + heads - 1) / heads, kSplitBudget / slice_bytes}));
  const bool direct = nsplit == 1 && dq.scalar_type() == c10::CppTypeToScalarType<T>::value &&
                      D == Dp;
  std::vector<T> dq_acc(direct ? 0 : nsplit * p.B * p.Hq * Lq * Dp, T(0));
  if (direct) dq.zero_();

  at::parallel_for(0, heads * nsplit, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> kt(Dp * kBlockK), krow(kBlockK * Dp), vt(Dp * kBlockK);
    std::vector<T> qbuf(kBlockQ * Dp), dobuf(kBlockQ * Dp);
    std::vector<T> pbuf(kBlockQ * kBlockK), pdrop(kBlockQ * kBlockK), dpbuf(kBlockQ * kBlockK);
    std::vector<T> tanh_buf(p.softcap > 0 ? kBlockQ * kBlockK : 0), row_buf(kBlockK);
    std::vector<T> dk_acc(kBlockK * Dp), dv_acc(kBlockK * Dp), part(kBlockK * Dp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t split = task % nsplit, bhk = task / nsplit;
      const int64_t b = bhk / p.Hk, hk = bhk % p.Hk;
      const int64_t kb_begin = split * nkb / nsplit, kb_end = (split + 1) * nkb / nsplit;
      for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
        const int64_t j0 = kb * kBlockK, n = std::min(kBlockK, Lk - j0);
        pack_transposed(kp + ks.offset(b, hk, j0), ks.l, n, D, Dp, kt.data());
        pack_rows(kp + ks.offset(b, hk, j0), ks.l, n, D, Dp, T(1), krow.data());
        pack_transposed(vp + vs.offset(b, hk, j0), vs.l, n, D, Dp, vt.data());
        std::fill(dk_acc.begin(), dk_acc.end(), T(0));
        std::fill(dv_acc.begin(), dv_acc.end(), T(0));
        // Query rows that see at least one key of this block.
        const int64_t ilo = p.window_right < 0
                                ? 0
                                : std::max<int64_t>(0, j0 - p.diag - p.window_right);
        const int64_t ihi = p.window_left < 0
                                ? Lq - 1
                                : std::min<int64_t>(Lq - 1, j0 + n - 1 - p.diag + p.window_left);
        for (int64_t g = 0; g < p.group && ilo <= ihi; ++g) {
          const int64_t h = hk * p.group + g;
          const int64_t row0 = (b * p.Hq + h) * Lq;
          for (int64_t i0 = ilo / kBlockQ * kBlockQ; i0 <= ihi; i0 += kBlockQ) {
            const int64_t mq = std::min(kBlockQ, Lq - i0);
            pack_rows(qp + qs.offset(b, h, i0), qs.l, mq, D, Dp, scale, qbuf.data());
            pack_rows(dop + dos.offset(b, h, i0), dos.l, mq, D, Dp, T(1), dobuf.data());
            gemm(mq, kBlockK, D, qbuf.data(), Dp, 1, kt.data(), kBlockK, pbuf.data(), kBlockK,
                 false);
            const bool mask = !p.block_fully_visible(i0, mq, j0, n);
            if (mask || p.needs_mods())
              apply_score_mods(p, pbuf.data(), mq, b, h, i0, j0, n, mask,
                               p.softcap > 0 ? tanh_buf.data() : nullptr, row_buf.data());
            probs_from_lse(pbuf.data(), kBlockK, mq, kBlockK, lse_rows.data() + row0 + i0);
            const T* pd = pbuf.data();
            if (p.dropout_p > 0) {
              apply_dropout(p, pbuf.data(), mq, n, b, h, i0, j0, pdrop.data());
              pd = pdrop.data();
            }
            // dV += P_drop^T dO
            gemm(n, Dp, mq, pd, 1, kBlockK, dobuf.data(), Dp, part.data(), Dp, false);
            add_block(dv_acc.data(), Dp, part.data(), Dp, n, Dp);
            // dP = dO V^T, then dS = P * (dP_drop - Delta) [* (1 - tanh^2)]
            gemm(mq, kBlockK, D, dobuf.data(), Dp, 1, vt.data(), kBlockK, dpbuf.data(), kBlockK,
                 false);
            const T* drow = delta.data() + row0 + i0;
            if (p.dropout_p > 0 || p.softcap > 0) {
              masked_softmax_grad(pbuf.data(), p.dropout_p > 0 ? pdrop.data() : nullptr,
                                  p.softcap > 0 ? tanh_buf.data() : nullptr, dpbuf.data(),
                                  kBlockK, mq, n, drow,
                                  static_cast<T>(1.0 / (1.0 - p.dropout_p)));
            } else {
              softmax_grad(pbuf.data(), dpbuf.data(), kBlockK, mq, kBlockK, drow);
            }
            // dK += dS^T (scale Q); dQ += dS K (scaled at the end)
            gemm(n, Dp, mq, dpbuf.data(), 1, kBlockK, qbuf.data(), Dp, part.data(), Dp, false);
            add_block(dk_acc.data(), Dp, part.data(), Dp, n, Dp);
            T* dq_rows;
            int64_t ldq;
            if (direct) {
              dq_rows = reinterpret_cast<T*>(dq.mutable_data_ptr()) + dqs.offset(b, h, i0);
              ldq = dqs.l;
            } else {
              dq_rows = dq_acc.data() + ((split * p.B * p.Hq * Lq) + row0 + i0) * Dp;
              ldq = Dp;
            }
            gemm(mq, Dp, n, dpbuf.data(), kBlockK, 1, krow.data(), Dp, part.data(), Dp, false);
            add_block(dq_rows, ldq, part.data(), Dp, mq, Dp);
          }
        }
        for (int64_t j = 0; j < n; ++j) {
          scalar_t* dkr = dk.mutable_data_ptr<scalar_t>() + dks.offset(b, hk, j0 + j);
          scalar_t* dvr = dv.mutable_data_ptr<scalar_t>() + dvs.offset(b, hk, j0 + j);
          for (int64_t d = 0; d < D; ++d) {
            dkr[d] = static_cast<scalar_t>(dk_acc[j * Dp + d]);
            dvr[d] = static_cast<scalar_t>(dv_acc[j * Dp + d]);
          }
        }
      }
    }
  });

  // dQ = scale * sum over key-block ranges, in range order.
  at::parallel_for(0, p.B * p.Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.Hq, h = bh % p.Hq;
      for (int64_t i = 0; i < Lq; ++i) {
        scalar_t* dqr = dq.mutable_data_ptr<scalar_t>() + dqs.offset(b, h, i);
        if (direct) {
          for (int64_t d = 0; d < D; ++d) dqr[d] = static_cast<scalar_t>(dqr[d] * scale);
          continue;
        }
        for (int64_t d = 0; d < D; ++d) {
          T acc = 0;
          for (int64_t s = 0; s < nsplit; ++s)
            acc += dq_acc[((s * p.B * p.Hq + bh) * Lq + i) * Dp + d];
          dqr[d] = static_cast<scalar_t>(acc * scale);
        }
      }
    }
  });
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "attention kernel: q must be (B, Hq, Lq, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4,
              "attention kernel: k and v must be (B, Hk, Lk, D), got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "attention kernel: k shape ", k.sizes(),
              " must equal v shape ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "attention kernel: k/v shape ", k.sizes(), " must match q shape ", q.sizes(),
              " in batch and head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention kernel: q heads ",
              q.size(1), " must be a multiple of k/v heads ", k.size(1));
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, "attention kernel: head dim ",
              q.size(3), " must be in [1, ", kMaxHeadDim, "]");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), "attention kernel: tensors must be on CPU, got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "attention kernel: q, k, v dtypes differ: ",
                q.scalar_type(), " vs ", t->scalar_type());
    TORCH_CHECK(t->stride(3) == 1 || t->size(3) == 1,
                "attention kernel: q, k, v need unit stride in the last dim, got strides ",
                t->strides());
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "attention kernel: dtype must be float32, float64, bfloat16 or float16, got ", dt);
}

void check_like(const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == like.sizes(), "attention kernel: ", name, " must have shape ",
              like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "attention kernel: ", name, " must be ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "attention kernel: ", name, " must be on CPU");
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, "attention kernel: ", name,
              " needs unit stride in the last dim, got strides ", t.strides());
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                     const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& alibi_slopes, double scale,
                     int64_t diag_offset, int64_t window_left, int64_t window_right,
                     double softcap, double dropout_p, int64_t seed) {
  Problem p;
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Hk = k.size(1);
  p.Lq = q.size(2);
  p.Lk = k.size(2);
  p.D = q.size(3);
  const int64_t width = q.scalar_type() == at::kDouble ? Vec<double>::width : Vec<float>::width;
  p.Dp = (p.D + width - 1) / width * width;
  p.group = p.Hq / p.Hk;
  p.scale = scale;
  p.softcap = softcap;
  p.dropout_p = dropout_p;
  p.diag = diag_offset;
  p.window_left = window_left;
  p.window_right = window_right;
  p.seed = static_cast<uint64_t>(seed);
  TORCH_CHECK(std::isfinite(scale), "attention kernel: scale must be finite, got ", scale);
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap),
              "attention kernel: softcap must be >= 0, got ", softcap);
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1,
              "attention kernel: dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(std::llabs(diag_offset) < (int64_t{1} << 40) && window_left < (int64_t{1} << 40) &&
                  window_right < (int64_t{1} << 40),
              "attention kernel: diag_offset/window out of range");
  const std::vector<int64_t> lse_shape{p.B, p.Hq, p.Lq};
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lse_shape) && lse.scalar_type() == at::kFloat &&
                  lse.device().is_cpu(),
              "attention kernel: lse must be float32 of shape ", at::IntArrayRef(lse_shape),
              ", got ", lse.scalar_type(), " ", lse.sizes());
  if (bias.has_value()) {
    const at::Tensor& t = *bias;
    const std::vector<int64_t> full{p.B, p.Hq, p.Lq, p.Lk};
    TORCH_CHECK(t.dim() == 4, "attention kernel: bias must be 4-D broadcastable to ",
                at::IntArrayRef(full), ", got ", t.sizes());
    for (int d = 0; d < 4; ++d) {
      TORCH_CHECK(t.size(d) == full[d] || t.size(d) == 1, "attention kernel: bias shape ",
                  t.sizes(), " does not broadcast to ", at::IntArrayRef(full));
      p.bias_stride[d] = t.size(d) == 1 ? 0 : t.stride(d);
    }
    const auto dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                "attention kernel: bias must be a float tensor, got ", dt);
    TORCH_CHECK(t.device().is_cpu(), "attention kernel: bias must be on CPU");
    p.bias = t.const_data_ptr();
    p.bias_dtype = dt;
  }
  if (alibi_slopes.has_value()) {
    const at::Tensor& t = *alibi_slopes;
    TORCH_CHECK(t.dim() == 2 && (t.size(0) == p.B || t.size(0) == 1) && t.size(1) == p.Hq &&
                    t.scalar_type() == at::kFloat && t.device().is_cpu(),
                "attention kernel: alibi_slopes must be float32 (B, Hq) = (", p.B, ", ", p.Hq,
                "), got ", t.scalar_type(), " ", t.sizes());
    p.alibi = t.const_data_ptr<float>();
    p.alibi_stride[0] = t.size(0) == 1 ? 0 : t.stride(0);
    p.alibi_stride[1] = t.stride(1);
  }
  return p;
}

void attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& alibi_slopes, double scale,
                          int64_t diag_offset, int64_t window_left, int64_t window_right,
                          double softcap, double dropout_p, int64_t seed, const at::Tensor& out,
                          const at::Tensor& lse) {
  check_qkv(q, k, v);
  check_like("out", out, q);
  const Problem p = make_problem(q, k, lse, bias, alibi_slopes, scale, diag_offset, window_left,
                                 window_right, softcap, dropout_p, seed);
  if (p.B == 0 || p.Hq == 0 || p.Lq == 0) return;
  switch (q.scalar_type()) {
    case at::kDouble:
      return forward<double, double>(p, q, k, v, out, lse);
    case at::kBFloat16:
      return forward<at::BFloat16, float>(p, q, k, v, out, lse);
    case at::kHalf:
      return forward<at::Half, float>(p, q, k, v, out, lse);
    default:
      return forward<float, float>(p, q, k, v, out, lse);
  }
}

void attention_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& alibi_slopes, double scale,
                          int64_t diag_offset, int64_t window_left, int64_t window_right,
                          double softcap, double dropout_p, int64_t seed, bool deterministic,
                          const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  // The CPU backward is deterministic whatever `deterministic` says: fixed partition, fixed
  // reduction order.
  (void)deterministic;
  check_qkv(q, k, v);
  check_like("dout", dout, q);
  check_like("out", out, q);
  check_like("dq", dq, q);
  check_like("dk", dk, k);
  check_like("dv", dv, v);
  const Problem p = make_problem(q, k, lse, bias, alibi_slopes, scale, diag_offset, window_left,
                                 window_right, softcap, dropout_p, seed);
  if (p.B == 0 || p.Hk == 0) return;
  switch (q.scalar_type()) {
    case at::kDouble:
      return backward<double, double>(p, dout, q, k, v, out, lse, dq, dk, dv);
    case at::kBFloat16:
      return backward<at::BFloat16, float>(p, dout, q, k, v, out, lse, dq, dk, dv);
    case at::kHalf:
      return backward<at::Half, float>(p, dout, q, k, v, out, lse, dq, dk, dv);
    default:
      return backward<float, float>(p, dout, q, k, v, out, lse, dq, dk, dv);
  }
}

}  // namespace dlcore::cpu::attention

TORCH_LIBRARY_IMPL(dlcore, CPU, m) {
  m.impl("attention_fwd_kernel", &dlcore::cpu::attention::attention_fwd_kernel);
  m.impl("attention_bwd_kernel", &dlcore::cpu::attention::attention_bwd_kernel);
}
