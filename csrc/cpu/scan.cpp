// CPU selective scan kernels: dlcore::selective_scan_fwd_kernel, selective_scan_bwd_kernel and
// selective_state_update_kernel (schemas in csrc/dlcore.cpp, contract in dlcore/ops/scan.py).
//
// A row is one (batch, channel) pair; its state is N values, updated step by step with the N
// loop vectorised (GCC clones for AVX2/AVX-512, fast_expf). The time axis is cut in chunks of
// chunk_size steps; per chunk the discretised step (softplus, delta * u) is computed in a
// vectorised pre-pass and the D skip and SiLU gate in a post-pass, so nothing of size
// (batch, dim, L, N) is ever materialised. Rows are spread over threads; when there are fewer
// rows than threads the forward runs a chunked two-pass scan (local chunk scans in parallel,
// a short sequential pass carrying states across chunks, then the outputs in parallel).
// The backward walks each row's chunks in reverse, recomputing the chunk's states from the
// saved chunk_states, and reduces gradients shared between rows (A, D, delta_bias, B, C) from
// per-task partial buffers in a fixed order, so it is deterministic for a given thread count
// (and across thread counts when `deterministic` is set). Computation is in float for
// fp32/fp16/bf16 inputs and in double for fp64 inputs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/common.h"

namespace dlcore::cpu::scan {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr int64_t kMaxState = 256;

// ---------------------------------------------------------------- elementwise math

template <typename T>
inline T exp_(T x);
template <>
inline float exp_(float x) {
  return fast_expf(x);
}
template <>
inline double exp_(double x) {
  return std::exp(x);
}

// log(1 + w) for w in [0, 1] without libm: log of 1 + w by the atanh series, corrected for the
// rounding of 1 + w (Goldberg's trick) so small w keep full relative accuracy.
inline float log1p_unit(float w) {
  const float v = 1.0f + w;
  const bool big = v > 1.41421356f;
  const float m = big ? v * 0.5f : v;
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  const float logv = 2.0f * s * p + (big ? 0.69314718056f : 0.0f);
  const float d = v - 1.0f;
  return d == 0.0f ? w : logv * (w / d);
}

// torch.nn.functional.softplus with its threshold of 20 (as mamba_ssm): x above 20 passes.
template <typename T>
inline T softplus_(T x);
template <>
inline float softplus_(float x) {
  // Written with selects rather than fmax/fabs so GCC vectorises it.
  const float r = (x > 0.0f ? x : 0.0f) + log1p_unit(fast_expf(x > 0.0f ? -x : x));
  return x > 20.0f ? x : r;
}
template <>
inline double softplus_(double x) {
  return x > 20.0 ? x : std::log1p(std::exp(x));
}

template <typename T>
inline T sigmoid_(T x) {
  return T(1) / (T(1) + exp_<T>(-x));
}

// ---------------------------------------------------------------- per-chunk loops

// dt[i] = softplus?(delta[i] + bias), du[i] = dt[i] * u[i]; dsp[i] = d dt / d delta (if given).
template <typename T>
__attribute__((always_inline)) inline void prep_impl(int64_t n, const T* delta, const T* u,
                                                     T bias, bool softplus, T* dt, T* du,
                                                     T* dsp) {
  if (softplus) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T x = delta[i] + bias;
      dt[i] = softplus_<T>(x);
      du[i] = dt[i] * u[i];
    }
    if (dsp) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const T x = delta[i] + bias;
        dsp[i] = x > T(20) ? T(1) : sigmoid_<T>(x);
      }
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      dt[i] = delta[i] + bias;
      du[i] = dt[i] * u[i];
      if (dsp) dsp[i] = T(1);
    }
  }
}

// Steps [0, steps) of one row from state h (N values, updated in place). B and C point at the
// first step; they advance by b_step / c_step per step (N for (L, N) rows, 0 for constant ones).
// Writes y[i] = <C_i, h_i> when WithY and the states after each step to H[(i + 1) * N] when
// WithH. NC > 0 fixes N at compile time (no loop remainder: one register for N = 16 floats).
template <typename T, bool WithY, bool WithH, int NC>
__attribute__((always_inline)) inline void steps_impl(int64_t steps, int64_t N_, const T* dt,
                                                      const T* du, const T* A, const T* B,
                                                      int64_t b_step, const T* C, int64_t c_step,
                                                      T* h, T* y, T* H) {
  const int64_t N = NC > 0 ? NC : N_;
  for (int64_t i = 0; i < steps; ++i) {
    const T d = dt[i], x = du[i];
    const T* b = B + i * b_step;
    const T* c = C + i * c_step;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) {
      const T hn = exp_<T>(d * A[n]) * h[n] + x * b[n];
      h[n] = hn;
      if constexpr (WithY) acc += hn * c[n];
      if constexpr (WithH) H[(i + 1) * N + n] = hn;
    }
    if constexpr (WithY) y[i] = acc;
  }
}

// out[i] = (y[i] + D u[i]) * silu(z[i]) (z optional).
template <typename T>
__attribute__((always_inline)) inline void post_impl(int64_t n, const T* y, const T* u, T D,
                                                     const T* z, T* out) {
  if (z) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = (y[i] + D * u[i]) * (z[i] * sigmoid_<T>(z[i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = y[i] + D * u[i];
  }
}

// Reverse steps [steps-1 .. 0] of one row. H holds the states after each step at (i + 1) * N;
// the state before step 0 is h0. dh carries d loss / d h_i between steps (in: after the last
// step; out: before step 0). Accumulates dA (N), dB, dC (per step rows, or N values when the
// step is 0), dD; writes du, dz and ddt (d loss / d dt) per step.
template <typename T, int NC>
__attribute__((always_inline)) inline void bwd_steps_impl(
    int64_t steps, int64_t N_, const T* dout, const T* u, const T* z, const T* dt, const T* du,
    const T* A, const T* B, int64_t b_step, const T* C, int64_t c_step, T D, bool has_D,
    const T* H, const T* h0, T* dh, T* dA, T* dB, int64_t db_step, T* dC, int64_t dc_step,
    T* dD, T* du_out, T* dz_out, T* ddt) {
  const int64_t N = NC > 0 ? NC : N_;
  T dD_acc = 0;
  for (int64_t i = steps - 1; i >= 0; --i) {
    const T* h = H + (i + 1) * N;
    const T* hp = i == 0 ? h0 : H + i * N;
    const T* b = B + i * b_step;
    const T* c = C + i * c_step;
    T g = dout[i];
    if (z) {
      T y = has_D ? D * u[i] : T(0);
#pragma omp simd reduction(+ : y)
      for (int64_t n = 0; n < N; ++n) y += c[n] * h[n];
      const T s = sigmoid_<T>(z[i]);
      dz_out[i] = g * y * s * (T(1) + z[i] * (T(1) - s));
      g = g * z[i] * s;
    }
    dD_acc += g * u[i];
    const T d = dt[i], x = du[i];
    T* dbr = dB + i * db_step;
    T* dcr = dC + i * dc_step;
    T sum_b = 0, sum_dt = 0;
#pragma omp simd reduction(+ : sum_b, sum_dt)
    for (int64_t n = 0; n < N; ++n) {
      const T a = exp_<T>(d * A[n]);
      const T gh = dh[n] + g * c[n];
      dcr[n] += g * h[n];
      dbr[n] += gh * x;
      sum_b += gh * b[n];
      const T ahp = a * hp[n];
      sum_dt += gh * (A[n] * ahp + u[i] * b[n]);
      dA[n] += gh * d * ahp;
      dh[n] = a * gh;
    }
    du_out[i] = (has_D ? g * D : T(0)) + d * sum_b;
    ddt[i] = sum_dt;
  }
  *dD += dD_acc;
}

// Multiversioned entry points (the clones inline the templates above for each ISA); double
// keeps the default build.
// Multiversioned entry points (the clones inline the templates above for each ISA); double
// keeps the default build. N = 16 (Mamba's default) gets its own fully unrolled variant.
#define DLCORE_SCAN_KERNELS(T, ATTR)                                                           \
  ATTR void prep(int64_t n, const T* delta, const T* u, T bias, bool sp, T* dt, T* du,       \
                 T* dsp) {                                                                     \
    prep_impl<T>(n, delta, u, bias, sp, dt, du, dsp);                                          \
  }                                                                                            \
  ATTR void steps_y(int64_t s, int64_t N, const T* dt, const T* du, const T* A, const T* B,  \
                    int64_t bs, const T* C, int64_t cs, T* h, T* y) {                         \
    if (N == 16)                                                                               \
      steps_impl<T, true, false, 16>(s, N, dt, du, A, B, bs, C, cs, h, y, nullptr);           \
    else                                                                                       \
      steps_impl<T, true, false, 0>(s, N, dt, du, A, B, bs, C, cs, h, y, nullptr);            \
  }                                                                                            \
  ATTR void steps_state(int64_t s, int64_t N, const T* dt, const T* du, const T* A,          \
                        const T* B, int64_t bs, T* h) {                                        \
    steps_impl<T, false, false, 0>(s, N, dt, du, A, B, bs, B, 0, h, nullptr, nullptr);        \
  }                                                                                            \
  ATTR void steps_record(int64_t s, int64_t N, const T* dt, const T* du, const T* A,         \
                         const T* B, int64_t bs, T* h, T* H) {                                 \
    if (N == 16)                                                                               \
      steps_impl<T, false, true, 16>(s, N, dt, du, A, B, bs, B, 0, h, nullptr, H);            \
    else                                                                                       \
      steps_impl<T, false, true, 0>(s, N, dt, du, A, B, bs, B, 0, h, nullptr, H);             \
  }                                                                                            \
  ATTR void post(int64_t n, const T* y, const T* u, T D, const T* z, T* out) {               \
    post_impl<T>(n, y, u, D, z, out);                                                          \
  }                                                                                            \
  ATTR void bwd_steps(int64_t s, int64_t N, const T* dout, const T* u, const T* z,           \
                      const T* dt, const T* du, const T* A, const T* B, int64_t bs,            \
                      const T* C, int64_t cs, T D, bool hasD, const T* H, const T* h0, T* dh, \
                      T* dA, T* dB, int64_t dbs, T* dC, int64_t dcs, T* dD, T* duo, T* dzo,    \
                      T* ddt) {                                                                \
    if (N == 16)                                                                               \
      bwd_steps_impl<T, 16>(s, N, dout, u, z, dt, du, A, B, bs, C, cs, D, hasD, H, h0, dh, dA, \
                            dB, dbs, dC, dcs, dD, duo, dzo, ddt);                              \
    else                                                                                       \
      bwd_steps_impl<T, 0>(s, N, dout, u, z, dt, du, A, B, bs, C, cs, D, hasD, H, h0, dh, dA,  \
                           dB, dbs, dC, dcs, dD, duo, dzo, ddt);                               \
  }

DLCORE_SCAN_KERNELS(float, DLCORE_MULTIVERSION)
DLCORE_SCAN_KERNELS(double, )
#undef DLCORE_SCAN_KERNELS

// One decode step for rows [r0, r1) of (batch, dim): the N loop vectorised, one call per
// task (per-row calls into the multiversioned step functions cost more than the step).
template <typename T>
__attribute__((always_inline)) inline void state_update_rows_impl(
    int64_t r0, int64_t r1, int64_t dim, int64_t N, int64_t GB, int64_t GC, const T* x,
    const T* dt, const T* A, const T* B, const T* C, const T* D, const T* z, const T* bias,
    bool sp, T* state, T* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / dim, d = r % dim;
    const T* bb = B + (b * GB + d / (dim / GB)) * N;
    const T* cc = C + (b * GC + d / (dim / GC)) * N;
    const T* a = A + d * N;
    T* h = state + r * N;
    T dtv = dt[r] + (bias ? bias[d] : T(0));
    if (sp) dtv = softplus_<T>(dtv);
    const T du = dtv * x[r];
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) {
      const T hn = exp_<T>(dtv * a[n]) * h[n] + du * bb[n];
      h[n] = hn;
      acc += hn * cc[n];
    }
    T y = acc + (D ? D[d] * x[r] : T(0));
    if (z) y *= z[r] * sigmoid_<T>(z[r]);
    out[r] = y;
  }
}

#define DLCORE_STATE_UPDATE(T, ATTR)                                                            \
  ATTR void state_update_rows(int64_t r0, int64_t r1, int64_t dim, int64_t N, int64_t GB,     \
                              int64_t GC, const T* x, const T* dt, const T* A, const T* B,      \
                              const T* C, const T* D, const T* z, const T* bias, bool sp,      \
                              T* state, T* out) {                                               \
    state_update_rows_impl<T>(r0, r1, dim, N, GB, GC, x, dt, A, B, C, D, z, bias, sp, state,  \
                              out);                                                             \
  }
DLCORE_STATE_UPDATE(float, DLCORE_MULTIVERSION)
DLCORE_STATE_UPDATE(double, )
#undef DLCORE_STATE_UPDATE

// ---------------------------------------------------------------- channel-blocked forward
// The forward for variable B/C runs kBlock channels at once, vectorised across channels: the
// channels of a group share B_t and C_t, so the N loop broadcasts two scalars and the output
// needs no horizontal sum. Per-chunk buffers are (step, channel) transposed.
constexpr int64_t kBlock = 16;

// dt, du, y: [steps][kBlock]; A, h: [N][kBlock]; B, C: [steps][N] (this block's group).
template <typename T, int NC>
__attribute__((always_inline)) inline void block_steps_impl(int64_t steps, int64_t N_,
                                                            const T* dt, const T* du,
                                                            const T* A, const T* B, const T* C,
                                                            T* h, T* y) {
  const int64_t N = NC > 0 ? NC : N_;
  for (int64_t i = 0; i < steps; ++i) {
    const T* dti = dt + i * kBlock;
    const T* dui = du + i * kBlock;
    // Four partial sums over n, so the output is not one long chain of dependent FMAs.
    T acc[4][kBlock] = {};
    for (int64_t n = 0; n < N; ++n) {
      const T bn = B[i * N + n], cn = C[i * N + n];
      const T* An = A + n * kBlock;
      T* hn = h + n * kBlock;
      T* an = acc[n & 3];
#pragma omp simd
      for (int64_t w = 0; w < kBlock; ++w) {
        const T v = exp_<T>(dti[w] * An[w]) * hn[w] + dui[w] * bn;
        hn[w] = v;
        an[w] += v * cn;
      }
    }
#pragma omp simd
    for (int64_t w = 0; w < kBlock; ++w)
      y[i * kBlock + w] = (acc[0][w] + acc[1][w]) + (acc[2][w] + acc[3][w]);
  }
}

// Per-channel softplus/bias over a transposed chunk: dt[i][w] from delta[i][w] + bias[w].
template <typename T>
__attribute__((always_inline)) inline void block_prep_impl(int64_t steps, const T* bias,
                                                           bool softplus, T* dt, const T* u,
                                                           T* du) {
  for (int64_t i = 0; i < steps; ++i) {
    T* d = dt + i * kBlock;
    const T* ui = u + i * kBlock;
    T* o = du + i * kBlock;
    if (softplus) {
#pragma omp simd
      for (int64_t w = 0; w < kBlock; ++w) d[w] = softplus_<T>(d[w] + bias[w]);
    } else {
#pragma omp simd
      for (int64_t w = 0; w < kBlock; ++w) d[w] = d[w] + bias[w];
    }
#pragma omp simd
    for (int64_t w = 0; w < kBlock; ++w) o[w] = d[w] * ui[w];
  }
}

// y[i][w] = (y + D u) * silu(z), in place.
template <typename T>
__attribute__((always_inline)) inline void block_post_impl(int64_t steps, const T* D,
                                                           const T* u, const T* z, T* y) {
  for (int64_t i = 0; i < steps; ++i) {
    T* yi = y + i * kBlock;
    const T* ui = u + i * kBlock;
    if (z) {
      const T* zi = z + i * kBlock;
#pragma omp simd
      for (int64_t w = 0; w < kBlock; ++w)
        yi[w] = (yi[w] + D[w] * ui[w]) * (zi[w] * sigmoid_<T>(zi[w]));
    } else {
#pragma omp simd
      for (int64_t w = 0; w < kBlock; ++w) yi[w] = yi[w] + D[w] * ui[w];
    }
  }
}

#define DLCORE_BLOCK_KERNELS(T, ATTR)                                                         \
  ATTR void block_steps(int64_t s, int64_t N, const T* dt, const T* du, const T* A,         \
                        const T* B, const T* C, T* h, T* y) {                                 \
    if (N == 16)                                                                              \
      block_steps_impl<T, 16>(s, N, dt, du, A, B, C, h, y);                                   \
    else                                                                                      \
      block_steps_impl<T, 0>(s, N, dt, du, A, B, C, h, y);                                    \
  }                                                                                           \
  ATTR void block_prep(int64_t s, const T* bias, bool sp, T* dt, const T* u, T* du) {       \
    block_prep_impl<T>(s, bias, sp, dt, u, du);                                               \
  }                                                                                           \
  ATTR void block_post(int64_t s, const T* D, const T* u, const T* z, T* y) {               \
    block_post_impl<T>(s, D, u, z, y);                                                        \
  }

DLCORE_BLOCK_KERNELS(float, DLCORE_MULTIVERSION)
DLCORE_BLOCK_KERNELS(double, )
#undef DLCORE_BLOCK_KERNELS

// ---------------------------------------------------------------- AVX-512 float path
// The channel-blocked forward is bound by exp(dt * A): one per state element per step. GCC's
// vectorisation of fast_expf costs ~20 instructions and keeps the state in memory; here the
// state of N = 16 stays in registers and exp is 2^x with a degree-6 polynomial on the fraction
// and vscalefps for the exponent (no integer tricks, overflow/underflow handled by the
// instruction). The (channel, step) transposes use 16x16 register tiles.
#if defined(__GNUC__) && defined(__x86_64__)
#define DLCORE_AVX512 1
#define DLCORE_AVX512_FN __attribute__((target("avx512f,avx512dq")))

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  return ok;
}

// 2^x, relative error ~1e-7 (float rounding). The lower clamp keeps -inf finite for the
// fraction (2^-151 is 0); max(c, x) returns x when x is NaN. Large finite x need no clamp:
// their fraction is 0 and vscalefps saturates to 0 or inf; x = +inf (an infinite step, whose
// state is inf or NaN in any formulation) gives NaN.
DLCORE_AVX512_FN __attribute__((always_inline)) inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-151.0f), x);
  const __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, k);
  // Near-minimax fit of 2^f on [-0.5, 0.5] (relative error 1.0e-7 in float evaluation).
  __m512 p = _mm512_set1_ps(1.5350867761e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3399972813e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6184704453e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503286421e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022647738e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718246e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

DLCORE_AVX512_FN void transpose16(const float* src, int64_t ss, float* dst, int64_t ds);

// softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1], as 2 atanh(e / (2 + e)) by its
// odd series (|s| <= 1/3: eight terms reach float rounding); x > 20 passes, as torch's.
DLCORE_AVX512_FN __attribute__((always_inline)) inline __m512 softplus_ps(__m512 x) {
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 e = exp2_ps(_mm512_mul_ps(ax, _mm512_set1_ps(-1.4426950408889634f)));
  const __m512 s = _mm512_div_ps(e, _mm512_add_ps(_mm512_set1_ps(2.0f), e));
  const __m512 s2 = _mm512_mul_ps(s, s);
  __m512 q = _mm512_set1_ps(2.0f / 15.0f);
  q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(2.0f / 13.0f));
  q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(2.0f / 11.0f));
  q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(2.0f / 9.0f));
  q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(2.0f / 7.0f));
  q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(2.0f / 5.0f));
  q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(2.0f / 3.0f));
  q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(2.0f));
  const __m512 r = _mm512_fmadd_ps(q, s, _mm512_max_ps(x, _mm512_setzero_ps()));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(20.0f), _CMP_GT_OQ), r, x);
}

DLCORE_AVX512_FN __attribute__((always_inline)) inline __m512 sigmoid_ps(__m512 x) {
  const __m512 e = exp2_ps(_mm512_mul_ps(x, _mm512_set1_ps(-1.4426950408889634f)));
  return _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// block_post for float: y = (y + D u) * silu(z), in place.
DLCORE_AVX512_FN void block_post_avx512(int64_t steps, const float* D, const float* u,
                                        const float* z, float* y) {
  const __m512 Dv = _mm512_loadu_ps(D);
  for (int64_t i = 0; i < steps; ++i) {
    __m512 v = _mm512_fmadd_ps(Dv, _mm512_loadu_ps(u + i * kBlock), _mm512_loadu_ps(y + i * kBlock));
    if (z) {
      const __m512 zi = _mm512_loadu_ps(z + i * kBlock);
      v = _mm512_mul_ps(v, _mm512_mul_ps(zi, sigmoid_ps(zi)));
    }
    _mm512_storeu_ps(y + i * kBlock, v);
  }
}

// state_update_rows for float: rows in groups of 16, whose softplus, gate and skip run as
// vectors; per row 16 states per vector (masked tail) and one horizontal sum.
DLCORE_AVX512_FN void state_update_rows_avx512(int64_t r0, int64_t r1, int64_t dim, int64_t N,
                                               int64_t GB, int64_t GC, const float* x,
                                               const float* dt, const float* A, const float* B,
                                               const float* C, const float* D, const float* z,
                                               const float* bias, bool sp, float* state,
                                               float* out) {
  alignas(64) float bv[kBlock], Dv[kBlock], dts[kBlock], dus[kBlock], ys[kBlock];
  for (int64_t g0 = r0; g0 < r1; g0 += kBlock) {
    const int64_t cnt = std::min<int64_t>(kBlock, r1 - g0);
    const __mmask16 m = __mmask16((1u << cnt) - 1);
    for (int64_t j = 0; j < kBlock; ++j) {
      const int64_t d = (g0 + std::min(j, cnt - 1)) % dim;
      bv[j] = bias ? bias[d] : 0.0f;
      Dv[j] = D ? D[d] : 0.0f;
    }
    _mm512_store_ps(ys, _mm512_setzero_ps());
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + g0);
    __m512 t = _mm512_add_ps(_mm512_maskz_loadu_ps(m, dt + g0), _mm512_load_ps(bv));
    if (sp) t = softplus_ps(t);
    _mm512_store_ps(dts, _mm512_mul_ps(t, _mm512_set1_ps(1.4426950408889634f)));
    _mm512_store_ps(dus, _mm512_mul_ps(t, xv));
    for (int64_t j = 0; j < cnt; ++j) {
      const int64_t r = g0 + j, b = r / dim, d = r % dim;
      const float* bb = B + (b * GB + d / (dim / GB)) * N;
      const float* cc = C + (b * GC + d / (dim / GC)) * N;
      const float* a = A + d * N;
      float* h = state + r * N;
      const __m512 dl = _mm512_set1_ps(dts[j]), du = _mm512_set1_ps(dus[j]);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t n = 0; n < N; n += kBlock) {
        const __mmask16 mn = N - n >= kBlock ? __mmask16(0xFFFF) : __mmask16((1u << (N - n)) - 1);
        const __m512 e = exp2_ps(_mm512_mul_ps(dl, _mm512_maskz_loadu_ps(mn, a + n)));
        const __m512 hn = _mm512_fmadd_ps(e, _mm512_maskz_loadu_ps(mn, h + n),
                                          _mm512_mul_ps(du, _mm512_maskz_loadu_ps(mn, bb + n)));
        _mm512_mask_storeu_ps(h + n, mn, hn);
        acc = _mm512_fmadd_ps(hn, _mm512_maskz_loadu_ps(mn, cc + n), acc);
      }
      ys[j] = _mm512_reduce_add_ps(acc);
    }
    __m512 y = _mm512_fmadd_ps(_mm512_load_ps(Dv), xv, _mm512_load_ps(ys));
    if (z) {
      const __m512 zv = _mm512_maskz_loadu_ps(m, z + g0);
      y = _mm512_mul_ps(y, _mm512_mul_ps(zv, sigmoid_ps(zv)));
    }
    _mm512_mask_storeu_ps(out + g0, m, y);
  }
}

// block_prep for float: dt[i][w] = softplus?(dt[i][w] + bias[w]) in place, du = dt * u, and
// (backward, when dsp is given) dsp = d dt / d delta.
DLCORE_AVX512_FN void block_prep_avx512(int64_t steps, const float* bias, bool softplus,
                                        float* dt, const float* u, float* du, float* dsp) {
  const __m512 bv = _mm512_loadu_ps(bias);
  for (int64_t i = 0; i < steps; ++i) {
    const __m512 x = _mm512_add_ps(_mm512_loadu_ps(dt + i * kBlock), bv);
    const __m512 d = softplus ? softplus_ps(x) : x;
    _mm512_storeu_ps(dt + i * kBlock, d);
    _mm512_storeu_ps(du + i * kBlock, _mm512_mul_ps(d, _mm512_loadu_ps(u + i * kBlock)));
    if (dsp) {
      __m512 g = _mm512_set1_ps(1.0f);
      if (softplus)
        g = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(20.0f), _CMP_GT_OQ),
                                 sigmoid_ps(x), g);
      _mm512_storeu_ps(dsp + i * kBlock, g);
    }
  }
}

// Forward recompute of a chunk for the backward: from h ([N][kBlock], the chunk's start state)
// stores the state after every step in H[(i + 1) * N * kBlock] (H[0] = start state), the decays
// exp(dt A) in E[i * N * kBlock] and y[i] = <C_i, h_i> (the part before the D skip).
DLCORE_AVX512_FN void block_record_avx512(int64_t steps, int64_t N, const float* dt,
                                          const float* du, const float* A2, const float* B,
                                          const float* C, float* H, float* E, float* y) {
  const int64_t S = N * kBlock;
  for (int64_t i = 0; i < steps; ++i) {
    const __m512 d = _mm512_loadu_ps(dt + i * kBlock), x = _mm512_loadu_ps(du + i * kBlock);
    const float *b = B + i * N, *c = C + i * N, *hp = H + i * S;
    float *hn = H + (i + 1) * S, *e = E + i * S;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t n = 0;
    for (; n + 1 < N; n += 2) {
      const __m512 a0 = exp2_ps(_mm512_mul_ps(d, _mm512_loadu_ps(A2 + n * kBlock)));
      const __m512 a1 = exp2_ps(_mm512_mul_ps(d, _mm512_loadu_ps(A2 + (n + 1) * kBlock)));
      const __m512 h0 = _mm512_fmadd_ps(a0, _mm512_loadu_ps(hp + n * kBlock),
                                        _mm512_mul_ps(x, _mm512_set1_ps(b[n])));
      const __m512 h1 = _mm512_fmadd_ps(a1, _mm512_loadu_ps(hp + (n + 1) * kBlock),
                                        _mm512_mul_ps(x, _mm512_set1_ps(b[n + 1])));
      _mm512_storeu_ps(e + n * kBlock, a0);
      _mm512_storeu_ps(e + (n + 1) * kBlock, a1);
      _mm512_storeu_ps(hn + n * kBlock, h0);
      _mm512_storeu_ps(hn + (n + 1) * kBlock, h1);
      acc0 = _mm512_fmadd_ps(h0, _mm512_set1_ps(c[n]), acc0);
      acc1 = _mm512_fmadd_ps(h1, _mm512_set1_ps(c[n + 1]), acc1);
    }
    if (n < N) {
      const __m512 a0 = exp2_ps(_mm512_mul_ps(d, _mm512_loadu_ps(A2 + n * kBlock)));
      const __m512 h0 = _mm512_fmadd_ps(a0, _mm512_loadu_ps(hp + n * kBlock),
                                        _mm512_mul_ps(x, _mm512_set1_ps(b[n])));
      _mm512_storeu_ps(e + n * kBlock, a0);
      _mm512_storeu_ps(hn + n * kBlock, h0);
      acc0 = _mm512_fmadd_ps(h0, _mm512_set1_ps(c[n]), acc0);
    }
    _mm512_storeu_ps(y + i * kBlock, _mm512_add_ps(acc0, acc1));
  }
}

// Reverse steps of a chunk for kBlock channels (all buffers [step][lane] or [step][N][lane]).
// dh ([N][kBlock]) carries d loss / d h across steps; dA ([N][kBlock]), dD and dbias (per lane)
// accumulate; PB/PC receive per-lane terms of dB/dC ([step][N][lane], summed over lanes later).
// PB/PC are stored (first block of a chunk) or added to (accumulate). On return dout holds
// d loss / d u, y holds d loss / d delta and z (if given) d loss / d z.
DLCORE_AVX512_FN void block_bwd_avx512(int64_t steps, int64_t N, float* dout, const float* u,
                                       float* z, const float* dt, const float* du,
                                       const float* dsp, const float* A, const float* B,
                                       const float* C, const float* D, const float* H,
                                       const float* E, float* y, float* dh, float* dA,
                                       float* dD, float* dbias, float* PB, float* PC,
                                       bool accumulate) {
  const int64_t S = N * kBlock;
  const __m512 Dv = _mm512_loadu_ps(D), one = _mm512_set1_ps(1.0f);
  __m512 dD_acc = _mm512_loadu_ps(dD), db_acc = _mm512_loadu_ps(dbias);
  for (int64_t i = steps - 1; i >= 0; --i) {
    const __m512 ui = _mm512_loadu_ps(u + i * kBlock), d = _mm512_loadu_ps(dt + i * kBlock);
    const __m512 x = _mm512_loadu_ps(du + i * kBlock);
    __m512 g = _mm512_loadu_ps(dout + i * kBlock);
    if (z) {
      const __m512 zi = _mm512_loadu_ps(z + i * kBlock), sg = sigmoid_ps(zi);
      const __m512 yi = _mm512_fmadd_ps(Dv, ui, _mm512_loadu_ps(y + i * kBlock));
      // d silu(z) / dz = s (1 + z (1 - s))
      const __m512 ds = _mm512_mul_ps(sg, _mm512_fmadd_ps(zi, _mm512_sub_ps(one, sg), one));
      _mm512_storeu_ps(z + i * kBlock, _mm512_mul_ps(_mm512_mul_ps(g, yi), ds));
      g = _mm512_mul_ps(g, _mm512_mul_ps(zi, sg));
    }
    dD_acc = _mm512_fmadd_ps(g, ui, dD_acc);
    const float *b = B + i * N, *c = C + i * N, *h = H + (i + 1) * S, *hp = H + i * S;
    const float* e = E + i * S;
    float *pb = PB + i * S, *pc = PC + i * S;
    __m512 sum_b = _mm512_setzero_ps(), sum_dt = _mm512_setzero_ps();
    for (int64_t n = 0; n < N; ++n) {
      const __m512 bn = _mm512_set1_ps(b[n]);
      const __m512 a = _mm512_loadu_ps(e + n * kBlock);
      const __m512 gh = _mm512_fmadd_ps(g, _mm512_set1_ps(c[n]), _mm512_loadu_ps(dh + n * kBlock));
      __m512 tc = _mm512_mul_ps(g, _mm512_loadu_ps(h + n * kBlock));
      __m512 tb = _mm512_mul_ps(gh, x);
      if (accumulate) {
        tc = _mm512_add_ps(tc, _mm512_loadu_ps(pc + n * kBlock));
        tb = _mm512_add_ps(tb, _mm512_loadu_ps(pb + n * kBlock));
      }
      _mm512_storeu_ps(pc + n * kBlock, tc);
      _mm512_storeu_ps(pb + n * kBlock, tb);
      sum_b = _mm512_fmadd_ps(gh, bn, sum_b);
      const __m512 ahp = _mm512_mul_ps(a, _mm512_loadu_ps(hp + n * kBlock));
      const __m512 An = _mm512_loadu_ps(A + n * kBlock);
      sum_dt = _mm512_fmadd_ps(gh, _mm512_fmadd_ps(An, ahp, _mm512_mul_ps(ui, bn)), sum_dt);
      _mm512_storeu_ps(dA + n * kBlock, _mm512_fmadd_ps(_mm512_mul_ps(gh, d), ahp,
                                                        _mm512_loadu_ps(dA + n * kBlock)));
      _mm512_storeu_ps(dh + n * kBlock, _mm512_mul_ps(a, gh));
    }
    _mm512_storeu_ps(dout + i * kBlock, _mm512_fmadd_ps(g, Dv, _mm512_mul_ps(d, sum_b)));
    const __m512 dd = _mm512_mul_ps(sum_dt, _mm512_loadu_ps(dsp + i * kBlock));
    _mm512_storeu_ps(y + i * kBlock, dd);
    db_acc = _mm512_add_ps(db_acc, dd);
  }
  _mm512_storeu_ps(dD, dD_acc);
  _mm512_storeu_ps(dbias, db_acc);
}

// out[i * N + n] = sum over lanes of P[(i * N + n) * kBlock + lane], for rows*N sums.
DLCORE_AVX512_FN void lane_sums(int64_t count, const float* P, float* out) {
  int64_t k = 0;
  alignas(64) float tile[kBlock * kBlock];
  for (; k + kBlock <= count; k += kBlock) {
    transpose16(P + k * kBlock, kBlock, tile, kBlock);
    __m512 s = _mm512_loadu_ps(tile);
    for (int w = 1; w < kBlock; ++w) s = _mm512_add_ps(s, _mm512_loadu_ps(tile + w * kBlock));
    _mm512_storeu_ps(out + k, s);
  }
  for (; k < count; ++k) out[k] = _mm512_reduce_add_ps(_mm512_loadu_ps(P + k * kBlock));
}

// dst[j][i] = src[i][j] for a 16x16 tile (row strides in floats).
DLCORE_AVX512_FN void transpose16(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ds, r[i]);
}

// block_steps with A2 = A * log2(e) ([N][kBlock]) for states [n0, n0 + NB): their part of y
// is stored (first) or added. The NB states stay in registers across the steps; NB = 8 leaves
// registers for the polynomial constants (16 would spill).
// pf (when given): cache lines to prefetch, one (row, line) per step, so the memory traffic of
// the next chunk overlaps this chunk's arithmetic.
struct Prefetch {
  const char* base[4];  // the arrays' lane-0 rows at the next chunk's first step
  int narrays;
  int64_t row_bytes, lines_per_row, rows;
};

template <int NB>
DLCORE_AVX512_FN __attribute__((always_inline)) inline void block_states_avx512(
    int64_t steps, int64_t N, int64_t n0, bool first, const float* dt, const float* du,
    const float* A2, const float* B, const float* C, float* h, float* y, const Prefetch* pf) {
  const int64_t npf = pf ? pf->rows * pf->lines_per_row : 0;
  __m512 H[NB], Av[NB];
  for (int j = 0; j < NB; ++j) {
    H[j] = _mm512_loadu_ps(h + (n0 + j) * kBlock);
    Av[j] = _mm512_loadu_ps(A2 + (n0 + j) * kBlock);
  }
  for (int64_t i = 0; i < steps; ++i) {
    const __m512 d = _mm512_loadu_ps(dt + i * kBlock), x = _mm512_loadu_ps(du + i * kBlock);
    const float* b = B + i * N + n0;
    const float* c = C + i * N + n0;
    if (i < npf) {
      const int64_t r = i / pf->lines_per_row;
      const int64_t off = r * pf->row_bytes + (i - r * pf->lines_per_row) * 64;
      for (int a = 0; a < pf->narrays; ++a) _mm_prefetch(pf->base[a] + off, _MM_HINT_T0);
    }
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      const __m512 a = exp2_ps(_mm512_mul_ps(d, Av[j]));
      H[j] = _mm512_fmadd_ps(a, H[j], _mm512_mul_ps(x, _mm512_set1_ps(b[j])));
      if (j & 1)
        acc1 = _mm512_fmadd_ps(H[j], _mm512_set1_ps(c[j]), acc1);
      else
        acc0 = _mm512_fmadd_ps(H[j], _mm512_set1_ps(c[j]), acc0);
    }
    __m512 s = _mm512_add_ps(acc0, acc1);
    if (!first) s = _mm512_add_ps(s, _mm512_loadu_ps(y + i * kBlock));
    _mm512_storeu_ps(y + i * kBlock, s);
  }
  for (int j = 0; j < NB; ++j) _mm512_storeu_ps(h + (n0 + j) * kBlock, H[j]);
}

DLCORE_AVX512_FN void block_steps_avx512(int64_t s, int64_t N, const float* dt, const float* du,
                                         const float* A2, const float* B, const float* C,
                                         float* h, float* y, const Prefetch* pf) {
  int64_t n0 = 0;
  for (; n0 + 8 <= N; n0 += 8, pf = nullptr)
    block_states_avx512<8>(s, N, n0, n0 == 0, dt, du, A2, B, C, h, y, pf);
  for (; n0 + 2 <= N; n0 += 2, pf = nullptr)
    block_states_avx512<2>(s, N, n0, n0 == 0, dt, du, A2, B, C, h, y, pf);
  if (n0 < N) block_states_avx512<1>(s, N, n0, n0 == 0, dt, du, A2, B, C, h, y, pf);
}
#endif

// dst[i * kBlock + w] = src[w * ss + i] for w < width, i < steps (a (width, steps) slab of rows
// to the (step, lane) layout); lanes >= width are left as they are.
template <typename T>
void to_lanes(const T* src, int64_t ss, int64_t width, int64_t steps, T* dst) {
  int64_t i0 = 0;
#ifdef DLCORE_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (width == kBlock && has_avx512())
      for (; i0 + kBlock <= steps; i0 += kBlock) transpose16(src + i0, ss, dst + i0 * kBlock, kBlock);
  }
#endif
  for (int64_t w = 0; w < width; ++w)
    for (int64_t i = i0; i < steps; ++i) dst[i * kBlock + w] = src[w * ss + i];
}

// The inverse: dst[w * ds + i] = src[i * kBlock + w].
template <typename T>
void from_lanes(const T* src, int64_t width, int64_t steps, T* dst, int64_t ds) {
  int64_t i0 = 0;
#ifdef DLCORE_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (width == kBlock && has_avx512())
      for (; i0 + kBlock <= steps; i0 += kBlock) transpose16(src + i0 * kBlock, kBlock, dst + i0, ds);
  }
#endif
  for (int64_t w = 0; w < width; ++w)
    for (int64_t i = i0; i < steps; ++i) dst[w * ds + i] = src[i * kBlock + w];
}

// ---------------------------------------------------------------- problem description

template <typename T>
struct Problem {
  // GB, GC: groups of B and C (1 when constant); GF = lcm(GB, GC): the finest channel groups,
  // inside which every channel shares its B row and its C row.
  int64_t batch, dim, L, N, GB, GC, GF, chunk, nchunks;
  bool softplus;
  const T *u, *delta, *z, *A, *B, *C, *D, *bias, *init;
  bool b_var, c_var;  // B/C are (batch, G, L, N) after the transpose, else (dim, N)
  std::vector<int64_t> starts, ends;  // per sequence; one sequence [0, L) without cu_seqlens
  bool packed;

  // Pointers to B/C for row (b, d) at step t, and their per-step advance.
  const T* bc(const T* M, bool var, int64_t G, int64_t b, int64_t d, int64_t t) const {
    return var ? M + ((b * G + d / (dim / G)) * L + t) * N : M + d * N;
  }
  const T* bptr(int64_t b, int64_t d, int64_t t) const { return bc(B, b_var, GB, b, d, t); }
  const T* cptr(int64_t b, int64_t d, int64_t t) const { return bc(C, c_var, GC, b, d, t); }
  int64_t bc_step(bool var) const { return var ? N : 0; }
  // Initial-state row of sequence s of batch row b (nullptr: zeros).
  const T* init_row(int64_t b, int64_t s, int64_t d) const {
    if (!init) return nullptr;
    return init + ((packed ? s : b) * dim + d) * N;
  }
  int64_t state_row(int64_t b, int64_t s) const { return packed ? s : b; }
};

// The non-empty pieces of chunk c: (sequence, first step, end step), in order.
struct Piece {
  int64_t s, a, b;
};
template <typename T>
void chunk_pieces(const Problem<T>& p, int64_t c, std::vector<Piece>& out) {
  out.clear();
  const int64_t t0 = c * p.chunk, t1 = std::min(p.L, t0 + p.chunk);
  const auto first = std::upper_bound(p.ends.begin(), p.ends.end(), t0) - p.ends.begin();
  for (int64_t s = first; s < (int64_t)p.starts.size() && p.starts[s] < t1; ++s) {
    const int64_t a = std::max(p.starts[s], t0), b = std::min(p.ends[s], t1);
    if (a < b) out.push_back({s, a, b});
  }
}

template <typename T>
void set_state(T* h, const T* src, int64_t N) {
  if (src)
    std::copy(src, src + N, h);
  else
    std::fill(h, h + N, T(0));
}

// Per-task scratch for one chunk.
template <typename T>
struct Scratch {
  std::vector<T> dt, du, dsp, y, H, dh, ddt, cur;
  Scratch(int64_t chunk, int64_t N, bool states)
      : dt(chunk), du(chunk), dsp(chunk), y(chunk), dh(N), ddt(chunk), cur(N) {
    if (states) H.resize((chunk + 1) * N);
  }
};

// Forward over chunk c of row (b, d) starting from state h; writes out (compute dtype, whole
// row (L) pointer), last states of sequences ending in the chunk, and, when store_chunk, the
// chunk's start state.
template <typename T>
void fwd_chunk(const Problem<T>& p, int64_t b, int64_t d, int64_t c, T* h, Scratch<T>& w,
               std::vector<Piece>& pieces, T* out_row, T* last, T* chunk_states,
               bool store_chunk) {
  const int64_t N = p.N, row = b * p.dim + d, t0 = c * p.chunk;
  chunk_pieces(p, c, pieces);
  for (const Piece& q : pieces) {
    if (q.a == p.starts[q.s] && (q.a > t0 || store_chunk)) set_state(h, p.init_row(b, q.s, d), N);
    if (q.a == t0 && store_chunk) std::copy(h, h + N, chunk_states + (row * p.nchunks + c) * N);
    const int64_t n = q.b - q.a, off = row * p.L + q.a;
    prep(n, p.delta + off, p.u + off, p.bias ? p.bias[d] : T(0), p.softplus, w.dt.data(),
         w.du.data(), (T*)nullptr);
    steps_y(n, N, w.dt.data(), w.du.data(), p.A + d * N, p.bptr(b, d, q.a),
            p.bc_step(p.b_var), p.cptr(b, d, q.a), p.bc_step(p.c_var), h,
            w.y.data());
    post(n, w.y.data(), p.u + off, p.D ? p.D[d] : T(0), p.z ? p.z + off : nullptr,
         out_row + q.a);
    if (q.b == p.ends[q.s]) std::copy(h, h + N, last + (p.state_row(b, q.s) * p.dim + d) * N);
  }
}

// ---------------------------------------------------------------- forward
// Forward of kBlock channels [d0, d0 + width) of batch row b, all in one fine group (so they
// share B_t and C_t), over every chunk; lanes beyond width run on zeros and are not stored.
template <typename T>
void fwd_block(const Problem<T>& p, int64_t b, int64_t d0, int64_t width, T* out, T* last,
               T* chunk_states, std::vector<T>& buf, std::vector<Piece>& pieces) {
  const int64_t N = p.N, K = kBlock, L = p.L, cs = p.chunk;
  buf.assign(5 * cs * K + 3 * N * K + 2 * K, T(0));
  T *U = buf.data(), *DT = U + cs * K, *DU = DT + cs * K, *Z = DU + cs * K, *Y = Z + cs * K;
  T *A = Y + cs * K, *H = A + N * K, *bias = H + N * K, *D = bias + K, *A2 = D + K;
  for (int64_t w = 0; w < width; ++w) {
    for (int64_t n = 0; n < N; ++n) {
      A[n * K + w] = p.A[(d0 + w) * N + n];
      A2[n * K + w] = A[n * K + w] * T(1.4426950408889634);
    }
    bias[w] = p.bias ? p.bias[d0 + w] : T(0);
    D[w] = p.D ? p.D[d0 + w] : T(0);
  }
  // States are (N, lane) here and (channel, N) rows outside: the same transposes as the inputs.
  auto load_state = [&](const T* src_of_lane0, int64_t stride_rows, bool zero) {
    if (zero)
      std::fill(H, H + N * K, T(0));
    else
      to_lanes(src_of_lane0, stride_rows, width, N, H);
  };
  auto store_state = [&](T* dst_lane0, int64_t stride_rows) {
    from_lanes(H, width, N, dst_lane0, stride_rows);
  };
  auto gather = [&](const T* src, int64_t t0, int64_t steps, T* dst) {
    to_lanes(src + (b * p.dim + d0) * L + t0, L, width, steps, dst);
  };
#ifdef DLCORE_AVX512
  const bool avx512 = std::is_same_v<T, float> && has_avx512();
#endif
  // The block reads 16 rows far apart (3 inputs) and writes 16: more streams than the hardware
  // prefetcher follows. The cache lines of the next chunk are prefetched during this chunk's
  // steps (AVX-512 path).
#ifdef DLCORE_AVX512
  Prefetch pf{};
  auto next_chunk_lines = [&](int64_t c) {
    pf.rows = 0;
    if (c >= p.nchunks) return;
    const int64_t t0 = c * cs, off = (b * p.dim + d0) * L + t0;
    pf.narrays = 0;
    for (const T* a : {p.u, p.delta, p.z, (const T*)out})
      if (a) pf.base[pf.narrays++] = (const char*)(a + off);
    pf.row_bytes = L * (int64_t)sizeof(T);
    pf.lines_per_row = ((std::min(L, t0 + cs) - t0) * (int64_t)sizeof(T) + 63) / 64;
    pf.rows = width;
  };
#endif
  for (int64_t c = 0; c < p.nchunks; ++c) {
    const int64_t t0 = c * cs;
#ifdef DLCORE_AVX512
    if (avx512) next_chunk_lines(c + 1);
#endif
    chunk_pieces(p, c, pieces);
    for (const Piece& q : pieces) {
      if (q.a == p.starts[q.s]) {
        const T* init = p.init_row(b, q.s, d0);
        load_state(init, N, init == nullptr);
      }
      if (q.a == t0)
        store_state(chunk_states + ((b * p.dim + d0) * p.nchunks + c) * N, p.nchunks * N);
      const int64_t n = q.b - q.a;
      gather(p.u, q.a, n, U);
      gather(p.delta, q.a, n, DT);
      if (p.z) gather(p.z, q.a, n, Z);
#ifdef DLCORE_AVX512
      if constexpr (std::is_same_v<T, float>) {
        if (avx512)
          block_prep_avx512(n, bias, p.softplus, DT, U, DU, nullptr);
        else
          block_prep(n, bias, p.softplus, DT, U, DU);
      } else
#endif
      {
        block_prep(n, bias, p.softplus, DT, U, DU);
      }
#ifdef DLCORE_AVX512
      if constexpr (std::is_same_v<T, float>) {
        if (avx512) {
          block_steps_avx512(n, N, DT, DU, A2, p.bptr(b, d0, q.a), p.cptr(b, d0, q.a), H, Y,
                             &pf);
        } else {
          block_steps(n, N, DT, DU, A, p.bptr(b, d0, q.a), p.cptr(b, d0, q.a), H, Y);
        }
      } else
#endif
      {
        block_steps(n, N, DT, DU, A, p.bptr(b, d0, q.a), p.cptr(b, d0, q.a), H, Y);
      }
#ifdef DLCORE_AVX512
      if constexpr (std::is_same_v<T, float>) {
        if (avx512)
          block_post_avx512(n, D, U, p.z ? Z : nullptr, Y);
        else
          block_post(n, D, U, p.z ? Z : nullptr, Y);
      } else
#endif
      {
        block_post(n, D, U, p.z ? Z : nullptr, Y);
      }
      from_lanes(Y, width, n, out + (b * p.dim + d0) * L + q.a, L);
      if (q.b == p.ends[q.s])
        store_state(last + (p.state_row(b, q.s) * p.dim + d0) * N, N);
    }
  }
}


template <typename T>
void forward(const Problem<T>& p, T* out, T* last, T* chunk_states) {
  const int64_t rows = p.batch * p.dim, N = p.N;
  // Empty sequences: their last state is their initial state.
  for (int64_t s = 0; s < (int64_t)p.starts.size(); ++s) {
    if (p.starts[s] != p.ends[s]) continue;
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t d = 0; d < p.dim; ++d)
        set_state(last + (p.state_row(b, s) * p.dim + d) * N, p.init_row(b, s, d), N);
  }
  const int64_t threads = at::get_num_threads();
  const int64_t cpg = p.dim / p.GF, per_group = (cpg + kBlock - 1) / kBlock;
  const int64_t blocks = p.batch * p.GF * per_group;
  if (p.b_var && p.c_var && (blocks >= 2 * threads || p.nchunks < 2)) {
    at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
      std::vector<T> buf;
      std::vector<Piece> pieces;
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t j = k % per_group, g = (k / per_group) % p.GF, b = k / (per_group * p.GF);
        const int64_t d0 = g * cpg + j * kBlock;
        const int64_t width = std::min(kBlock, (g + 1) * cpg - d0);
        fwd_block(p, b, d0, width, out, last, chunk_states, buf, pieces);
      }
    });
    return;
  }
  if (rows >= 2 * threads || p.nchunks < 2) {
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      Scratch<T> w(p.chunk, N, false);
      std::vector<Piece> pieces;
      std::vector<T> h(N);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / p.dim, d = r % p.dim;
        for (int64_t c = 0; c < p.nchunks; ++c)
          fwd_chunk(p, b, d, c, h.data(), w, pieces, out + r * p.L, last, chunk_states, true);
      }
    });
    return;
  }
  // Few rows, long sequences: chunks in parallel. Pass 1: each chunk's end state from a zero
  // start (S) and its decay exp(A * sum dt) (P, zero when a sequence starts inside the chunk).
  const int64_t tasks = rows * p.nchunks;
  std::vector<T> S(tasks * N), P(tasks * N);
  at::parallel_for(0, tasks, 1, [&](int64_t k0, int64_t k1) {
    Scratch<T> w(p.chunk, N, false);
    std::vector<Piece> pieces;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r = k / p.nchunks, c = k % p.nchunks, b = r / p.dim, d = r % p.dim;
      const int64_t t0 = c * p.chunk;
      T* h = S.data() + k * N;
      std::fill(h, h + N, T(0));
      T dt_sum = 0;
      bool restarted = false;
      chunk_pieces(p, c, pieces);
      for (const Piece& q : pieces) {
        if (q.a == p.starts[q.s] && q.a > t0) {
          set_state(h, p.init_row(b, q.s, d), N);
          restarted = true;
        }
        const int64_t n = q.b - q.a, off = r * p.L + q.a;
        prep(n, p.delta + off, p.u + off, p.bias ? p.bias[d] : T(0), p.softplus, w.dt.data(),
             w.du.data(), (T*)nullptr);
        for (int64_t i = 0; i < n; ++i) dt_sum += w.dt[i];
        steps_state(n, N, w.dt.data(), w.du.data(), p.A + d * N,
                    p.bptr(b, d, q.a), p.bc_step(p.b_var), h);
      }
      for (int64_t j = 0; j < N; ++j)
        P[k * N + j] = restarted ? T(0) : exp_<T>(p.A[d * N + j] * dt_sum);
    }
  });
  // Pass 2: carry the states across chunks (sequence starts at a chunk start reset it).
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<T> h(N);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / p.dim, d = r % p.dim;
      std::fill(h.begin(), h.end(), T(0));
      for (int64_t c = 0; c < p.nchunks; ++c) {
        const int64_t t0 = c * p.chunk;
        const auto s = std::lower_bound(p.starts.begin(), p.starts.end(), t0) - p.starts.begin();
        // The last sequence starting at t0 is the non-empty one.
        int64_t hit = -1;
        for (int64_t j = s; j < (int64_t)p.starts.size() && p.starts[j] == t0; ++j) hit = j;
        if (hit >= 0) set_state(h.data(), p.init_row(b, hit, d), N);
        std::copy(h.begin(), h.end(), chunk_states + (r * p.nchunks + c) * N);
        const int64_t k = r * p.nchunks + c;
        for (int64_t j = 0; j < N; ++j) h[j] = P[k * N + j] * h[j] + S[k * N + j];
      }
    }
  });
  // Pass 3: outputs and last states, chunks in parallel from their start states.
  at::parallel_for(0, tasks, 1, [&](int64_t k0, int64_t k1) {
    Scratch<T> w(p.chunk, N, false);
    std::vector<Piece> pieces;
    std::vector<T> h(N);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r = k / p.nchunks, c = k % p.nchunks, b = r / p.dim, d = r % p.dim;
      std::copy_n(chunk_states + k * N, N, h.data());
      fwd_chunk(p, b, d, c, h.data(), w, pieces, out + r * p.L, last, chunk_states, false);
    }
  });
}

// ---------------------------------------------------------------- backward

template <typename T>
struct Grads {
  const T *dout, *dlast, *chunk_states;
  T *du, *ddelta, *dz, *dinit;
  // Per-task partials reduced afterwards in a fixed order.
  T *dA_part, *dD_part, *dbias_part;  // (batch, dim, N), (batch, dim), (batch, dim)
  T *dB_part, *dC_part;  // variable: (batch, G, nblk, L, N); constant: (batch, dim, N)
  int64_t nblk;
};

template <typename T>
void backward_row(const Problem<T>& p, const Grads<T>& g, int64_t b, int64_t d, int64_t blk,
                  Scratch<T>& w, std::vector<Piece>& pieces) {
  const int64_t N = p.N, row = b * p.dim + d, gi = d / (p.dim / p.GF);
  T* dA = g.dA_part + row * N;
  T* dD = g.dD_part + row;
  T dbias = 0;
  // Partial rows for B/C: variable ones are (L, N) slabs of this task's block.
  auto part = [&](T* base, bool var) {
    return var ? base + ((b * p.GF + gi) * g.nblk + blk) * p.L * N : base + row * N;
  };
  T* dBp = part(g.dB_part, p.b_var);
  T* dCp = part(g.dC_part, p.c_var);
  T* dh = w.dh.data();
  std::fill(dh, dh + N, T(0));
  for (int64_t c = p.nchunks - 1; c >= 0; --c) {
    const int64_t t0 = c * p.chunk;
    chunk_pieces(p, c, pieces);
    // Recompute the chunk's states: H[(t - t0 + 1) * N] after step t, H[0] before t0.
    T* H = w.H.data();
    std::copy_n(g.chunk_states + (row * p.nchunks + c) * N, N, H);
    for (const Piece& q : pieces) {
      // The running state restarts at a sequence start inside the chunk; H keeps the state
      // after the previous piece, which the reverse pass still needs.
      if (q.a > t0)
        set_state(w.cur.data(), p.init_row(b, q.s, d), N);
      else
        std::copy_n(H, N, w.cur.data());
      const int64_t n = q.b - q.a, off = row * p.L + q.a;
      prep(n, p.delta + off, p.u + off, p.bias ? p.bias[d] : T(0), p.softplus, w.dt.data(),
           w.du.data(), (T*)nullptr);
      steps_record(n, N, w.dt.data(), w.du.data(), p.A + d * N, p.bptr(b, d, q.a),
                   p.bc_step(p.b_var), w.cur.data(), H + (q.a - t0) * N);
    }
    for (int64_t qi = (int64_t)pieces.size() - 1; qi >= 0; --qi) {
      const Piece& q = pieces[qi];
      if (q.b == p.ends[q.s])  // entering a sequence from its end: d loss / d last state
        set_state(dh, g.dlast ? g.dlast + (p.state_row(b, q.s) * p.dim + d) * N : nullptr, N);
      const int64_t n = q.b - q.a, off = row * p.L + q.a;
      prep(n, p.delta + off, p.u + off, p.bias ? p.bias[d] : T(0), p.softplus, w.dt.data(),
           w.du.data(), w.dsp.data());
      const T* h0 = H + (q.a - t0) * N;
      if (q.a > t0) {  // the state before a sequence start is that sequence's initial state
        set_state(w.cur.data(), p.init_row(b, q.s, d), N);
        h0 = w.cur.data();
      }
      const int64_t bstep = p.bc_step(p.b_var), cstep = p.bc_step(p.c_var);
      bwd_steps(n, N, g.dout + off, p.u + off, p.z ? p.z + off : nullptr, w.dt.data(),
                w.du.data(), p.A + d * N, p.bptr(b, d, q.a), bstep,
                p.cptr(b, d, q.a), cstep, p.D ? p.D[d] : T(0), p.D != nullptr,
                H + (q.a - t0) * N, h0, dh, dA, dBp + (p.b_var ? q.a * N : 0), bstep,
                dCp + (p.c_var ? q.a * N : 0), cstep, dD, g.du + off,
                g.dz ? g.dz + off : nullptr, w.ddt.data());
      for (int64_t i = 0; i < n; ++i) {
        const T v = w.ddt[i] * w.dsp[i];
        g.ddelta[off + i] = v;
        dbias += v;
      }
      if (q.a == p.starts[q.s] && g.dinit)
        std::copy(dh, dh + N, g.dinit + (p.state_row(b, q.s) * p.dim + d) * N);
    }
  }
  g.dbias_part[row] = dbias;
}


#ifdef DLCORE_AVX512
// The backward of channels [d0, d1) of batch row b, fine group gi, task block blk, kBlock
// channels at a time across lanes (variable B/C, no cu_seqlens, float, AVX-512): per chunk,
// newest first, every channel block recomputes its states from chunk_states, then runs the
// reverse steps; the per-lane dB/dC terms of all blocks are summed over lanes once per chunk.
// Lanes past d1 run on zeros (dout, dlast, u and the start state are zero) and add nothing.
void backward_blocked(const Problem<float>& p, const Grads<float>& g, int64_t b, int64_t gi,
                      int64_t blk, int64_t d0, int64_t d1) {
  const int64_t N = p.N, K = kBlock, L = p.L, cs = p.chunk, S = N * K;
  const int64_t nb = (d1 - d0 + K - 1) / K;
  // Per channel block: dh, A2 (A log2 e), A, dA ([N][lane] each), then D, bias, dD, dbias.
  const int64_t per = 4 * S + 4 * K;
  std::vector<float> per_block(nb * per, 0.0f);
  std::vector<float> lanes(8 * cs * K, 0.0f), HE((2 * cs + 1) * S), PB(cs * S), PC(cs * S);
  float *U = lanes.data(), *DT = U + cs * K, *DU = DT + cs * K, *DSP = DU + cs * K;
  float *Z = DSP + cs * K, *DO = Z + cs * K, *Y = DO + cs * K;
  float *H = HE.data(), *E = H + (cs + 1) * S;
  auto blk_ptr = [&](int64_t j) { return per_block.data() + j * per; };
  // Rows of (batch, dim, *) tensors for lane w of block j; states (.., N) likewise.
  auto width_of = [&](int64_t j) { return std::min(K, d1 - (d0 + j * K)); };
  auto load_state = [&](const float* src, int64_t stride, int64_t width, float* dst) {
    if (width < K || !src) std::fill(dst, dst + S, 0.0f);
    if (src) to_lanes(src, stride, width, N, dst);
  };
  for (int64_t j = 0; j < nb; ++j) {
    float* q = blk_ptr(j);
    const int64_t dj = d0 + j * K, width = width_of(j);
    for (int64_t w = 0; w < width; ++w) {
      for (int64_t n = 0; n < N; ++n) {
        q[S + n * K + w] = p.A[(dj + w) * N + n] * 1.4426950408889634f;
        q[2 * S + n * K + w] = p.A[(dj + w) * N + n];
      }
      q[4 * S + w] = p.D ? p.D[dj + w] : 0.0f;
      q[4 * S + K + w] = p.bias ? p.bias[dj + w] : 0.0f;
    }
    load_state(g.dlast ? g.dlast + (b * p.dim + dj) * N : nullptr, N, width, q);
  }
  float* dBp = g.dB_part + ((b * p.GF + gi) * g.nblk + blk) * L * N;
  float* dCp = g.dC_part + ((b * p.GF + gi) * g.nblk + blk) * L * N;
  for (int64_t c = p.nchunks - 1; c >= 0; --c) {
    const int64_t t0 = c * cs, n = std::min(L, t0 + cs) - t0;
    for (int64_t j = 0; j < nb; ++j) {
      float* q = blk_ptr(j);
      float *dh = q, *A2 = q + S, *A = q + 2 * S, *dA = q + 3 * S;
      float *Dv = q + 4 * S, *bias = Dv + K, *dD = bias + K, *db = dD + K;
      const int64_t dj = d0 + j * K, width = width_of(j), off = (b * p.dim + dj) * L + t0;
      if (width < K) std::fill(lanes.begin(), lanes.end(), 0.0f);
      to_lanes(p.u + off, L, width, n, U);
      to_lanes(p.delta + off, L, width, n, DT);
      to_lanes(g.dout + off, L, width, n, DO);
      if (p.z) to_lanes(p.z + off, L, width, n, Z);
      block_prep_avx512(n, bias, p.softplus, DT, U, DU, DSP);
      load_state(g.chunk_states + ((b * p.dim + dj) * p.nchunks + c) * N, p.nchunks * N, width,
                 H);
      const float* Bc = p.bptr(b, dj, t0);
      const float* Cc = p.cptr(b, dj, t0);
      block_record_avx512(n, N, DT, DU, A2, Bc, Cc, H, E, Y);
      block_bwd_avx512(n, N, DO, U, p.z ? Z : nullptr, DT, DU, DSP, A, Bc, Cc, Dv, H, E, Y, dh,
                       dA, dD, db, PB.data(), PC.data(), j > 0);
      from_lanes(DO, width, n, g.du + off, L);
      from_lanes(Y, width, n, g.ddelta + off, L);
      if (p.z) from_lanes(Z, width, n, g.dz + off, L);
      if (c == 0 && g.dinit)
        for (int64_t w = 0; w < width; ++w)
          for (int64_t k = 0; k < N; ++k) g.dinit[(b * p.dim + dj + w) * N + k] = dh[k * K + w];
    }
    lane_sums(n * N, PB.data(), dBp + t0 * N);
    lane_sums(n * N, PC.data(), dCp + t0 * N);
  }
  for (int64_t j = 0; j < nb; ++j) {
    const float* q = blk_ptr(j);
    const float *dA = q + 3 * S, *dD = q + 4 * S + 2 * K, *db = dD + K;
    const int64_t dj = d0 + j * K, width = width_of(j);
    for (int64_t w = 0; w < width; ++w) {
      const int64_t row = b * p.dim + dj + w;
      for (int64_t k = 0; k < N; ++k) g.dA_part[row * N + k] = dA[k * K + w];
      g.dD_part[row] = dD[w];
      g.dbias_part[row] = db[w];
    }
  }
}
#endif

// Channels of a group are split in blocks, each its own task with its own B/C partials. A fixed
// count (deterministic) makes the reduction order independent of the thread count.
int64_t block_count(int64_t batch, int64_t dim, int64_t G, bool deterministic) {
  const int64_t tasks = batch * G, threads = at::get_num_threads();
  const int64_t want = deterministic ? 16 : (2 * threads + tasks - 1) / tasks;
  return std::max<int64_t>(1, std::min<int64_t>({dim / G, want, 64}));
}

template <typename T>
void backward(const Problem<T>& p, const Grads<T>& g, T* dA, T* dB, T* dC, T* dD, T* dbias) {
  const int64_t N = p.N, cpg = p.dim / p.GF;
  const int64_t tasks = p.batch * p.GF * g.nblk;
  at::parallel_for(0, tasks, 1, [&](int64_t k0, int64_t k1) {
    Scratch<T> w(p.chunk, N, true);
    std::vector<Piece> pieces;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t blk = k % g.nblk, gi = (k / g.nblk) % p.GF, b = k / (g.nblk * p.GF);
      const int64_t d0 = gi * cpg + blk * cpg / g.nblk, d1 = gi * cpg + (blk + 1) * cpg / g.nblk;
#ifdef DLCORE_AVX512
      if constexpr (std::is_same_v<T, float>) {
        if (p.b_var && p.c_var && !p.packed && d1 - d0 >= 8 && has_avx512()) {
          backward_blocked(p, g, b, gi, blk, d0, d1);
          continue;
        }
      }
#endif
      for (int64_t d = d0; d < d1; ++d) backward_row(p, g, b, d, blk, w, pieces);
    }
  });
  // Fixed-order reductions of the per-task partials.
  at::parallel_for(0, p.dim, 16, [&](int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d) {
      T sD = 0, sb = 0;
      for (int64_t n = 0; n < N; ++n) {
        T sA = 0, sB = 0, sC = 0;
        for (int64_t b = 0; b < p.batch; ++b) {
          const int64_t i = (b * p.dim + d) * N + n;
          sA += g.dA_part[i];
          if (!p.b_var) sB += g.dB_part[i];
          if (!p.c_var) sC += g.dC_part[i];
        }
        dA[d * N + n] = sA;
        if (!p.b_var) dB[d * N + n] = sB;
        if (!p.c_var) dC[d * N + n] = sC;
      }
      for (int64_t b = 0; b < p.batch; ++b) {
        sD += g.dD_part[b * p.dim + d];
        sb += g.dbias_part[b * p.dim + d];
      }
      if (dD) dD[d] = sD;
      if (dbias) dbias[d] = sb;
    }
  });
  auto reduce_var = [&](const T* part, T* dst, int64_t G) {
    // part (batch, GF, nblk, L, N) -> dst (batch, G, N, L): group g owns GF / G fine groups.
    const int64_t slabs = p.GF / G * g.nblk;
    at::parallel_for(0, p.batch * G * N, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i % N, bg = i / N;
        T* o = dst + i * p.L;
        const T* src = part + bg * slabs * p.L * N + n;
        for (int64_t t = 0; t < p.L; ++t) o[t] = src[t * N];
        for (int64_t j = 1; j < slabs; ++j) {
          const T* sj = src + j * p.L * N;
          for (int64_t t = 0; t < p.L; ++t) o[t] += sj[t * N];
        }
      }
    });
  };
  if (p.b_var) reduce_var(g.dB_part, dB, p.GB);
  if (p.c_var) reduce_var(g.dC_part, dC, p.GC);
}

// ---------------------------------------------------------------- torch glue

void check_row(const char* name, const Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// Everything the kernels read, converted to the compute dtype and laid out as they expect:
// (batch, dim, L) rows and B/C transposed to (batch, G, L, N) so the state loop is unit-stride.
struct Inputs {
  Tensor u, delta, z, A, B, C, D, bias, init;
  std::vector<int64_t> starts, ends;
  int64_t batch, dim, L, N, GB, GC;
  bool b_var, c_var, packed;
};

Inputs prepare(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
               const Tensor& C, const OptTensor& D, const OptTensor& z,
               const OptTensor& delta_bias, const OptTensor& initial_state,
               const OptTensor& cu_seqlens, int64_t chunk_size) {
  TORCH_CHECK(u.dim() == 3, "u must be (batch, dim, L), got ", u.sizes());
  TORCH_CHECK(A.dim() == 2 && (A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble),
              "A must be a float32/float64 (dim, N) tensor, got ", A.scalar_type(), " ",
              A.sizes());
  TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  Inputs in;
  in.batch = u.size(0);
  in.dim = u.size(1);
  in.L = u.size(2);
  in.N = A.size(1);
  const auto cd = A.scalar_type();
  TORCH_CHECK(in.N >= 1 && in.N <= kMaxState, "N must be in [1, ", kMaxState, "], got ", in.N);
  check_row("A", A, {in.dim, in.N});
  check_row("delta", delta, u.sizes());
  auto rows = [&](const Tensor& t) { return t.to(cd).contiguous(); };
  in.u = rows(u);
  in.delta = rows(delta);
  in.A = rows(A);
  auto bc = [&](const char* name, const Tensor& M, bool& var) {
    var = M.dim() == 4;
    if (!var) {
      check_row(name, M, {in.dim, in.N});
      return rows(M);
    }
    TORCH_CHECK(M.size(1) >= 1 && in.dim % M.size(1) == 0, name, ": G=", M.size(1),
                " must divide dim=", in.dim);
    check_row(name, M, {in.batch, M.size(1), in.N, in.L});
    return M.to(cd).transpose(2, 3).contiguous();
  };
  in.B = bc("B", B, in.b_var);
  in.C = bc("C", C, in.c_var);
  in.GB = in.b_var ? in.B.size(1) : 1;
  in.GC = in.c_var ? in.C.size(1) : 1;
  if (D) check_row("D", *D, {in.dim}), in.D = rows(*D);
  if (delta_bias) check_row("delta_bias", *delta_bias, {in.dim}), in.bias = rows(*delta_bias);
  if (z) check_row("z", *z, u.sizes()), in.z = rows(*z);
  in.packed = cu_seqlens.has_value();
  if (in.packed) {
    TORCH_CHECK(in.batch == 1, "cu_seqlens needs batch == 1, got ", in.batch);
    const Tensor cu = cu_seqlens->to(at::kLong).contiguous();
    TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2, "cu_seqlens must be (nseq + 1,)");
    const int64_t* c = cu.data_ptr<int64_t>();
    TORCH_CHECK(c[0] == 0 && c[cu.numel() - 1] == in.L, "cu_seqlens must run from 0 to L=", in.L);
    for (int64_t s = 0; s + 1 < cu.numel(); ++s) {
      TORCH_CHECK(c[s] <= c[s + 1], "cu_seqlens must be non-decreasing");
      in.starts.push_back(c[s]);
      in.ends.push_back(c[s + 1]);
    }
  } else {
    in.starts = {0};
    in.ends = {in.L};
  }
  const int64_t state_rows = in.packed ? (int64_t)in.starts.size() : in.batch;
  if (initial_state) {
    check_row("initial_state", *initial_state, {state_rows, in.dim, in.N});
    in.init = rows(*initial_state);
  }
  return in;
}

template <typename T>
Problem<T> problem(const Inputs& in, bool softplus, int64_t chunk_size) {
  auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
  Problem<T> p;
  p.batch = in.batch, p.dim = in.dim, p.L = in.L, p.N = in.N;
  p.GB = in.GB, p.GC = in.GC, p.GF = std::lcm(in.GB, in.GC);
  p.chunk = chunk_size;
  p.nchunks = std::max<int64_t>(1, (in.L + chunk_size - 1) / chunk_size);
  p.softplus = softplus;
  p.u = ptr(in.u), p.delta = ptr(in.delta), p.z = ptr(in.z), p.A = ptr(in.A);
  p.B = ptr(in.B), p.C = ptr(in.C), p.D = ptr(in.D), p.bias = ptr(in.bias), p.init = ptr(in.init);
  p.b_var = in.b_var, p.c_var = in.c_var;
  p.starts = in.starts, p.ends = in.ends, p.packed = in.packed;
  return p;
}

// A buffer of the compute dtype to write into: `t` itself when it already is one.
Tensor scratch_like(const Tensor& t, at::ScalarType cd) {
  return t.scalar_type() == cd && t.is_contiguous() ? t : at::empty(t.sizes(), t.options().dtype(cd));
}

void selective_scan_fwd_kernel(const Tensor& u, const Tensor& delta, const Tensor& A,
                               const Tensor& B, const Tensor& C, const OptTensor& D,
                               const OptTensor& z, const OptTensor& delta_bias,
                               const OptTensor& initial_state, const OptTensor& cu_seqlens,
                               bool delta_softplus, int64_t chunk_size, const Tensor& out,
                               const Tensor& last_state, const Tensor& chunk_states) {
  const Inputs in =
      prepare(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, chunk_size);
  const auto cd = A.scalar_type();
  const int64_t nchunks = std::max<int64_t>(1, (in.L + chunk_size - 1) / chunk_size);
  const int64_t state_rows = in.packed ? (int64_t)in.starts.size() : in.batch;
  check_row("out", out, u.sizes());
  check_row("last_state", last_state, {state_rows, in.dim, in.N});
  check_row("chunk_states", chunk_states, {in.batch, in.dim, nchunks, in.N});
  Tensor o = scratch_like(out, cd), last = scratch_like(last_state, cd),
         cs = scratch_like(chunk_states, cd);
  AT_DISPATCH_FLOATING_TYPES(cd, "selective_scan_fwd_kernel", [&] {
    const auto p = problem<scalar_t>(in, delta_softplus, chunk_size);
    forward(p, o.data_ptr<scalar_t>(), last.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>());
  });
  if (!o.is_same(out)) out.copy_(o);
  if (!last.is_same(last_state)) last_state.copy_(last);
  if (!cs.is_same(chunk_states)) chunk_states.copy_(cs);
}

void selective_scan_bwd_kernel(
    const Tensor& dout, const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
    const Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
    const OptTensor& initial_state, const OptTensor& cu_seqlens, bool delta_softplus,
    int64_t chunk_size, const Tensor& chunk_states, const OptTensor& dlast_state,
    bool deterministic, const Tensor& du, const Tensor& ddelta, const Tensor& dA,
    const Tensor& dB, const Tensor& dC, const OptTensor& dD, const OptTensor& dz,
    const OptTensor& ddelta_bias, const OptTensor& dinitial_state) {
  const Inputs in =
      prepare(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, chunk_size);
  const auto cd = A.scalar_type();
  const int64_t nchunks = std::max<int64_t>(1, (in.L + chunk_size - 1) / chunk_size);
  const int64_t state_rows = in.packed ? (int64_t)in.starts.size() : in.batch;
  check_row("dout", dout, u.sizes());
  check_row("chunk_states", chunk_states, {in.batch, in.dim, nchunks, in.N});
  check_row("du", du, u.sizes());
  check_row("ddelta", ddelta, u.sizes());
  check_row("dA", dA, A.sizes());
  check_row("dB", dB, B.sizes());
  check_row("dC", dC, C.sizes());
  TORCH_CHECK(dD.has_value() == D.has_value(), "dD must be given exactly when D is");
  TORCH_CHECK(dz.has_value() == z.has_value(), "dz must be given exactly when z is");
  TORCH_CHECK(ddelta_bias.has_value() == delta_bias.has_value(),
              "ddelta_bias must be given exactly when delta_bias is");
  TORCH_CHECK(dinitial_state.has_value() == initial_state.has_value(),
              "dinitial_state must be given exactly when initial_state is");
  if (dD) check_row("dD", *dD, {in.dim});
  if (dz) check_row("dz", *dz, u.sizes());
  if (ddelta_bias) check_row("ddelta_bias", *ddelta_bias, {in.dim});
  if (dinitial_state) check_row("dinitial_state", *dinitial_state, {state_rows, in.dim, in.N});
  if (dlast_state) check_row("dlast_state", *dlast_state, {state_rows, in.dim, in.N});
  const Tensor dout_c = dout.to(cd).contiguous(), cs = chunk_states.to(cd).contiguous();
  const Tensor dlast = dlast_state ? dlast_state->to(cd).contiguous() : Tensor();
  Tensor du_c = scratch_like(du, cd), dd_c = scratch_like(ddelta, cd), dA_c = scratch_like(dA, cd);
  Tensor dB_c = scratch_like(dB, cd), dC_c = scratch_like(dC, cd);
  Tensor dD_c = dD ? scratch_like(*dD, cd) : Tensor();
  Tensor dz_c = dz ? scratch_like(*dz, cd) : Tensor();
  Tensor db_c = ddelta_bias ? scratch_like(*ddelta_bias, cd) : Tensor();
  Tensor di_c = dinitial_state ? scratch_like(*dinitial_state, cd) : Tensor();
  const auto opts = u.options().dtype(cd);
  AT_DISPATCH_FLOATING_TYPES(cd, "selective_scan_bwd_kernel", [&] {
    using T = scalar_t;
    const auto p = problem<T>(in, delta_softplus, chunk_size);
    auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    // Empty packed sequences pass their last-state gradient straight to their initial state.
    if (di_c.defined()) {
      for (int64_t s = 0; s < (int64_t)p.starts.size(); ++s) {
        if (p.starts[s] != p.ends[s]) continue;
        for (int64_t d = 0; d < p.dim; ++d)
          set_state(ptr(di_c) + (s * p.dim + d) * p.N,
                    dlast.defined() ? ptr(dlast) + (s * p.dim + d) * p.N : nullptr, p.N);
      }
    }
    const Tensor dA_part = at::zeros({p.batch, p.dim, p.N}, opts);
    const Tensor dD_part = at::zeros({p.batch, p.dim}, opts);
    const Tensor db_part = at::zeros({p.batch, p.dim}, opts);
    Grads<T> g;
    g.dout = ptr(dout_c), g.dlast = ptr(dlast), g.chunk_states = ptr(cs);
    g.du = ptr(du_c), g.ddelta = ptr(dd_c), g.dz = ptr(dz_c), g.dinit = ptr(di_c);
    g.dA_part = ptr(dA_part), g.dD_part = ptr(dD_part), g.dbias_part = ptr(db_part);
    g.nblk = block_count(p.batch, p.dim, p.GF, deterministic);
    auto part = [&](bool var) {
      return var ? at::zeros({p.batch, p.GF, g.nblk, p.L, p.N}, opts)
                 : at::zeros({p.batch, p.dim, p.N}, opts);
    };
    Tensor dB_part = part(p.b_var), dC_part = part(p.c_var);
    g.dB_part = ptr(dB_part), g.dC_part = ptr(dC_part);
    backward(p, g, ptr(dA_c), ptr(dB_c), ptr(dC_c), ptr(dD_c), ptr(db_c));
  });
  auto back = [](const Tensor& src, const Tensor& dst) {
    if (!src.is_same(dst)) dst.copy_(src);
  };
  back(du_c, du), back(dd_c, ddelta), back(dA_c, dA), back(dB_c, dB), back(dC_c, dC);
  if (dD) back(dD_c, *dD);
  if (dz) back(dz_c, *dz);
  if (ddelta_bias) back(db_c, *ddelta_bias);
  if (dinitial_state) back(di_c, *dinitial_state);
}

template <typename T>
void state_update_task(int64_t r0, int64_t r1, int64_t dim, int64_t N, int64_t GB, int64_t GC,
                       const T* x, const T* dt, const T* A, const T* B, const T* C, const T* D,
                       const T* z, const T* bias, bool sp, T* state, T* out) {
#ifdef DLCORE_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512()) {
      state_update_rows_avx512(r0, r1, dim, N, GB, GC, x, dt, A, B, C, D, z, bias, sp, state, out);
      return;
    }
  }
#endif
  state_update_rows(r0, r1, dim, N, GB, GC, x, dt, A, B, C, D, z, bias, sp, state, out);
}

void selective_state_update_kernel(const Tensor& state, const Tensor& x, const Tensor& dt,
                                   const Tensor& A, const Tensor& B, const Tensor& C,
                                   const OptTensor& D, const OptTensor& z,
                                   const OptTensor& dt_bias, bool dt_softplus, const Tensor& out) {
  TORCH_CHECK(state.dim() == 3, "state must be (batch, dim, N), got ", state.sizes());
  const int64_t batch = state.size(0), dim = state.size(1), N = state.size(2);
  const auto cd = A.scalar_type();
  TORCH_CHECK(cd == at::kFloat || cd == at::kDouble, "A must be float32/float64, got ", cd);
  TORCH_CHECK(state.scalar_type() == cd, "state must have A's dtype ", cd, ", got ",
              state.scalar_type());
  TORCH_CHECK(N >= 1 && N <= kMaxState, "N must be in [1, ", kMaxState, "], got ", N);
  check_row("A", A, {dim, N});
  check_row("x", x, {batch, dim});
  check_row("dt", dt, {batch, dim});
  check_row("out", out, {batch, dim});
  for (const Tensor* M : {&B, &C}) {
    TORCH_CHECK(M->dim() == 3 && M->size(1) >= 1 && dim % M->size(1) == 0,
                "B and C must be (batch, G, N) with G dividing dim, got ", M->sizes());
    check_row(M == &B ? "B" : "C", *M, {batch, M->size(1), N});
  }
  const int64_t GB = B.size(1), GC = C.size(1);
  auto rows = [&](const Tensor& t) { return t.to(cd).contiguous(); };
  const Tensor xc = rows(x), dtc = rows(dt), Ac = rows(A), Bc = rows(B), Cc = rows(C);
  Tensor Dc, zc, bc;
  if (D) check_row("D", *D, {dim}), Dc = rows(*D);
  if (z) check_row("z", *z, {batch, dim}), zc = rows(*z);
  if (dt_bias) check_row("dt_bias", *dt_bias, {dim}), bc = rows(*dt_bias);
  Tensor st = state.is_contiguous() ? state : state.contiguous();
  Tensor o = scratch_like(out, cd);
  AT_DISPATCH_FLOATING_TYPES(cd, "selective_state_update_kernel", [&] {
    using T = scalar_t;
    auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    const T *xp = ptr(xc), *dtp = ptr(dtc), *Ap = ptr(Ac), *Bp = ptr(Bc), *Cp = ptr(Cc);
    const T *Dp = ptr(Dc), *zp = ptr(zc), *bp = ptr(bc);
    T *sp = ptr(st), *op = ptr(o);
    // Threads only for large steps: a wake-up costs more than a few thousand state updates.
    const int64_t grain = std::max<int64_t>(64, 32768 / N);
    at::parallel_for(0, batch * dim, grain, [&](int64_t r0, int64_t r1) {
      state_update_task<T>(r0, r1, dim, N, GB, GC, xp, dtp, Ap, Bp, Cp, Dp, zp, bp, dt_softplus,
                           sp, op);
    });
  });
  if (!st.is_same(state)) state.copy_(st);
  if (!o.is_same(out)) out.copy_(o);
}

}  // namespace dlcore::cpu::scan

TORCH_LIBRARY_IMPL(dlcore, CPU, m) {
  m.impl("selective_scan_fwd_kernel", &dlcore::cpu::scan::selective_scan_fwd_kernel);
  m.impl("selective_scan_bwd_kernel", &dlcore::cpu::scan::selective_scan_bwd_kernel);
  m.impl("selective_state_update_kernel", &dlcore::cpu::scan::selective_state_update_kernel);
}
