// Scalar math shared by the CPU (csrc/cpu/sampler.cpp) and CUDA (csrc/cuda/sampler.cu) sampler
// kernels: the per-sample step coefficients and Triton's Philox4x32-10 counter RNG. The Triton
// kernels (kernels/sampler.py) implement the same formulas; dlcore/reference/sampler.py is the
// specification.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define DLCORE_HD __host__ __device__ __forceinline__
#else
#define DLCORE_HD inline
#endif

namespace dlcore::sampler {

#ifndef __CUDACC__
using std::log;
using std::sqrt;
#endif

enum Method : int64_t { kDDIM = 0, kDDPM = 1, kInversion = 2 };
enum Prediction : int64_t { kEpsilon = 0, kSample = 1, kVPrediction = 2 };
enum Variance : int64_t {
  kFixedSmall = 0,
  kFixedSmallLog = 1,
  kFixedLarge = 2,
  kFixedLargeLog = 3,
  kLearned = 4,
  kLearnedRange = 5
};
// How the noise scale is found per element: one number per sample, sqrt(v), exp(l0 + l1 * v).
enum SigmaMode : int64_t { kSigmaFixed = 0, kSigmaLearned = 1, kSigmaLearnedRange = 2 };
enum NoiseMode : int64_t { kNoNoise = 0, kNoiseTensor = 1, kNoiseFused = 2 };

// The step is linear per element once the model output g is guided:
//   x0    = ax * x + am * g
//   x0c   = clamp(x0, -bound, bound) / div        (clip: div = 1; dynamic threshold: div = s)
//   prev  = p0 * x0c + px * x + pg * g + sigma * noise
// sigma is per element for learned variances: sqrt(v) or exp(l0 + l1 * v).
template <typename S>
struct StepCoeffs {
  S ax, am, p0, px, pg, sigma, l0, l1;
};

template <typename S>
DLCORE_HD StepCoeffs<S> step_coeffs(S a, S ap, int64_t method, int64_t prediction,
                                    int64_t variance_type, S eta, bool use_clipped) {
  StepCoeffs<S> c{};
  const S one = S(1);
  const S sa = sqrt(a), sb = sqrt(one - a);
  S ex, em, e0 = S(0);  // pred_epsilon = ex * x + em * g + e0 * x0c
  if (prediction == kEpsilon) {
    c.ax = one / sa;
    c.am = -sb / sa;
    ex = S(0);
    em = one;
  } else if (prediction == kSample) {
    c.ax = S(0);
    c.am = one;
    ex = one / sb;
    em = -sa / sb;
  } else {
    c.ax = sa;
    c.am = -sb;
    ex = sb;
    em = sa;
  }
  if (method == kDDPM) {
    const S cur_alpha = a / ap, cur_beta = one - cur_alpha;
    const S bp = one - a, bpp = one - ap;
    c.p0 = sqrt(ap) * cur_beta / bp;
    c.px = sqrt(cur_alpha) * bpp / bp;
    c.pg = S(0);
    S var = bpp / bp * cur_beta;
    var = var < S(1e-20) ? S(1e-20) : var;
    const S large = variance_type == kFixedLarge || variance_type == kFixedLargeLog;
    c.sigma = large ? sqrt(cur_beta) : sqrt(var);
    const S min_log = log(var), max_log = log(cur_beta);
    c.l0 = S(0.5) * min_log + S(0.25) * (max_log - min_log);
    c.l1 = S(0.25) * (max_log - min_log);
    return c;
  }
  S std_dev = S(0);
  if (method == kDDIM) {
    const S variance = (one - ap) / (one - a) * (one - a / ap);
    std_dev = eta * sqrt(variance);
  }
  if (use_clipped) {
    ex = one / sb;
    em = S(0);
    e0 = -sa / sb;
  }
  const S ceps = sqrt(one - ap - std_dev * std_dev);
  c.p0 = sqrt(ap) + ceps * e0;
  c.px = ceps * ex;
  c.pg = ceps * em;
  c.sigma = std_dev;
  c.l0 = c.l1 = S(0);
  return c;
}

// Philox4x32-10 exactly as triton.language.random: counter (c0, c1, 0, 0), key (k0, k1); the
// first two output words. Plain 64-bit products so compilers vectorise it.
DLCORE_HD void philox_2x(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1, uint32_t& o0,
                         uint32_t& o1) {
  uint32_t c2 = 0, c3 = 0;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(0xCD9E8D57u) * c2;
    const uint64_t p1 = uint64_t(0xD2511F53u) * c0;
    const uint32_t n0 = uint32_t(p0 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p1 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p0);
    c3 = uint32_t(p1);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  o0 = c0;
  o1 = c1;
}

// Triton's uint_to_uniform_float: bitcast to int32, fold negatives with ~x, scale into [0, 1).
DLCORE_HD float uint_to_uniform(uint32_t x) {
  int32_t s = int32_t(x);
  s = s < 0 ? ~s : s;
  return float(s) * 4.6566127342e-10f;
}

}  // namespace dlcore::sampler
